"""Image-token pruning in a tiny random LLaVA (CLIP tower: 3 layers, 32² images, 16 patches; Llama
language model: 2 layers, vocab 120): exactness only, random weights say nothing about quality.

Checked: with nothing removed the rewrite equals stock LLaVA; cls_topk at the feature layer keeps
exactly the patches the layer's [CLS] row attends to most (FasterVLM) and projects them unchanged;
the post-projector DivPrune picks the reference max-min set; the processor saved with the model
writes k placeholders and the reloaded model (also without compress) runs on its output; the ONNX
vision encoder keeps the same index sets as PyTorch on 100 inputs; a recipe runs end to end and
its plan replays bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compress.errors import CompressError
from compress.pruning.token_schedule import install_llava_token_pruning, selection_stages
from exporters.vlm import (
    VISION_ONNX,
    export_llava_safetensors,
    export_llava_vision_onnx,
    llava_vision_parity,
    sample_pixels,
)
from conftest import assert_same_safetensors, run_without_compress
from test_tokens import reference_divprune

IMAGE_TOKEN, PATCHES = 119, 16


def tiny_llava(strategy: str = "default", seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=120),
        image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy=strategy,
        image_seq_length=PATCHES + (strategy == "full"))
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def tiny_processor():
    """A LlavaProcessor built offline: a word-level tokenizer w0..w118 + <image>, 32² CLIP preprocessing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(IMAGE_TOKEN)} | {"<image>": IMAGE_TOKEN}
    words = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", pad_token="w1",
                                        extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                          vision_feature_select_strategy="default")


def image_features(model, pixels):
    with torch.no_grad():
        return torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)


def test_nothing_removed_equals_stock_llava():
    dense, model = tiny_llava(), tiny_llava()
    install_llava_token_pruning(model, [])
    pixels = sample_pixels(model, batch=3)
    assert torch.equal(image_features(model, pixels), image_features(dense, pixels))
    ids = torch.tensor([[3, 4] + [IMAGE_TOKEN] * PATCHES + [5, 6]] * 3)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits,
                           dense(input_ids=ids, pixel_values=pixels).logits)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_cls_topk_keeps_the_feature_layers_most_attended_patches(strategy):
    """FasterVLM: score = mean over heads of the feature layer's [CLS] attention row; the kept tokens
    are that layer's output at those positions, in raster order, through the unchanged projector."""
    dense, model = tiny_llava(strategy), tiny_llava(strategy)
    dense.config.vision_config._attn_implementation = "eager"
    install_llava_token_pruning(model, selection_stages("cls_topk", 0.25, [1], PATCHES))
    assert model.config.image_seq_length == 4 + (strategy == "full")
    pixels = sample_pixels(model, batch=5, seed=3)
    with torch.no_grad():
        tower = dense.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        scores = tower.attentions[1][:, :, 0, 1:].mean(1)                  # layer 1 feeds hidden_states[-2]
        keep = scores.topk(4, dim=-1).indices.sort(-1).values + 1           # tower token indices
        if strategy == "full":
            keep = torch.cat([torch.zeros(5, 1, dtype=torch.long), keep], dim=1)
        chosen = tower.hidden_states[2].gather(1, keep.unsqueeze(-1).expand(-1, -1, 32))
        want = dense.model.multi_modal_projector(chosen)
    torch.testing.assert_close(image_features(model, pixels), want, rtol=0, atol=1e-6)


def test_post_projector_divprune_picks_the_max_min_set_of_projected_tokens():
    dense, model = tiny_llava(), tiny_llava()
    install_llava_token_pruning(model, [], {"method": "divprune", "keep": 6})
    pixels = sample_pixels(model, batch=4, seed=5)
    projected = image_features(dense, pixels)                               # [4, 16, 48]
    chosen = [row[1:] for row in reference_divprune(torch.cat([projected[:, :1], projected], 1), 6, protected=1)]
    want = torch.stack([projected[i, [c - 1 for c in chosen[i]]] for i in range(4)])
    torch.testing.assert_close(image_features(model, pixels), want, rtol=0, atol=0)


def test_llava_token_passes_refuse_what_they_cannot_do():
    from compress.context import PassContext
    from passes.tokens.run import TokenPrunePass

    def run(options):
        return TokenPrunePass(TokenPrunePass.Options(**options)).run(PassContext(model=tiny_llava()))

    with pytest.raises(CompressError, match="not fewer than the 16 patch tokens"):
        run({"keep": 16})
    with pytest.raises(CompressError, match="no tower layers"):
        run({"method": "divprune", "keep": 4, "layers": [0]})
    with pytest.raises(CompressError, match=r"after_layer must be a layer index in \[0, 1\]"):
        install_llava_token_pruning(tiny_llava(), [{"method": "cls_topk", "after_layer": 2, "keep": 4}])
    step = run({"keep": 4, "score_layers": 2})  # VTC-CLS: layers 0 and 1 summed
    assert step.details["tokens_in"] == 16 and step.details["tokens_out"] == 4
    assert step.details["token_stages"] == [{"method": "cls_topk", "after_layer": 1, "keep": 4, "score_layers": [0, 1]}]


