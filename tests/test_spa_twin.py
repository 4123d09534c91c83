"""SPA's ONNX grouping (``compress.models.onnx_graph.grouping.find_groups``) against its torch twin (torch-pruning's
DependencyGraph, ``compress.pruning.torch_groups``) on the same small torch models.

Each model is exported with ``torch.onnx.export(dynamo=True, opset_version=18)`` and ``.optimize()``;
ONNX initializers are matched to torch parameters by value (a Linear becomes Gemm with its own weight,
or MatMul with the transposed weight; BN may be folded into the conv before it) and every group is
compared as the set of (parameter name, axis in the torch layout) it owns.

Agreements: CNN channels, residual stream, MLP hidden channels, LayerNorm freezing.
Disagreements, each checked by really pruning:
- the attention block: ONNX finds heads (block = head_dim) and both head dims; torch-pruning links
  channel i of q, k, v and o, which the NaN probe freezes. ONNX is right (ORT equals the reference).
- the same CNN exported without ``optimize()``: BatchNormalization stays, and ONNX also names its
  running statistics (buffers torch-pruning slices with the BN weight); the groups are otherwise equal.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from compress.errors import CompressError
from compress.pruning.torch_groups import prune_torch_model, torch_groups
from compress.models.onnx_graph.grouping import find_groups
from compress.models.onnx_graph.surgery import prune_onnx


class CNN(nn.Module):
    """[N, 3, 6, 6] -> conv-bn-relu-conv-relu-global average pool-flatten-linear -> [N, 5]."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.fc = nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ResidualMLP(nn.Module):
    """[N, 6] -> (stem) -> h + fc2(relu(fc1(h))) -> head -> [N, 4]; without the stem h is the input."""

    def __init__(self, stem: bool):
        super().__init__()
        width = 8 if stem else 6
        self.stem = nn.Linear(6, 8) if stem else None
        self.fc1, self.fc2, self.head = nn.Linear(width, 16), nn.Linear(16, width), nn.Linear(width, 4)

    def forward(self, x):
        h = self.stem(x) if self.stem is not None else x
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


class NormMLP(nn.Module):
    """[N, T, 6] -> stem -> LayerNorm -> up -> GELU -> down -> [N, T, 8]."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm, self.up, self.down = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(self.norm(self.stem(x)))))


class Attention(nn.Module):
    """[N, T, 8] -> q, k, v (3 heads of 4) -> softmax(q·kᵀ/2)·v -> merge -> o -> [N, T, 8]."""

    heads, head_dim = 3, 4

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, dim=-1)
        return self.o((attn @ v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


def build(cls, *args) -> nn.Module:
    """Seeded model in eval mode; norm scales, shifts and BN statistics random so values identify them."""
    torch.manual_seed(0)
    model = cls(*args)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def export(model: nn.Module, x: torch.Tensor, path, optimize: bool = True) -> onnx.ModelProto:
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, optimize=False, verbose=False)
    if optimize:
        program.optimize()
    program.save(str(path))
    return onnx.load(str(path))


def owners(onnx_model: onnx.ModelProto, model: nn.Module, extra: dict[str, torch.Tensor] | None = None):
    """{initializer: (torch name, transposed)} by value; ``extra``: {name: value} of folded tensors."""
    candidates = {**dict(model.named_parameters()), **dict(model.named_buffers()), **(extra or {})}
    found = {}
    for init in onnx_model.graph.initializer:
        array = numpy_helper.to_array(init)
        for name, value in candidates.items():
            value = value.detach().numpy()
            for transposed, ref in ((False, value), (True, value.T if value.ndim == 2 else None)):
                if ref is not None and array.shape == ref.shape and array.size > 1 \
                        and np.allclose(array, ref, atol=1e-6):
                    found[init.name] = (name, transposed)
    return found


def members(group, owned=None, params=None) -> frozenset:
    """(torch parameter, torch axis) of a group's slices; ONNX names go through ``owned`` (MatMul: 1 - axis)."""
    out = set()
    for s in group.slices:
        name, transposed = owned[s.tensor] if owned is not None else (s.tensor, False)
        if params is None or name in params:
            out.add((name, 1 - s.axis if transposed else s.axis))
    return frozenset(out)


def prunable(groups, owned=None, params=None) -> set[tuple[int, frozenset]]:
    return {(g.units, members(g, owned, params)) for g in groups if g.prunable}


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


CONV1 = {("conv1.weight", 0), ("conv1.bias", 0), ("conv2.weight", 1)}
CONV2 = {("conv2.weight", 0), ("conv2.bias", 0), ("fc.weight", 1)}
BN = {("bn.weight", 0), ("bn.bias", 0)}


