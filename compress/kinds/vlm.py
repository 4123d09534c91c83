"""LLaVA-style VLMs: image-token pruning before the language model.

load ► dense reference ► token passes ► plan ► export (safetensors + matched processor, ONNX vision
encoder) ► reload check ► ONNX kept-index and value parity ► evaluation ► gates ► report.

Evaluation (no labels needed): the language model's next-token distribution after a fixed prompt
holding one image, dense (N image tokens) vs pruned (k image tokens), over the evaluation images:
top-1 agreement and mean KL(dense ‖ pruned). The dense figures are measured before the passes run.
"""

from __future__ import annotations

import torch

from compress.errors import CompressError, PlanError
from compress.gates import Gate
from compress.kinds.base import ModelKind, base_header
from compress.models.loading import transformers_progress
from compress.pruning.token_schedule import install_llava_token_pruning

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


def reload_max_abs_diff(model, processor, folder, pixels: torch.Tensor) -> float:
    """Reload the export with ``AutoModelForImageTextToText``; largest last-token logit difference."""
    from transformers import AutoModelForImageTextToText

    import compress.models  # noqa: F401  (registers pruned_llava)

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with transformers_progress(False):
        reloaded = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    reloaded = reloaded.to(device).eval()
    want = next_token_logprobs(model, processor, pixels)
    got = next_token_logprobs(reloaded, processor, pixels)
    return float((want - got).abs().max())


class VlmKind(ModelKind):
    name = "vlm"
    words = "vision-language model"
    plan_format = "llava"
    calibration_unit = "images"

    @classmethod
    def describe_evaluation(cls, e) -> str:
        return (f"next token after one image and {PROMPT!r} over {e.items or 64} images of "
                f"{', '.join(e.sources(default=['textile']))}: top-1 agreement and KL, dense vs pruned image tokens")

    @classmethod
    def describe_gates(cls, v, export) -> list[str]:
        gates = [f"reload max|Δ| ≤ {v.reload_max_abs_diff} (next-token log-probabilities)"]
        gates += [f"{n} {op} {t}" for n, op, t in (("top-1 agreement", "≥", v.min_top1_agreement),
                                                    ("mean KL", "≤", v.max_mean_kl)) if t is not None]
        if "onnx" in export.formats:
            gates.append(f"vision ONNX vs PyTorch max|Δ| ≤ {v.onnx_atol:g}; kept-token sets identical")
        return gates

    def __init__(self, state):
        super().__init__(state)
        self.dense_tokens = 0
        self.pixels = self.dense = None

    def load(self) -> None:
        self.load_pretrained()
        self.dense_tokens = int(self.state.model.config.image_seq_length)

    def reference(self) -> None:
        s, e = self.state, self.state.evaluate
        if e is not None:
            with s.stage("dense evaluation"):
                self.pixels = evaluation_pixels(s.model, e)
                self.dense = next_token_logprobs(s.model, s.tokenizer, self.pixels, e.batch_size)

    def plan_header(self) -> dict:
        return {"source": self.state.source, "architecture": type(self.state.model).__name__, "format": "llava",
                "image_tokens": self.dense_tokens}

    def replay(self, plan) -> None:
        s = self.state
        from compress.pruning.token_schedule import is_llava

        if not is_llava(s.model):
            raise PlanError(f"{s.plan_path}: the plan was made on a LLaVA model; {s.source} is {type(s.model).__name__}")
        if self.dense_tokens != plan.model.get("image_tokens"):
            raise PlanError(f"{s.plan_path}: the plan was made for {plan.model.get('image_tokens')} image tokens per "
                            f"image; {s.source} has {self.dense_tokens}")
        for step in plan.steps:
            details = step.details
            install_llava_token_pruning(s.model, details["token_stages"], details.get("post_projector"),
                                        details["token_pruning"].get("proportional_attention", True))

    def report_header(self) -> dict:
        model = self.state.model
        return {**base_header(self.state),
                "params": {"dense": {"total": sum(p.numel() for p in model.parameters())}},
                "image_tokens": {"dense": self.dense_tokens, "pruned": int(model.config.image_seq_length),
                                 "token_pruning": getattr(model.config, "token_pruning", None)}}

    def export(self) -> None:
        from exporters.vlm import export_llava_safetensors

        s = self.state
        with s.stage("export"):
            saved = export_llava_safetensors(s.model, s.tokenizer, s.folder)
            s.files += saved["files"]
            s.report["image_tokens"]["processor"] = saved["processor"]
            s.files += s.plan.save(s.folder / "plan.json")

    def reload_check(self) -> None:
        from exporters.vlm import sample_pixels

        s = self.state
        s.report["reload_max_abs_diff"] = self.gate_reload(
            lambda: reload_max_abs_diff(s.model, s.tokenizer, s.folder, sample_pixels(s.model, batch=4, seed=1)),
            "reloaded vs in-memory next-token log-probabilities (4 seeded images)")

    def onnx(self) -> None:
        s = self.state
        if s.export is None or "onnx" not in s.export.formats:
            return
        from exporters.vlm import VISION_ONNX, export_llava_vision_onnx, llava_vision_parity, sample_pixels

        with s.stage("onnx export"):
            exported = export_llava_vision_onnx(s.model, s.folder / "onnx")
        with s.stage("onnx validation"):
            parity = llava_vision_parity(s.model, s.folder / "onnx" / VISION_ONNX,
                                         sample_pixels(s.model, batch=100, seed=2), device=None)
        s.report["onnx"] = {"files": exported["files"], "nodes": exported["nodes"], "bytes": exported["bytes"],
                            "validation": {"parity": {"image_features": {"max_abs": parity["max_abs_diff"]}},
                                           "kept_index_sets": {"inputs": parity["kept_index_rows"],
                                                               "mismatches": parity["kept_index_mismatches"]},
                                           "provider": parity["provider"]}}
        s.files += [f"onnx/{name}" for name in exported["files"]]
        s.gate(Gate.check("onnx_kept_index_mismatches", parity["kept_index_mismatches"], 0, "<=",
                          "images whose kept token indices differ between ONNX Runtime and PyTorch"),
               Gate.check("onnx_max_abs_diff", parity["max_abs_diff"], s.validate.onnx_atol, "<=",
                          "ONNX Runtime vs PyTorch image features, by kept position"))

    def evaluate(self) -> None:
        s = self.state
        if self.dense is None:
            return
        with s.stage("evaluate"):
            evaluation = {"kind": "vlm_next_token", "images": len(self.pixels), "prompt": PROMPT,
                          **agreement(self.dense, next_token_logprobs(s.model, s.tokenizer, self.pixels,
                                                                      s.evaluate.batch_size))}
        s.report["evaluation"] = evaluation
        s.gate(Gate.check("top1_agreement", evaluation["top1_agreement"], s.validate.min_top1_agreement, ">=",
                          "next-token top-1 agreement, dense vs pruned image tokens"),
               Gate.check("mean_kl", evaluation["mean_kl"], s.validate.max_mean_kl, "<=",
                          "next-token KL(dense || pruned)"))

    def plan_summary(self) -> dict:
        return {"image_tokens": {"dense": self.dense_tokens, "pruned": int(self.state.model.config.image_seq_length)},
                "steps": [{"pass": step.pass_name} for step in self.state.plan.steps]}