def test_export_writes_a_processor_with_k_placeholders_and_reloads(tmp_path, one_thread):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = tiny_llava(), tiny_processor()
    install_llava_token_pruning(model, selection_stages("cls_topk", 0.5, [1], PATCHES))
    saved = export_llava_safetensors(model, processor, tmp_path)
    assert {"pruned_llava.py", "pruned_encoder.py", "token_pruning.py", "processor_config.json"} <= set(saved["files"])
    assert saved["processor"]["num_image_tokens"] == 8 and saved["processor"]["num_additional_image_tokens"] == -7
    assert processor.num_additional_image_tokens == 0  # the caller's processor is not changed
    image = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")
    inputs = AutoProcessor.from_pretrained(tmp_path)(images=[image], text=["<image> w5 w6"], return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 8
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want, got = model(**inputs).logits, reloaded(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    torch.save(dict(inputs), tmp_path / "inputs.pt")
    script = """
import sys
sys.modules["compress"] = None
sys.modules["exporters"] = None
import torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
with torch.no_grad():
    torch.save(model(**torch.load(sys.argv[1] + "/inputs.pt")).logits, sys.argv[1] + "/out.pt")
"""
    run_without_compress(script, [str(tmp_path)], tmp_path.parent)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stages, post", [
    (selection_stages("cls_topk", 0.25, [0, 1], PATCHES, score_layers=1), None),
    ([], {"method": "divprune", "keep": 5}),
    (selection_stages("divprune", 0.5, [1], PATCHES), None),
])
def test_onnx_vision_encoder_keeps_the_same_index_sets_on_100_inputs(stages, post, tmp_path, one_thread):
    model = tiny_llava()
    install_llava_token_pruning(model, stages, post)
    export_llava_vision_onnx(model, tmp_path)
    parity = llava_vision_parity(model, tmp_path / VISION_ONNX, sample_pixels(model, batch=100, seed=7), device="cpu")
    assert parity["kept_index_rows"] == 100 and parity["kept_index_mismatches"] == 0
    assert parity["max_abs_diff"] < 1e-5


def test_llava_recipe_runs_and_its_plan_replays(tmp_path, one_thread):
    """Textile images through the tiny LLaVA: the next-token agreement is measured (not meaningful
    with random weights), the gates pass, and `compress apply` reproduces the folder."""
    pytest.importorskip("conformal_clip_data")

    from compress.run import apply_plan_file, run_recipe
    from compress.recipe import parse_recipe

    folder = tmp_path / "tiny-llava"
    tiny_llava().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    out = tmp_path / "out"
    recipe = parse_recipe({
        "name": "tiny-llava-fastervlm", "model": str(folder), "seed": 0,
        "passes": [{"token_prune": {"method": "cls_topk", "keep": 4}}],
        "export": {"output": str(out), "formats": ["safetensors", "onnx"]},
        "evaluate": {"datasets": ["textile"], "items": 16, "batch_size": 8},
        "validate": {"min_top1_agreement": 0.0},
    })
    result = run_recipe(recipe, progress=False)
    assert result.passed, result.failures
    report = json.loads((out / "report.json").read_text())
    assert report["image_tokens"]["dense"] == 16 and report["image_tokens"]["pruned"] == 4
    assert report["image_tokens"]["processor"]["num_image_tokens"] == 4
    gates = {g["name"]: g for g in report["validation"]["gates"]}
    assert gates["onnx_kept_index_mismatches"]["value"] == 0 and gates["reload_max_abs_diff"]["passed"]
    assert report["evaluation"]["images"] == 16 and 0 <= report["evaluation"]["top1_agreement"] <= 1
    assert (out / "onnx" / VISION_ONNX).is_file()

    replay = apply_plan_file(out / "plan.json", str(folder), tmp_path / "replayed", progress=False)
    assert replay.passed, replay.failures
    assert_same_safetensors(out / "model.safetensors", tmp_path / "replayed" / "model.safetensors")
    assert (json.loads((tmp_path / "replayed" / "config.json").read_text())["token_pruning"]
            == json.loads((out / "config.json").read_text())["token_pruning"])

    with pytest.raises(CompressError, match="magnitude_sp. works on decoders, but model .* is a vision-language model .llava.; passes for it: token_merge, token_prune"):
        run_recipe(parse_recipe({"name": "x", "model": str(folder), "passes": [{"magnitude_sp": {"ratio": 0.2}}],
                                 "calibration": None, "export": {"output": str(tmp_path / "bad")}}), progress=False)
    assert not (tmp_path / "bad").exists()
