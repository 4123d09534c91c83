"""Checks of a recipe's inputs that need no weights: run before any work, and all of ``--dry-run``.

- the model source exists and is intact (config, safetensors and GGUF headers), and its kind;
- every pass works on that kind of model (each pass declares ``kinds``);
- the output folder may be written (see :mod:`compress.outputs`).

Each problem is a :class:`~compress.errors.CompressError` (exit 2) naming the recipe field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compress.errors import ModelSourceError
from compress.models.families import FUSED_ONNX_FAMILIES, GGUF_FAMILIES, unsupported_decoder
from compress.kinds import a_kind, kind_class, kinds_in_words, source_kind
from compress.outputs import check_output_folder
from compress.recipe import RecipeProblem, RecipeValidationError
from compress.registry import available_passes, get_pass


@dataclass(frozen=True)
class Preflight:
    """What the checks found: the model's kind and type, and what happens to the output folder."""

    kind: str
    model_type: str | None
    output_action: str

    def lines(self) -> list[str]:
        model_type = f" ({self.model_type})" if self.model_type else ""
        return [f"checked   model is {a_kind(self.kind)}{model_type}; every pass fits it; "
                f"output: {self.output_action}"]


def passes_for(kind: str) -> list[str]:
    """The registered passes that work on ``kind``."""
    return [name for name, spec in available_passes().items() if kind in spec.kinds]


def pass_kind_problems(recipe, kind: str, model_type: str | None) -> list[RecipeProblem]:
    """One problem per pass of ``recipe`` that does not work on a ``kind`` model."""
    problems = []
    what = f" ({model_type})" if model_type else ""
    for index, entry in enumerate(recipe.passes):
        kinds = get_pass(entry.name).kinds
        if kind not in kinds:
            fitting = ", ".join(passes_for(kind)) or "none"
            problems.append(RecipeProblem(("passes", index, entry.name), f"'{entry.name}' works on "
                                          f"{kinds_in_words(kinds)}, but model '{recipe.model.source}' is "
                                          f"{a_kind(kind)}{what}; passes for it: {fitting}"))
    return problems


def family_problems(recipe, kind: str, model_type: str | None) -> list[RecipeProblem]:
    """A decoder whose family has no adapter (naming the supported ones), and a GGUF export of a
    family the GGUF writer cannot hold."""
    if kind != "decoder":
        return []
    unsupported = unsupported_decoder(model_type)
    if unsupported:
        return [RecipeProblem(("model",), f"'{recipe.model.source}': {unsupported}")]
    onnx = recipe.export.onnx
    fused_only = onnx.graph == "fused" or ("int4" in onnx.quantize and onnx.int4_method == "gptq")
    if "onnx" in recipe.export.formats and fused_only and model_type not in FUSED_ONNX_FAMILIES + ("pruned_llama",):
        field = ("export", "onnx", "graph" if onnx.graph == "fused" else "int4_method")
        return [RecipeProblem(field, f"the fused graph (which int4_method gptq quantizes) is written for "
                              f"{', '.join(FUSED_ONNX_FAMILIES)} decoders; this model is {model_type!r}: "
                              + ("use auto or traced" if onnx.graph == "fused" else "use hqq or rtn"))]
    if "gguf" in recipe.export.formats and model_type not in GGUF_FAMILIES:
        index = recipe.export.formats.index("gguf")
        return [RecipeProblem(("export", "formats", index), f"GGUF is written for {', '.join(GGUF_FAMILIES)} "
                              f"decoders; this model is {model_type!r}: remove gguf")]
    return []


def export_kind_problems(recipe, kind: str) -> list[RecipeProblem]:
    """Export options that the model's kind cannot write (weight-only ONNX quantization and GGUF: decoders in
    memory)."""
    cls = kind_class(kind, recipe.max_memory is not None)
    where = "out of core" if recipe.max_memory is not None and kind in ("decoder", "moe") else a_kind(kind)
    problems = []
    quantize = recipe.export.onnx.quantize
    if quantize and not cls.quantizes_onnx:
        problems.append(RecipeProblem(("export", "onnx", "quantize"), f"weight-only ONNX quantization is written for "
                                      f"decoders in memory; this run is {where}: remove {', '.join(quantize)}"))
    if "onnx" in recipe.export.formats and recipe.export.onnx.graph == "fused" and recipe.export.onnx.fp16:
        problems.append(RecipeProblem(("export", "onnx", "graph"), "the fused graph is written in float32; with fp16 "
                                      "use graph: auto or traced"))
    if "onnx" in recipe.export.formats and recipe.export.onnx.graph == "fused" and kind != "decoder":
        problems.append(RecipeProblem(("export", "onnx", "graph"), f"the fused graph is written for dense-MLP "
                                      f"decoders; this run is {where}: use auto or traced"))
    onnx = recipe.export.onnx
    if "int4" in onnx.quantize and onnx.int4_method == "gptq":
        if onnx.graph == "traced" or recipe.calibration is None:
            why = "the fused graph (export.onnx.graph: auto or fused)" if onnx.graph == "traced" else "a calibration section"
            problems.append(RecipeProblem(("export", "onnx", "int4_method"), f"gptq needs {why}; or use hqq or rtn"))
    if "gguf" in recipe.export.formats and not cls.writes_gguf:
        index = recipe.export.formats.index("gguf")
        problems.append(RecipeProblem(("export", "formats", index), f"GGUF is written for LLaMA-family decoders in "
                                      f"memory; this run is {where}: remove gguf"))
    return problems


def preflight(recipe, output: Path | None = None, *, overwrite: bool = False, check_output: bool = True) -> Preflight:
    """Check the model source, the passes against its kind, and (``check_output``) the output
    folder; raise the first kind of problem found (model, then passes, then output)."""
    try:
        kind, info = source_kind(recipe.model.source)
    except ModelSourceError as error:
        raise ModelSourceError(f"{recipe.source_name}: model: {error}") from None
    problems = family_problems(recipe, kind, info.model_type)
    problems = problems or pass_kind_problems(recipe, kind, info.model_type) + export_kind_problems(recipe, kind)
    if problems:
        raise RecipeValidationError(recipe.source_name, problems)
    if not check_output:
        return Preflight(kind, info.model_type, "not written")
    out = Path(output) if output is not None else recipe.output_dir
    action = {"new": f"new folder {out}", "replace compress output": f"replaces the earlier compress output {out}",
              "replace empty folder": f"fills the empty folder {out}",
              "overwrite": f"replaces {out} (--overwrite)"}[check_output_folder(out, overwrite=overwrite)]
    return Preflight(kind, info.model_type, action)


__all__ = ["Preflight", "pass_kind_problems", "passes_for", "preflight"]
