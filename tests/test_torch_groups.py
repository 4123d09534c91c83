"""torch_groups / prune_torch_model on small random models: grouping, freezing, slicing, scores."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress.errors import CompressError
from compress.pruning.groups import ChannelGroup, ParamSlice, describe, magnitude_scores
from compress.pruning.torch_groups import (
    INPUT_REASON,
    OUTPUT_REASON,
    prune_torch_model,
    tensor_shapes,
    torch_groups,
)


class SmallCNN(nn.Module):
    """[N, 3, 8, 8] -> conv-bn-relu-conv-bn-relu-maxpool-flatten-linear-relu-linear -> [N, 10]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.pool(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class ResidualBlock(nn.Module):
    """[N, 3, 6, 6] -> stem, then a(s) + b(s), global mean, head -> [N, 4]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = torch.relu(self.a(s) + self.b(s))
        return self.head(y.mean(dim=(2, 3)))


class ConcatNet(nn.Module):
    """[N, 3, 4, 4] -> cat(a(x) [4 ch], b(x) [6 ch]) -> c -> [N, 5, 4, 4]; linear, so masking == removing."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


class NormMLP(nn.Module):
    """[N, 6] -> LayerNorm -> Linear(6, 12) -> GELU -> Linear(12, 6)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.up = nn.Linear(6, 12)
        self.down = nn.Linear(12, 6)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(self.norm(x))))


class ChannelMixing(nn.Module):
    """a's channels are scaled by their own mean over channels: torch-pruning sees an element-wise op."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(y * y.mean(dim=1, keepdim=True))


class SharedTail(nn.Module):
    """a is called twice and its second output is returned as is: torch-pruning traces one call."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 5)

    def forward(self, x):
        return self.b(self.a(x)), self.a(x)


class GroupedConv(nn.Module):
    """A grouped conv (groups=2) between two dense convs, then a depthwise conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(self.dw(self.g(self.a(x))))


class SelfConcat(nn.Module):
    """[N, 3] -> h = relu(a(x)) [4] -> c(cat(h, h)) [2]: unit u is column u and u + 4 of c."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.c = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.cat([h, h], dim=-1))


class SplitGate(nn.Module):
    """a's 8 channels split into a value half and a gate half: each consumer sees half of the units."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        value, gate = self.a(x).chunk(2, dim=1)
        return self.c(value * torch.sigmoid(gate))


class BareScale(nn.Module):
    """a's output times a learnable [1, 4, 1, 1] scale that belongs to no layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(self.a(x) * self.scale)


class InputResidual(nn.Module):
    """x + a(x): a's channels are the model input's channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.c = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.c(x + self.a(x))


class StatsOnlyNorm(nn.Module):
    """A BatchNorm without affine parameters: its running statistics cannot be named by a ParamSlice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(self.bn(self.a(x)))


class Attention(nn.Module):
    """[N, T, 4] -> Linear -> MultiheadAttention + residual -> Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.att(h, h, h)[0] + h)