def test_cnn_agrees_up_to_the_batchnorm_that_optimize_folds_away(tmp_path):
    """optimize() folds BN into conv1 (the export has no BatchNormalization): the ONNX group is the
    torch group without bn.weight / bn.bias. Both are right for their model: pruning each with the
    same kept units gives the same outputs (ORT vs the sliced torch model)."""
    model, x = build(CNN), torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    onnx_model = export(model, x, tmp_path / "cnn.onnx")
    assert "BatchNormalization" not in {n.op_type for n in onnx_model.graph.node}
    scale = model.bn.weight / (model.bn.running_var + model.bn.eps).sqrt()
    folded = {"conv1.weight": model.conv1.weight * scale[:, None, None, None],
              "conv1.bias": (model.conv1.bias - model.bn.running_mean) * scale + model.bn.bias}
    owned = owners(onnx_model, model, folded)
    onnx_groups, graph = find_groups(onnx_model)
    tp_groups = torch_groups(model, x)
    assert prunable(onnx_groups, owned) == {(8, frozenset(CONV1)), (6, frozenset(CONV2))}
    assert prunable(tp_groups) == {(8, frozenset(CONV1 | BN)), (6, frozenset(CONV2))}

    keep_units = {8: [0, 2, 3, 5, 7], 6: [1, 2, 4, 5]}
    pruned_onnx = prune_onnx(onnx_model, onnx_groups, graph,
                             {g.id: keep_units[g.units] for g in onnx_groups if g.prunable})
    pruned_torch = prune_torch_model(model, tp_groups, {g.id: keep_units[g.units] for g in tp_groups if g.prunable})
    assert tuple(pruned_torch.conv2.weight.shape) == (4, 5, 3, 3)
    with torch.no_grad():
        np.testing.assert_allclose(run(pruned_onnx, x.numpy()), pruned_torch(x).numpy(), rtol=1e-4, atol=1e-5)


def test_cnn_without_optimize_keeps_bn_and_agrees(tmp_path):
    """Unoptimised, BatchNormalization stays: the conv1 groups agree on every parameter (ONNX also names
    BN's running statistics, buffers that prune_torch_model slices with bn.weight). The global pool's
    ReduceMean reads its axes from Reshape(Constant(value_ints=[-1, -2]), [-1]); values.py follows that
    (it once did not, and froze conv2's channels), so conv2's group agrees too."""
    model, x = build(CNN), torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    onnx_model = export(model, x, tmp_path / "cnn_raw.onnx", optimize=False)
    owned = owners(onnx_model, model)
    assert {owned[n][0] for n in ("bn.running_mean", "bn.running_var")} == {"bn.running_mean", "bn.running_var"}
    onnx_groups, _ = find_groups(onnx_model)
    params = dict(model.named_parameters())
    assert prunable(onnx_groups, owned, params) == {(8, frozenset(CONV1 | BN)), (6, frozenset(CONV2))}
    first = next(g for g in onnx_groups if g.prunable and ("conv1.weight", 0) in members(g, owned))
    assert members(first, owned) - members(first, owned, params) == {("bn.running_mean", 0), ("bn.running_var", 0)}
    assert prunable(torch_groups(model, x)) == {(8, frozenset(CONV1 | BN)), (6, frozenset(CONV2))}


