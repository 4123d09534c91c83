"""``compress validate RECIPE|DIR``: re-run the ONNX (float and quantized), GGUF and quality gates on a
finished decoder artifact.

Thresholds come from the recipe (given, or the copy the run saved in the folder), else the
defaults. The folder's report.json/report.md get the new ``validation`` section; a failing folder
gets a ``FAILED`` marker. Only a folder compress wrote is touched.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from compress.devices import resolve_device
from compress.errors import CompressError
from compress.gates import Gate, mark_result
from compress.kinds.decoder import dense_loader, lm_evaluator
from compress.models.loading import load_model
from compress.recipe import EvaluateSpec, ValidateSpec, load_recipe
from compress.report import write_report
from compress.run.runner import RECIPE_COPY
from compress.run.state import RunResult
from compress.validation import quality_gates, validate_gguf, validate_onnx, validate_quantized


def artifact_target(target: Path):
    """(artifact folder, recipe or None) for ``compress validate RECIPE|DIR``."""
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


def read_report(path: Path) -> dict:
    """A run's report.json (a mapping with the dense model's source); CompressError otherwise."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CompressError(f"{path}: not a readable report ({error}); run the recipe again") from None
    if not isinstance(report, dict) or not isinstance(report.get("model"), str):
        raise CompressError(f"{path}: not a compress report (no \"model\" entry); run the recipe again")
    return report


def validate_artifact(target: Path, *, device: str | None = None, progress: bool = True) -> RunResult:
    """Re-check a finished decoder artifact against its gates; see the module docstring."""
    folder, recipe = artifact_target(target)
    report_path = folder / "report.json"
    if not report_path.is_file() or not (folder / "config.json").is_file():
        raise CompressError(f"{folder} is not a compress artifact (report.json and config.json are needed)")
    report = read_report(report_path)
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
    check = evaluator.first_windows() if evaluator is not None else random_windows(model, spec.onnx_windows)
    onnx_dir = folder / "onnx"
    if onnx_dir.is_dir():
        section, onnx_gates = validate_onnx(model, tokenizer, onnx_dir, spec, check, device)
        report.setdefault("onnx", {})["validation"] = section
        gates += onnx_gates
        generations = (section.get("generation") or {}).get("prompts")
        for variant in report.get("onnx_quantized") or []:
            if (folder / variant["dir"]).is_dir():
                windows = (evaluator.spread_windows(spec.quant_windows) if evaluator is not None
                           else random_windows(model, spec.quant_windows))
                variant["validation"], quant_gates = validate_quantized(onnx_dir, folder / variant["dir"], spec,
                                                                        windows, generations, device)
                gates += quant_gates
    gguf_file = folder / "gguf" / "model.gguf"
    if gguf_file.is_file() and report.get("gguf"):
        report["gguf"]["validation"], gguf_gates = validate_gguf(model, tokenizer, gguf_file, spec, check,
                                                                 report["gguf"].get("dtype", "f16"))
        gates += gguf_gates
    previous = [g for g in (report.get("validation") or {}).get("gates", []) if g["name"] == "reload_max_abs_diff"]
    all_gates = previous + [g.to_dict() for g in gates]
    failures = [Gate(**g).failure_message() for g in all_gates if not g["passed"]]
    report["validation"] = {"passed": not failures, "gates": all_gates, "device": device, "revalidated": True}
    rewrite_report(folder, report)
    mark_result(folder, failures)
    return RunResult(output_dir=folder, report=report, passed=not failures, failures=failures)


def random_windows(model, count: int, length: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    return torch.randint(0, vocab, (count, length), generator=generator)


def rewrite_report(folder: Path, report: dict) -> None:
    """Write the report files into a scratch folder, then move each over the old one."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".report-") as scratch:
        write_report(Path(scratch), report)
        for path in Path(scratch).iterdir():
            os.replace(path, folder / path.name)
