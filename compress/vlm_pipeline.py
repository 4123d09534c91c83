"""Recipes whose model is a LLaVA-style VLM: image-token pruning before the language model.

load ► dense reference ► token passes ► plan ► export (safetensors + matched processor, ONNX vision
encoder) ► reload check ► ONNX kept-index and value parity ► evaluation ► gates ► report, in a
staging folder renamed into place at the end, as for decoders and encoders.

Evaluation (no labels needed): the language model's next-token distribution after a fixed prompt
holding one image, dense (N image tokens) vs pruned (k image tokens), over the evaluation images:
top-1 agreement and mean KL(dense ‖ pruned). The dense figures are measured before the passes run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress.errors import CompressError

TOKEN_PASSES = ("token_prune", "token_merge")
PROMPT = "Describe the image."
RANDOM_IMAGES = 16  # evaluation images when the recipe names no image source: seeded standard normal


def prompt_ids(model, tokenizer, image_tokens: int) -> torch.Tensor:
    """[1, T] ids: ``image_tokens`` image placeholders, then the prompt (its tokenizer's ids, or
    fixed ids 1..8 without a tokenizer)."""
    if tokenizer is not None:
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
        text = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    else:
        text = torch.arange(1, 9)
    image = torch.full((image_tokens,), int(model.config.image_token_id))
    return torch.cat([image, text.to(image.dtype)]).unsqueeze(0)


def evaluation_pixels(model, evaluate) -> torch.Tensor:
    """[n, 3, S, S]: the first ``items`` test images of the recipe's image source (textile), or
    seeded random images."""
    size = model.config.vision_config.image_size
    sources = evaluate.sources(default=["textile"]) if evaluate is not None else []
    if sources and sources != ["textile"]:
        raise CompressError(f"evaluate.datasets: a LLaVA model is evaluated on images: textile (got {sources})")
    if sources:
        from compress.calibration.encoder_data import pixels_of, textile_split

        return pixels_of(textile_split().test[: evaluate.items or 64], size)
    return torch.randn(RANDOM_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def next_token_logprobs(model, tokenizer, pixels: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """[n, vocab] float64 log-probabilities of the token after the prompt, one image each."""
    device = next(model.parameters()).device
    ids = prompt_ids(model, tokenizer, int(model.config.image_seq_length))
    out = []
    for batch in pixels.split(batch_size):
        logits = model(input_ids=ids.expand(len(batch), -1).to(device), pixel_values=batch.to(device)).logits
        out.append(logits[:, -1].double().log_softmax(-1).cpu())
    return torch.cat(out)


def agreement(dense: torch.Tensor, pruned: torch.Tensor) -> dict:
    """Top-1 agreement and mean KL(dense ‖ pruned) of two [n, vocab] log-probability tensors."""
    kl = (dense.exp() * (dense - pruned)).sum(-1)
    return {"top1_agreement": float((dense.argmax(-1) == pruned.argmax(-1)).double().mean()),
            "mean_kl": float(kl.mean())}


def image_tokens_section(model, dense_tokens: int) -> dict:
    return {"dense": dense_tokens, "pruned": int(model.config.image_seq_length),
            "token_pruning": getattr(model.config, "token_pruning", None)}


def run_vlm_recipe(recipe, loaded, staging, monitor, device: str, progress: bool):
    """Run ``recipe`` on an already loaded LLaVA model; see the module docstring."""
    import datetime as _dt

    from compress.context import PassContext
    from compress.pipeline import _save_recipe_copy, run_passes
    from compress.plan import Plan

    others = [entry.name for entry in recipe.passes if entry.name not in TOKEN_PASSES]
    if others:
        raise CompressError(f"passes: a LLaVA model takes {' and '.join(TOKEN_PASSES)} (image tokens); "
                            f"{', '.join(others)} cannot run on it")
    model, processor = loaded.model, loaded.tokenizer
    dense_tokens = int(model.config.image_seq_length)
    e = recipe.evaluate
    pixels = dense = None
    if e is not None:
        with monitor.stage("dense evaluation"):
            pixels = evaluation_pixels(model, e)
            dense = next_token_logprobs(model, processor, pixels, e.batch_size)
    ctx = PassContext(model=model, tokenizer=processor, progress=progress)
    plan = Plan(model={"source": recipe.model.source, "architecture": type(model).__name__, "format": "llava",
                       "image_tokens": dense_tokens})
    pass_reports = run_passes(recipe, ctx, plan, monitor)
    report = {"recipe": recipe.name, "model": recipe.model.source,
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
              "dtype": recipe.model.dtype, "seed": recipe.seed,
              "params": {"dense": {"total": sum(p.numel() for p in model.parameters())}},
              "image_tokens": image_tokens_section(model, dense_tokens), "passes": pass_reports}
    _save_recipe_copy(recipe, staging.path)
    evaluation = None
    if dense is not None:
        with monitor.stage("evaluate"):
            evaluation = {"kind": "vlm_next_token", "images": len(pixels), "prompt": PROMPT,
                          **agreement(dense, next_token_logprobs(model, processor, pixels, e.batch_size))}
    return finish_vlm(report, model, processor, plan, staging, monitor, recipe.export, recipe.validate, device,
                      evaluation)


def finish_vlm(report, model, processor, plan, staging, monitor, export, validate, device, evaluation=None):
    """Export, reload check, ONNX parity, gates and report; also the end of `compress apply` for LLaVA plans."""
    from compress.pipeline import conclude
    from compress.validation import Gate
    from exporters.vlm import VISION_ONNX, export_llava_safetensors, export_llava_vision_onnx, llava_vision_parity
    from exporters.vlm import sample_pixels

    files: list[str] = []
    gates: list = []
    with monitor.stage("export"):
        saved = export_llava_safetensors(model, processor, staging.path)
        files += saved["files"]
        report["image_tokens"]["processor"] = saved["processor"]
        files += plan.save(staging.path / "plan.json")
    check_pixels = sample_pixels(model, batch=4, seed=1)
    with monitor.stage("reload check"):
        diff = reload_max_abs_diff(model, processor, staging.path, check_pixels)
        report["reload_max_abs_diff"] = diff
        gates.append(Gate.check("reload_max_abs_diff", diff, validate.reload_max_abs_diff, "<=",
                                "reloaded vs in-memory next-token log-probabilities (4 seeded images)"))
    formats = export.formats if export is not None else ["safetensors"]
    if "onnx" in formats:
        with monitor.stage("onnx export"):
            onnx_export = export_llava_vision_onnx(model, staging.path / "onnx")
        with monitor.stage("onnx validation"):
            parity = llava_vision_parity(model, staging.path / "onnx" / VISION_ONNX,
                                         sample_pixels(model, batch=100, seed=2), device=None)
        report["onnx"] = {"files": onnx_export["files"], "nodes": onnx_export["nodes"], "bytes": onnx_export["bytes"],
                          "validation": {"parity": {"image_features": {"max_abs": parity["max_abs_diff"]}},
                                         "kept_index_sets": {"inputs": parity["kept_index_rows"],
                                                             "mismatches": parity["kept_index_mismatches"]},
                                         "provider": parity["provider"]}}
        files += [f"onnx/{name}" for name in onnx_export["files"]]
        gates.append(Gate.check("onnx_kept_index_mismatches", parity["kept_index_mismatches"], 0, "<=",
                                "images whose kept token indices differ between ONNX Runtime and PyTorch"))
        gates.append(Gate.check("onnx_max_abs_diff", parity["max_abs_diff"], validate.onnx_atol, "<=",
                                "ONNX Runtime vs PyTorch image features, by kept position"))
    if evaluation is not None:
        report["evaluation"] = evaluation
        gates.append(Gate.check("top1_agreement", evaluation["top1_agreement"], validate.min_top1_agreement, ">=",
                                "next-token top-1 agreement, dense vs pruned image tokens"))
        gates.append(Gate.check("mean_kl", evaluation["mean_kl"], validate.max_mean_kl, "<=",
                                "next-token KL(dense || pruned)"))
    return conclude(report, gates, files, staging, monitor, device)


def reload_max_abs_diff(model, processor, folder: Path, pixels: torch.Tensor) -> float:
    """Reload the export with ``AutoModelForImageTextToText``; largest last-token logit difference."""
    from transformers import AutoModelForImageTextToText

    import compress.models  # noqa: F401  (registers pruned_llava)

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    reloaded = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    reloaded = reloaded.to(device).eval()
    want = next_token_logprobs(model, processor, pixels)
    got = next_token_logprobs(reloaded, processor, pixels)
    return float((want - got).abs().max())


def apply_llava_plan(model, processor, plan, plan_path: Path, model_source: str, staging, monitor, device: str,
                     dtype: str):
    """``compress apply`` of a plan made on a LLaVA model: re-install its token stages, then export and check."""
    import datetime as _dt

    from compress.errors import PlanError
    from compress.pipeline import _step_details
    from compress.pruning.token_schedule import install_llava_token_pruning, is_llava
    from compress.recipe import ValidateSpec

    if not is_llava(model):
        raise PlanError(f"{plan_path}: the plan was made on a LLaVA model; {model_source} is {type(model).__name__}")
    if int(model.config.image_seq_length) != plan.model.get("image_tokens"):
        raise PlanError(f"{plan_path}: the plan was made for {plan.model.get('image_tokens')} image tokens per image; "
                        f"{model_source} has {model.config.image_seq_length}")
    dense_tokens = int(model.config.image_seq_length)
    with monitor.stage("apply plan"):
        for step in plan.steps:
            details = step.details
            install_llava_token_pruning(model, details["token_stages"], details.get("post_projector"),
                                        details["token_pruning"].get("proportional_attention", True))
    report = {"recipe": f"apply {plan_path.name}", "model": model_source,
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
              "dtype": dtype, "params": {"dense": {"total": sum(p.numel() for p in model.parameters())}},
              "image_tokens": image_tokens_section(model, dense_tokens),
              "passes": [{"name": s.pass_name, "options": s.options, "wall_s": 0.0, "peak_rss_mb": 0.0,
                          "details": {"replayed": True, **_step_details(s)}} for s in plan.steps]}
    return finish_vlm(report, model, processor, plan, staging, monitor, None, ValidateSpec(), device)
