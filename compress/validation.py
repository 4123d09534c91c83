"""Validation gates: the exported artifact against the in-memory model, and the compressed model
against the dense one.

A gate is a measured value, a threshold and a comparison; a failed gate is a failure of the run
(exit 3), never a warning. Three families:

* **ONNX** (when the artifact has an ``onnx/`` decoder):
  ``onnx_graph_valid`` — ``onnx.checker`` and strict shape inference pass;
  ``onnx_logits_allclose`` — ONNX Runtime vs PyTorch logits of the same compressed model over a
  fixed batch (a prefill, then tokens fed one at a time through the KV cache); the value is the
  worst element's |Δ| / (atol + rtol·|reference|), so it passes at ≤ 1;
  ``onnx_present_allclose`` — the same for the returned KV cache;
  ``onnx_generation_identical`` — share of prompts whose greedy continuation from ONNX Runtime equals
  transformers' ``generate`` token for token (must be 1).
* **Quality** (compressed vs dense on the evaluation texts): ``ppl_ratio``, ``top1_agreement``,
  ``mean_kl``.
* **Reload** (in :mod:`compress.pipeline`): the safetensors export reloaded equals the in-memory model.

On CUDA (``onnxruntime-gpu`` and a GPU) ONNX Runtime runs with ``CUDAExecutionProvider`` and
``use_tf32=0``, PyTorch with TF32 off, and the tolerances are multiplied by ``onnx_cuda_factor``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.errors import CompressError

FAILED_MARKER = "FAILED"
RECIPE_COPY = "recipe.yaml"


# ------------------------------------------------------------------------------------- gates
@dataclass
class Gate:
    """One check: ``value op threshold`` must hold. ``detail`` says what was measured, in words."""

    name: str
    value: Any
    threshold: Any
    op: str
    passed: bool
    detail: str = ""

    @classmethod
    def check(cls, name: str, value, threshold, op: str, detail: str = "") -> "Gate | None":
        """A gate, or None when it is off (no threshold) or nothing was measured."""
        if threshold is None or value is None:
            return None
        if op == "<=":
            passed = value <= threshold
        elif op == ">=":
            passed = value >= threshold
        elif op == "==":
            passed = value == threshold
        else:
            raise ValueError(f"unknown comparison {op!r}")
        if isinstance(value, float) and math.isnan(value):
            passed = False
        return cls(name, value, threshold, op, bool(passed), detail)

    def failure_message(self) -> str:
        value = f"{self.value:.6g}" if isinstance(self.value, float) else str(self.value)
        text = f"{self.name} = {value} (must be {self.op} {self.threshold})"
        return f"{text}: {self.detail}" if self.detail else text

    def to_dict(self) -> dict:
        return asdict(self)


def failures_of(gates: list[Gate]) -> list[str]:
    return [g.failure_message() for g in gates if not g.passed]


def quality_gates(evaluation: dict | None, spec) -> list[Gate]:
    """ppl_ratio (worst dataset), geomean_ppl_ratio, top1_agreement and mean_kl gates from an
    evaluation section."""
    if not evaluation:
        return []
    ratios = [d["ppl_ratio"] for d in evaluation["datasets"].values() if d.get("ppl_ratio") is not None]
    worst = f" ({evaluation['worst_dataset']})" if evaluation.get("worst_dataset") else ""
    gates = [
        Gate.check("ppl_ratio", max(ratios) if ratios else None, spec.max_ppl_ratio, "<=",
                   f"pruned / dense perplexity, worst dataset{worst}"),
        Gate.check("geomean_ppl_ratio", evaluation.get("geomean_ppl_ratio"), spec.max_geomean_ppl_ratio, "<=",
                   "geometric mean over the datasets of pruned / dense perplexity"),
        Gate.check("top1_agreement", evaluation.get("top1_agreement"), spec.min_top1_agreement, ">=", "dense vs pruned next-token argmax"),
        Gate.check("mean_kl", evaluation.get("mean_kl"), spec.max_mean_kl, "<=", "mean KL(dense || pruned) per token"),
    ]
    return [g for g in gates if g is not None]


# ------------------------------------------------------------------------------------- numerics
@contextlib.contextmanager
def tf32_disabled():
    """PyTorch matmuls and convolutions in full fp32 on CUDA (restored on exit)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@dataclass
