"""``compress run --dry-run``: what a run would do, in the words of its model kind, after the
checks that need no weights (:mod:`compress.preflight`)."""

from __future__ import annotations

from pathlib import Path

from compress.kinds import kind_class
from compress.kinds.base import ONNX_SUBDIR
from compress.preflight import preflight


def describe_recipe(recipe, output: Path | None = None, kind: str = "decoder") -> list[str]:
    """What ``run`` would do with a model of ``kind``, one line per step."""
    out = Path(output) if output else Path(recipe.export.output)
    cls = kind_class(kind, recipe.max_memory is not None)
    lines = [
        f"recipe    {recipe.name}",
        f"model     {recipe.model.source} ({recipe.model.dtype}, device {recipe.device}, seed {recipe.seed})",
    ]
    if recipe.calibration is not None:
        c = recipe.calibration
        lines.append(f"calibrate {c.source}: {c.samples} {cls.calibration_unit} × {c.seqlen} tokens, seed {c.seed}, "
                     f"batch {c.batch_size}")
    for i, entry in enumerate(recipe.passes):
        opts = ", ".join(f"{k}={v}" for k, v in entry.options.model_dump().items())
        lines.append(f"pass {i + 1}    {entry.name}: {opts}")
    execution = cls.describe_execution(recipe)
    if execution:
        lines.append(f"memory    {execution}")
    lines.append(f"export    {', '.join(recipe.export.formats)} → {out}")
    if "onnx" in recipe.export.formats:
        o = recipe.export.onnx
        lines.append(f"onnx      opset {o.opset}, {'fp16' if o.fp16 else 'fp32'}, slim {'on' if o.slim else 'off'}, "
                     f"optimizer {'on' if o.optimize else 'off'} "
                     f"→ {out / ONNX_SUBDIR}")
        for kind in o.quantize:
            four = kind == "int4"
            head = o.head_bits if four else None
            lines.append(f"quantize  {kind} weight-only (MatMulNBits, block {o.block_size}): linears "
                         f"{o.int4_method if four else 'rtn'}, head {'int' + str(head) if head else 'float'}, embedding "
                         f"{'int4' if four and o.quantize_embeddings else 'float'} → {out / ONNX_SUBDIR}-{kind}")
    if "gguf" in recipe.export.formats:
        lines.append(f"gguf      llama.cpp, {recipe.export.gguf.dtype} → {out / 'gguf' / 'model.gguf'}")
    if recipe.evaluate is not None:
        lines.append(f"evaluate  {cls.describe_evaluation(recipe.evaluate)}")
    lines.append(f"validate  {'; '.join(cls.describe_gates(recipe.validate, recipe.export))}")
    return lines


def dry_run_lines(recipe, output: Path | None = None, overwrite: bool = False) -> list[str]:
    """What ``run --dry-run`` prints: the recipe's steps, then what the checks that need no
    weights found (they raise on a missing model, a pass that does not fit it, a refused output)."""
    out = Path(output) if output else Path(recipe.export.output)
    checked = preflight(recipe, out, overwrite=overwrite)
    return describe_recipe(recipe, out, checked.kind) + checked.lines()