class TokenDecoder(nn.Module):
    """[N, T] token ids -> Embedding(10, 6) -> mean over T -> [N, 6, 1, 1] -> ConvTranspose2d(6, 8) -> BN -> ConvTranspose2d(8, 2)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.up = nn.ConvTranspose2d(6, 8, 2, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.out = nn.ConvTranspose2d(8, 2, 2)

    def forward(self, ids):
        h = self.embed(ids).mean(dim=1)[:, :, None, None]
        return self.out(torch.relu(self.bn(self.up(h))))


def build(cls, seed=0):
    torch.manual_seed(seed)
    model = cls().eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return model


def group_with(groups, tensor, axis, role=None):
    """The group holding a slice of ``tensor`` on ``axis`` (and ``role`` if given)."""
    found = [g for g in groups for s in g.slices
             if s.tensor == tensor and s.axis == axis and (role is None or s.role == role)]
    assert len(found) == 1, (tensor, axis, [g.label for g in found])
    return found[0]


def slice_of(group, tensor, axis):
    return next(s for s in group.slices if s.tensor == tensor and s.axis == axis)


def half_plan(groups):
    """Keep the even units of every prunable group."""
    return {g.id: list(range(0, g.units, 2)) for g in groups if g.prunable}


def masked_copy(model, groups, keep):
    """A copy of ``model`` with the producer rows (and their biases) of every dropped unit set to zero."""
    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters())
    with torch.no_grad():
        for gid, kept in keep.items():
            group = next(g for g in groups if g.id == gid)
            dropped = sorted(set(range(group.units)) - set(kept))
            for s in group.slices:
                if s.role != "consumer" and dropped:
                    params[s.tensor].index_fill_(s.axis, s.indices(dropped), 0.0)
    return masked


# ---------------------------------------------------------------- grouping


def test_cnn_groups_members_flatten_block_and_costs():
    model = build(SmallCNN)
    groups = torch_groups(model, torch.randn(2, 3, 8, 8))
    assert [g.id for g in groups] == list(range(len(groups)))
    assert [g.label for g in groups] == [
        "conv1.out (+bn1, conv2.in)", "conv2.out (+bn2, fc1.in)", "fc1.out (+fc2.in)", "fc2.out"]

    conv1 = group_with(groups, "conv1.weight", 0, "producer")
    assert conv1.units == 8 and conv1.prunable
    assert {(s.tensor, s.axis, s.role) for s in conv1.slices} == {
        ("conv1.weight", 0, "producer"), ("conv1.bias", 0, "channel"),
        ("bn1.weight", 0, "channel"), ("bn1.bias", 0, "channel"), ("conv2.weight", 1, "consumer")}

    conv2 = group_with(groups, "conv2.weight", 0, "producer")
    flat = slice_of(conv2, "fc1.weight", 1)
    assert (flat.block, flat.offset, flat.role) == (16, 0, "consumer")  # one channel -> 4·4 flattened features

    fc2 = group_with(groups, "fc2.weight", 0, "producer")
    assert fc2.frozen == OUTPUT_REASON and not fc2.prunable

    shapes = tensor_shapes(model)
    assert conv1.unit_cost(shapes) == 3 * 9 + 1 + 2 + 16 * 9
    assert conv2.unit_cost(shapes) == 8 * 9 + 1 + 2 + 16 * 32
    assert group_with(groups, "fc1.weight", 0).unit_cost(shapes) == 256 + 1 + 10
    rows = describe(groups, shapes)
    assert [r["status"] for r in rows] == ["prunable"] * 3 + [f"frozen: {OUTPUT_REASON}"]


def test_grouping_is_deterministic_and_leaves_the_model_alone():
    model = build(SmallCNN).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    first = [g.to_dict() for g in torch_groups(model, x)]
    second = [g.to_dict() for g in torch_groups(model, (x,))]
    assert first == second
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_residual_add_puts_both_producers_in_one_group():
    model = build(ResidualBlock)
    groups = torch_groups(model, torch.randn(2, 3, 6, 6))
    added = group_with(groups, "a.weight", 0, "producer")
    assert slice_of(added, "b.weight", 0).role == "producer"
    assert slice_of(added, "head.weight", 1).role == "consumer"
    assert added.units == 6 and added.prunable
    assert added.label == "a.out (+b.out, head.in)"
    stem = group_with(groups, "stem.weight", 0, "producer")
    assert {(s.tensor, s.axis) for s in stem.slices if s.role == "consumer"} == {("a.weight", 1), ("b.weight", 1)}


def test_concat_gives_offsets_on_the_consumer():
    model = build(ConcatNet)
    groups = torch_groups(model, torch.randn(1, 3, 4, 4), freeze_outputs=True)
    a = group_with(groups, "a.weight", 0, "producer")
    b = group_with(groups, "b.weight", 0, "producer")
    assert (a.units, slice_of(a, "c.weight", 1).offset) == (4, 0)
    assert (b.units, slice_of(b, "c.weight", 1).offset) == (6, 4)
    assert group_with(groups, "c.weight", 0).frozen == OUTPUT_REASON


def test_self_concat_is_a_repeated_block():
    model = build(SelfConcat)
    groups = torch_groups(model, torch.randn(2, 3))
    hidden = group_with(groups, "a.weight", 0, "producer")
    consumer = slice_of(hidden, "c.weight", 1)
    assert (consumer.repeat, consumer.stride, consumer.block) == (2, 4, 1)
    assert hidden.prunable
    keep = {hidden.id: [1, 3]}
    reference = masked_copy(model, groups, keep)
    prune_torch_model(model, groups, keep)
    assert model.c.weight.shape == (2, 4)
    x = torch.randn(5, 3)
    assert torch.allclose(model(x), reference(x), atol=1e-6)


def test_custom_mlp_with_layernorm():
    model = build(NormMLP)
    groups = torch_groups(model, torch.randn(4, 6))
    assert [g.label for g in groups] == ["norm (+up.in)", "up.out (+down.in)", "down.out"]
    norm, hidden, out = groups
    assert norm.frozen == INPUT_REASON
    assert {(s.tensor, s.role) for s in norm.slices} == {
        ("norm.weight", "channel"), ("norm.bias", "channel"), ("up.weight", "consumer")}
    assert hidden.prunable and hidden.units == 12
    assert [(s.tensor, s.axis, s.role) for s in hidden.slices] == [
        ("up.weight", 0, "producer"), ("up.bias", 0, "channel"), ("down.weight", 1, "consumer")]
    assert out.frozen == OUTPUT_REASON


def test_freeze_outputs_false_and_ignored_layers():
    model = build(NormMLP)
    free = torch_groups(model, torch.randn(4, 6), freeze_outputs=False)
    assert free[2].prunable
    ignored = torch_groups(model, torch.randn(4, 6), ignored_layers=["up"])
    assert ignored[1].frozen == "ignored layer 'up'"
    assert torch_groups(model, torch.randn(4, 6), ignored_layers=[model.up])[1].frozen == "ignored layer 'up'"


def test_channel_mixing_op_is_caught_by_the_nan_probe():
    model = build(ChannelMixing)
    groups = torch_groups(model, torch.randn(1, 3, 4, 4))
    a = group_with(groups, "a.weight", 0, "producer")
    assert a.frozen is not None and a.frozen.startswith("NaN probe: 'c' reads channels [0, 1, 2, 3]")


def test_output_reached_through_an_untraced_call_is_caught_by_the_nan_probe():
    groups = torch_groups(build(SharedTail), torch.randn(2, 3))
    a = group_with(groups, "a.weight", 0, "producer")
    assert a.frozen == "NaN probe: the channels reach the model output through a path torch-pruning did not trace"


def test_grouped_conv_is_frozen_and_depthwise_conv_joins_its_group():
    model = build(GroupedConv)
    groups = torch_groups(model, torch.randn(1, 3, 6, 6))
    assert "grouped convolution 'g'" in group_with(groups, "a.weight", 0).frozen
    after_g = group_with(groups, "g.weight", 0, "producer")
    assert "grouped convolution 'g'" in after_g.frozen
    assert {(s.tensor, s.axis) for s in after_g.slices} >= {("dw.weight", 0), ("dw.bias", 0), ("c.weight", 1)}


def test_split_reaching_part_of_the_units_is_frozen():
    model = build(SplitGate)
    groups = torch_groups(model, torch.randn(1, 3, 4, 4))
    a = group_with(groups, "a.weight", 0, "producer")
    assert "no (offset, block) pattern" in a.frozen


@pytest.mark.parametrize("cls, shape, producer, reason", [
    (BareScale, (1, 3, 4, 4), "a.weight", "bare parameter 'scale'"),
    (InputResidual, (1, 3, 4, 4), "a.weight", "AddBackward0 combines these channels with a tensor outside"),
    (StatsOnlyNorm, (2, 3, 4, 4), "a.weight", "'bn' keeps per-channel running statistics"),
    (Attention, (2, 5, 4), "inp.weight", "'att' (MultiheadAttention) is not a layer"),
])
def test_what_the_plan_format_cannot_name_is_frozen(cls, shape, producer, reason):
    groups = torch_groups(build(cls), torch.randn(*shape))
    assert group_with(groups, producer, 0, "producer").frozen.startswith(reason)


# ---------------------------------------------------------------- pruning


def test_keep_everything_is_numerically_identical():
    model = build(SmallCNN)
    x = torch.randn(2, 3, 8, 8)
    groups = torch_groups(model, x)
    reference = copy.deepcopy(model)
    prune_torch_model(model, groups, {g.id: list(range(g.units)) for g in groups if g.prunable})
    assert torch.equal(model(x), reference(x))
    pruned, original = model.state_dict(), reference.state_dict()
    assert pruned.keys() == original.keys()
    assert all(torch.equal(pruned[k], original[k]) for k in original)


def test_half_of_every_cnn_group_gives_a_working_smaller_model():
    model = build(SmallCNN)
    x = torch.randn(2, 3, 8, 8)
    groups = torch_groups(model, x)
    keep = half_plan(groups)
    conv2_before = model.conv2.weight.detach().clone()
    bn2_mean = model.bn2.running_mean.clone()
    prune_torch_model(model, groups, keep)
    assert tensor_shapes(model) == {
        "conv1.weight": (4, 3, 3, 3), "conv1.bias": (4,), "bn1.weight": (4,), "bn1.bias": (4,),
        "conv2.weight": (8, 4, 3, 3), "conv2.bias": (8,), "bn2.weight": (8,), "bn2.bias": (8,),
        "fc1.weight": (16, 128), "fc1.bias": (16,), "fc2.weight": (10, 16), "fc2.bias": (10,)}
    assert (model.conv1.out_channels, model.conv2.in_channels, model.bn2.num_features, model.fc1.in_features) == (4, 4, 8, 128)
    assert torch.equal(model.bn2.running_mean, bn2_mean[::2])
    assert torch.equal(model.conv2.weight, conv2_before[::2][:, ::2])
    assert model(x).shape == (2, 10)


def test_half_of_the_mlp_hidden_units_equals_masking_them():
    model = build(NormMLP)
    x = torch.randn(5, 6)
    groups = torch_groups(model, x)
    keep = half_plan(groups)
    assert list(keep) == [1]
    reference = masked_copy(model, groups, keep)
    prune_torch_model(model, groups, keep)
    assert (model.up.weight.shape, model.down.weight.shape) == ((6, 6), (6, 6))
    assert (model.up.out_features, model.down.in_features) == (6, 6)
    assert torch.allclose(model(x), reference(x), atol=1e-6)


def test_concat_pruning_cuts_the_consumer_once_in_original_coordinates():
    model = build(ConcatNet)
    x = torch.randn(2, 3, 4, 4)
    groups = torch_groups(model, x)
    keep = {group_with(groups, "a.weight", 0).id: [1, 2], group_with(groups, "b.weight", 0).id: [0, 5]}
    original_c = model.c.weight.detach().clone()
    reference = masked_copy(model, groups, keep)
    prune_torch_model(model, groups, keep)
    assert model.c.weight.shape == (5, 4, 1, 1) and model.c.in_channels == 4
    assert torch.equal(model.c.weight, original_c[:, [1, 2, 4, 9]])
    assert torch.allclose(model(x), reference(x), atol=1e-6)


def test_residual_half_plan_runs():
    model = build(ResidualBlock)
    x = torch.randn(2, 3, 6, 6)
    groups = torch_groups(model, x)
    prune_torch_model(model, groups, half_plan(groups))
    assert (model.a.weight.shape, model.b.weight.shape, model.head.weight.shape) == ((3, 4, 3, 3), (3, 4, 1, 1), (4, 3))
    assert model(x).shape == (2, 4)


def test_plan_replays_from_serialised_groups_without_inputs():
    model = build(SmallCNN)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    groups = torch_groups(model, x)
    keep = half_plan(groups)
    prune_torch_model(model, groups, keep)
    prune_torch_model(twin, [ChannelGroup.from_dict(g.to_dict()) for g in groups], keep)
    assert torch.equal(model(x), twin(x))


def test_magnitude_scores_run_on_torch_groups():
    model = build(SmallCNN)
    groups = torch_groups(model, torch.randn(2, 3, 8, 8))
    tensors = dict(model.named_parameters())
    for group in groups:
        scores = magnitude_scores(group, tensors)
        assert scores.shape == (group.units,) and scores.dtype == torch.float64
        assert torch.isfinite(scores).all() and (scores > 0).all()


@pytest.mark.parametrize("keep, message", [
    ({0: []}, "keep list is empty"),
    ({0: [0, 8]}, "out of range"),
    ({0: [-1]}, "out of range"),
    ({0: [1, 1]}, "repeats"),
    ({3: [0]}, "frozen"),
    ({9: [0]}, "does not exist"),
])
def test_bad_keep_lists_are_refused(keep, message):
    model = build(SmallCNN)
    groups = torch_groups(model, torch.randn(1, 3, 8, 8))
    before = tensor_shapes(model)
    with pytest.raises(CompressError, match=message) as info:
        prune_torch_model(model, groups, {1: [0, 1], **keep})
    gid = next(iter(keep))
    if gid < len(groups):
        assert f"group {gid} ({groups[gid].label})" in str(info.value)
    assert tensor_shapes(model) == before


def test_groups_that_do_not_fit_the_model_are_refused():
    model = build(SmallCNN)
    stale = ChannelGroup(id=0, units=20, slices=[ParamSlice("conv1.weight", 0), ParamSlice("conv2.weight", 1, role="consumer")])
    with pytest.raises(CompressError, match="too small"):
        prune_torch_model(model, [stale], {0: [0]})


def test_embedding_and_transposed_convs_of_a_frozen_model_are_sliced():
    model = build(TokenDecoder).requires_grad_(False)
    ids = torch.randint(0, 10, (2, 5))
    groups = torch_groups(model, ids)
    assert [g.label for g in groups] == ["embed.out (+up.in)", "up.out (+bn, out.in)", "out.out"]
    assert [(s.tensor, s.axis) for s in groups[1].slices][:2] == [("up.weight", 1), ("up.bias", 0)]
    prune_torch_model(model, groups, half_plan(groups))
    assert (model.embed.weight.shape, model.up.weight.shape, model.out.weight.shape) == ((10, 3), (3, 4, 2, 2), (4, 2, 2, 2))
    assert (model.up.in_channels, model.up.out_channels, model.out.in_channels) == (3, 4, 4)
    assert model(ids).shape == (2, 2, 3, 3)
    assert not any(p.requires_grad for p in model.parameters())