class Closeness:
    """How far ``candidate`` is from ``reference`` (same shape), all in float64.

    ``tolerance_used``: max over elements of |Δ| / (atol + rtol·|reference|); ≤ 1 means allclose.
    ``max_rel``: max |Δ| / |reference| over elements with |reference| > 1e-6. ``cosine``: of the flattened tensors."""

    max_abs: float
    max_rel: float
    cosine: float
    tolerance_used: float

    @classmethod
    def measure(cls, reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float) -> "Closeness":
        ref = np.asarray(reference, dtype=np.float64)
        cand = np.asarray(candidate, dtype=np.float64)
        if ref.shape != cand.shape:
            raise ValueError(f"shapes differ: {ref.shape} vs {cand.shape}")
        diff = np.abs(cand - ref)
        magnitude = np.abs(ref)
        significant = magnitude > 1e-6
        max_rel = float((diff[significant] / magnitude[significant]).max()) if significant.any() else 0.0
        denominator = atol + rtol * magnitude
        used = float((diff / denominator).max()) if atol > 0 or rtol > 0 else (0.0 if diff.max() == 0 else math.inf)
        norms = np.linalg.norm(ref) * np.linalg.norm(cand)
        cosine = float((ref * cand).sum() / norms) if norms > 0 else 1.0
        return cls(float(diff.max()) if diff.size else 0.0, max_rel, cosine, used)

    @classmethod
    def worst(cls, items: list["Closeness"]) -> "Closeness":
        return cls(
            max(c.max_abs for c in items),
            max(c.max_rel for c in items),
            min(c.cosine for c in items),
            max(c.tolerance_used for c in items),
        )


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def logits_parity(model, decoder, windows: torch.Tensor, decode_steps: int, atol: float, rtol: float) -> dict:
    """ONNX Runtime vs PyTorch on ``windows`` [n, T]: prefill of T - decode_steps tokens, then the rest
    one token per step through the cache. PyTorch runs the whole window at once (no cache), so this
    also checks that the graph's cache handling matches a full forward.

    Returns {"prefill", "decode", "logits", "present"}: Closeness dicts (present = every layer's
    key/value after the last step, worst layer), plus the shapes used.
    """
    windows = windows.to(torch.long)
    n, total = windows.shape
    prefill = total - decode_steps
    if prefill < 1:
        raise CompressError(f"parity windows of {total} tokens cannot hold {decode_steps} decode steps")
    with torch.no_grad():
        out = model(input_ids=windows.to(_model_device(model)), use_cache=True)
    reference_logits = out.logits.float().cpu().numpy()
    reference_cache = [(layer.keys.float().cpu().numpy(), layer.values.float().cpu().numpy()) for layer in out.cache.layers]
    del out

    ids = windows.numpy()
    logits, past = decoder(ids[:, :prefill])
    steps = [logits]
    for position in range(prefill, total):
        step_logits, past = decoder(ids[:, position:position + 1], past=past)
        steps.append(step_logits)
    prefill_close = Closeness.measure(reference_logits[:, :prefill], steps[0], atol, rtol)
    sections = {"prefill": prefill_close}
    if decode_steps:
        sections["decode"] = Closeness.measure(reference_logits[:, prefill:], np.concatenate(steps[1:], axis=1), atol, rtol)
    sections["logits"] = Closeness.worst(list(sections.values()))
    present = [
        Closeness.measure(ref, cand, atol, rtol)
        for (ref_k, ref_v), (k, v) in zip(reference_cache, past)
        for ref, cand in ((ref_k, k), (ref_v, v))
    ]
    sections["present"] = Closeness.worst(present)
    result = {name: asdict(value) for name, value in sections.items()}
    result.update(windows=n, tokens=total, prefill_tokens=prefill, decode_steps=decode_steps, atol=atol, rtol=rtol)
    return result