@pytest.mark.parametrize("stem", [True, False])
def test_residual_mlp_groups_agree(tmp_path, stem):
    """The residual Add ties stem rows, fc2 rows and the head/fc1 columns into one stream group in both.
    Without a stem the stream is the model input: both freeze it (ONNX: 'reaches the graph input';
    torch: the Add combines the channels with a tensor outside the autograd graph)."""
    model, x = build(ResidualMLP, stem), torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    onnx_model = export(model, x, tmp_path / "res.onnx")
    owned = owners(onnx_model, model)
    onnx_groups, tp_groups = find_groups(onnx_model)[0], torch_groups(model, x)
    hidden = (16, frozenset({("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)}))
    stream = (8, frozenset({("stem.weight", 0), ("stem.bias", 0), ("fc1.weight", 1), ("fc2.weight", 0),
                            ("fc2.bias", 0), ("head.weight", 1)}))
    assert prunable(onnx_groups, owned) == prunable(tp_groups) == ({hidden, stream} if stem else {hidden})
    if not stem:
        onnx_stream = next(g for g in onnx_groups if ("fc2.weight", 0) in members(g, owned))
        tp_stream = next(g for g in tp_groups if ("fc2.weight", 0) in members(g))
        assert "graph input 'x'" in onnx_stream.frozen and "outside the autograd graph" in tp_stream.frozen


def test_layernorm_mlp_groups_agree(tmp_path):
    """Linear weights become transposed MatMul initializers and GELU is decomposed (Div, Erf, Add, Mul):
    the hidden channels agree. Both freeze the stem channels that LayerNorm normalises over, with the
    same members; that is right, since removing a channel changes the mean and variance every kept
    channel is normalised with (checked below)."""
    model, x = build(NormMLP), torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    onnx_model = export(model, x, tmp_path / "ln.onnx")
    assert "Erf" in {n.op_type for n in onnx_model.graph.node}
    owned = owners(onnx_model, model)
    assert any(transposed for _, transposed in owned.values())
    onnx_groups, tp_groups = find_groups(onnx_model)[0], torch_groups(model, x)
    hidden = (16, frozenset({("up.weight", 0), ("up.bias", 0), ("down.weight", 1)}))
    assert prunable(onnx_groups, owned) == prunable(tp_groups) == {hidden}
    normed = {("stem.weight", 0), ("stem.bias", 0), ("norm.weight", 0), ("norm.bias", 0), ("up.weight", 1)}
    onnx_norm = next(g for g in onnx_groups if members(g, owned) == normed)
    tp_norm = next(g for g in tp_groups if members(g) == normed)
    assert "LayerNormalization" in onnx_norm.frozen and "LayerNorm 'norm'" in tp_norm.frozen
    h = torch.randn(4, 8)
    kept = nn.functional.layer_norm(h[:, 1:], (7,))
    assert not torch.allclose(kept, nn.functional.layer_norm(h, (8,))[:, 1:], atol=1e-3)


def test_attention_heads_onnx_is_right_and_torch_pruning_freezes(tmp_path):
    """ONNX: a head group (3 units, block 4: q/k/v rows, o columns), the q·k head dim (4 units repeated
    over the 3 heads) and the v head dim (v rows, o columns). torch-pruning follows channels through
    reshape/transpose/matmul as if element-wise and links channel i of q, k, v and o: one 12-unit group,
    which the twin's NaN probe freezes (softmax spreads one channel to the whole head). The ONNX groups
    are right: pruning a head and both head dims runs in ORT and equals the reference computation
    without those units; the torch group, forced open, breaks the head reshape."""
    model, x = build(Attention), torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    onnx_model = export(model, x, tmp_path / "attn.onnx")
    owned = owners(onnx_model, model)
    onnx_groups, graph = find_groups(onnx_model)
    qkv = [(f"{p}.{w}", 0) for p in "qkv" for w in ("weight", "bias")]
    heads = next(g for g in onnx_groups if g.prunable and g.units == 3)
    assert members(heads, owned) == {*qkv, ("o.weight", 1)} and {s.block for s in heads.slices} == {4}
    dims = {members(g, owned): g for g in onnx_groups if g.prunable and g.units == 4}
    qk_dim = dims[frozenset(qkv[:4])]
    v_dim = dims[frozenset({*qkv[4:], ("o.weight", 1)})]
    assert all((s.repeat, s.stride) == (3, 4) for s in qk_dim.slices + v_dim.slices)
    assert len(prunable(onnx_groups, owned)) == 3

    tp_groups = torch_groups(model, x)
    assert prunable(tp_groups) == set()
    linked = next(g for g in tp_groups if g.units == 12)
    assert members(linked) == {*qkv, ("o.weight", 1)} and {s.block for s in linked.slices} == {1}
    assert linked.frozen.startswith("NaN probe: 'o' reads channels [0, 1, 2, 3, 8, 9, 10, 11]")

    keep = {heads.id: [0, 2], qk_dim.id: [0, 1, 3], v_dim.id: [1, 2]}
    pruned = prune_onnx(onnx_model, onnx_groups, graph, keep)
    w = {n: p.detach().numpy() for n, p in model.named_parameters()}
    qk_rows = [h * 4 + d for h in keep[heads.id] for d in keep[qk_dim.id]]
    v_rows = [h * 4 + d for h in keep[heads.id] for d in keep[v_dim.id]]
    xs = x.numpy()

    def project(name, rows, width):
        out = xs @ w[f"{name}.weight"][rows].T + w[f"{name}.bias"][rows]
        return out.reshape(2, 5, 2, width).transpose(0, 2, 1, 3)

    q, k, v = project("q", qk_rows, 3), project("k", qk_rows, 3), project("v", v_rows, 2)
    scores = q @ k.transpose(0, 1, 3, 2) / 2.0  # the scale of the dense model (head_dim 4) stays
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    merged = (p @ v).transpose(0, 2, 1, 3).reshape(2, 5, 4)
    expected = merged @ w["o.weight"][:, v_rows].T + w["o.bias"]
    np.testing.assert_allclose(run(pruned, xs), expected, rtol=1e-4, atol=1e-5)

    opened = [dataclasses.replace(g, frozen=None) if g is linked else g for g in tp_groups]
    prune_torch_model(model, opened, {linked.id: [u for u in range(12) if u != 5]})
    with pytest.raises(RuntimeError, match="shape"):
        model(x)
    with pytest.raises(CompressError, match="frozen"):
        prune_torch_model(build(Attention), tp_groups, {linked.id: list(range(11))})