def generation_parity(model, tokenizer, decoder, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy continuations of each prompt from ONNX Runtime and from transformers' ``generate``."""
    from compress.onnx_runtime import greedy_generate, torch_greedy_generate

    results = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reference = torch_greedy_generate(model, ids, max_new_tokens).tokens
        candidate = greedy_generate(decoder, ids, max_new_tokens).tokens
        mismatch = next((i for i, (a, b) in enumerate(zip(reference, candidate)) if a != b), None)
        if mismatch is None and len(reference) != len(candidate):
            mismatch = min(len(reference), len(candidate))
        results.append({
            "prompt": prompt,
            "identical": mismatch is None,
            "first_mismatch": mismatch,
            "torch_tokens": reference,
            "onnx_tokens": candidate,
            "torch_text": tokenizer.decode(reference),
            "onnx_text": tokenizer.decode(candidate),
        })
    return results


def check_graph(folder: Path) -> dict:
    """``onnx.checker`` (full) and strict shape inference on the exported graph."""
    import onnx

    from exporters.onnx import ONNX_FILE

    path = Path(folder) / ONNX_FILE
    result = {"checker": "passed", "shape_inference": "passed", "error": None}
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # noqa: BLE001 - any checker failure is a failed gate, with its message
        result.update(checker="failed", error=f"onnx.checker: {error}")
        return result
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as error:  # noqa: BLE001
        result.update(shape_inference="failed", error=f"shape inference: {error}")
    return result


def validate_onnx(model, tokenizer, folder: Path, spec, windows: torch.Tensor, device: str) -> tuple[dict, list[Gate]]:
    """Every ONNX gate for the decoder in ``folder`` against ``model`` (the compressed PyTorch model).

    ``windows`` [n, T]: token windows for the logits check (the first ``spec.onnx_windows`` are used).
    Returns (the report's ``onnx`` validation section, the gates).
    """
    from compress.onnx_runtime import CUDA_PROVIDER, OrtDecoder

    graph = check_graph(folder)
    gates = [Gate.check("onnx_graph_valid", graph["error"] is None, True, "==", graph["error"] or "onnx.checker and shape inference")]
    decoder = OrtDecoder(folder, device=device, optimization="basic")
    fp16 = decoder.spec.dtype == "float16"
    atol, rtol = (spec.onnx_fp16_atol, spec.onnx_fp16_rtol) if fp16 else (spec.onnx_atol, spec.onnx_rtol)
    on_cuda = decoder.provider == CUDA_PROVIDER
    if on_cuda:
        atol, rtol = atol * spec.onnx_cuda_factor, rtol * spec.onnx_cuda_factor
    section: dict[str, Any] = {
        "provider": decoder.provider,
        "graph_dtype": decoder.spec.dtype,
        "graph": graph,
        "kv_heads": decoder.spec.kv_heads,
    }
    with tf32_disabled():
        parity = logits_parity(model, decoder, windows[: spec.onnx_windows], min(spec.onnx_decode_steps, windows.shape[1] - 1), atol, rtol)
        section["parity"] = parity
        for output in ("logits", "present"):
            stats = parity[output]
            gates.append(Gate.check(
                f"onnx_{output}_allclose", stats["tolerance_used"], 1.0, "<=",
                f"ONNX Runtime ({decoder.provider}) vs PyTorch {output}: max |Δ| {stats['max_abs']:.3g}, "
                f"max rel {stats['max_rel']:.3g}, cosine {stats['cosine']:.8f}; atol {atol:g}, rtol {rtol:g}",
            ))
        if spec.generation_tokens and spec.generation_prompts:
            generations = generation_parity(model, tokenizer, decoder, spec.generation_prompts, spec.generation_tokens)
            section["generation"] = {"max_new_tokens": spec.generation_tokens, "prompts": generations}
            identical = sum(g["identical"] for g in generations) / len(generations)
            differing = [g["prompt"] for g in generations if not g["identical"]]
            detail = f"greedy {spec.generation_tokens}-token continuations equal for {identical:.0%} of prompts"
            if differing:
                detail += "; differ for: " + "; ".join(repr(p) for p in differing)
            gates.append(Gate.check("onnx_generation_identical", identical, 1.0, ">=", detail))
    return section, [g for g in gates if g is not None]


# ------------------------------------------------------------------------------------- markers
def mark_result(folder: Path, failures: list[str]) -> None:
    """Write ``FAILED`` (one failure per line) into a failed artifact; remove a stale one otherwise."""
    marker = Path(folder) / FAILED_MARKER
    if failures:
        marker.write_text("validation failed:\n" + "\n".join(failures) + "\n", encoding="utf-8")
    else:
        marker.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- standalone
def _artifact_target(target: Path):
    """(artifact folder, recipe or None) for ``compress validate RECIPE|DIR``."""
    from compress.recipe import load_recipe

    target = Path(target)
    if target.is_file():
        recipe = load_recipe(target)
        folder = recipe.output_dir
        if not folder.is_dir():
            raise CompressError(f"{target}: its output folder {folder} does not exist; run the recipe first")
        return folder, recipe
    if not target.is_dir():
        raise CompressError(f"no such recipe file or artifact folder: {target}")
    copy = target / RECIPE_COPY
    return target, (load_recipe(copy) if copy.is_file() else None)


def validate_artifact(target: Path, *, device: str | None = None, progress: bool = True):
    """``compress validate``: re-run the ONNX and quality gates on a finished artifact folder.

    Thresholds come from the recipe (given, or the copy the run saved in the folder), else the
    defaults. The folder's report.json/report.md get the new ``validation`` section; a failing
    folder gets a ``FAILED`` marker.
    """
    from compress.models.loading import load_model
    from compress.pipeline import RunResult, dense_loader, lm_evaluator, resolve_device
    from compress.recipe import EvaluateSpec, ValidateSpec
    from compress.report import write_report

    folder, recipe = _artifact_target(target)
    report_path = folder / "report.json"
    if not report_path.is_file() or not (folder / "config.json").is_file():
        raise CompressError(f"{folder} is not a compress artifact (report.json and config.json are needed)")
    report = _read_report(report_path)
    spec = recipe.validate if recipe is not None else ValidateSpec()
    evaluate = recipe.evaluate if recipe is not None else EvaluateSpec()
    device = resolve_device(device or (recipe.device if recipe is not None else "auto"))

    loaded = load_model(str(folder), dtype="float32", device=device, progress=progress)
    model, tokenizer = loaded.model, loaded.tokenizer
    evaluator = lm_evaluator(evaluate, spec, tokenizer, progress)
    gates: list[Gate] = []
    if evaluator is not None:
        load_dense = dense_loader(report["model"], "float32", device)
        if evaluate.dense:
            dense = load_dense()
            evaluator.measure_dense(dense)
            del dense
        report["evaluation"] = evaluator.evaluate(model)
        gates += quality_gates(report["evaluation"], spec)
        generations = evaluator.generations(model, tokenizer, list(spec.generation_prompts), load_dense)
        if generations is not None:
            report["generations"] = generations
    onnx_dir = folder / "onnx"
    if onnx_dir.is_dir():
        check = evaluator.first_windows() if evaluator is not None else _random_windows(model, spec.onnx_windows)
        section, onnx_gates = validate_onnx(model, tokenizer, onnx_dir, spec, check, device)
        report.setdefault("onnx", {})["validation"] = section
        gates += onnx_gates
    previous = [g for g in (report.get("validation") or {}).get("gates", []) if g["name"] == "reload_max_abs_diff"]
    all_gates = previous + [g.to_dict() for g in gates]
    failures = [Gate(**g).failure_message() for g in all_gates if not g["passed"]]
    report["validation"] = {"passed": not failures, "gates": all_gates, "device": device, "revalidated": True}
    _rewrite_report(folder, report, write_report)
    mark_result(folder, failures)
    return RunResult(output_dir=folder, report=report, passed=not failures, failures=failures)


def _read_report(path: Path) -> dict:
    """A run's report.json (a mapping with the dense model's source); CompressError otherwise."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CompressError(f"{path}: not a readable report ({error}); run the recipe again") from None
    if not isinstance(report, dict) or not isinstance(report.get("model"), str):
        raise CompressError(f"{path}: not a compress report (no \"model\" entry); run the recipe again")
    return report


def _random_windows(model, count: int, length: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    return torch.randint(0, vocab, (count, length), generator=generator)


def _rewrite_report(folder: Path, report: dict, write_report) -> None:
    """Write the report files into a scratch folder, then move each over the old one."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".report-") as scratch:
        write_report(Path(scratch), report)
        for path in Path(scratch).iterdir():
            os.replace(path, folder / path.name)
