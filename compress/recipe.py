"""Recipes: the YAML file that says which model to compress, with which passes, and how to check it.

A recipe is parsed into a :class:`Recipe` (pydantic, every model forbids unknown fields). Each
entry of ``passes`` is validated against the ``Options`` model of the pass registered under that
name (:mod:`compress.registry`), so a bad option is reported before anything heavy runs.

A recipe that does not validate raises one :class:`RecipeValidationError` (a
:class:`~compress.errors.RecipeError`) whose message lists every bad field by its YAML path and
says what is allowed::

    recipes/x.yaml: passes[0].flap.ratio: must be > 0 and < 1 (got 1.5)
    recipes/x.yaml: device: must be auto, cpu, cuda or cuda:N (got 'gpu')

Relative paths in a recipe (``export.output``, a local model folder or ``.gguf`` file, a local
text file or folder) are kept as written and resolve against the current working directory of the
process that runs the recipe, not against the recipe file's folder.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import annotated_types
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    StrictBool,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo

from compress.calibration.suites import DEFAULT_SUITE, EVALUATION_SUITES
from compress.devices import check_device_name, resolve_device
from compress.errors import RecipeError
from compress.schema import Seed, StrictModel

DEFAULT_MODEL = "smollm2-135m"
DType = Literal["float32", "float16", "bfloat16"]
EXPORT_FORMATS_AVAILABLE = ("safetensors", "onnx")
EXPORT_FORMATS_PLANNED: tuple[str, ...] = ()
DEFAULT_GENERATION_PROMPTS = (  # one per kind of text of the evaluation suite
    "It was a truth universally acknowledged that",
    "Photosynthesis is the process by which",
    "In his address to Congress, the President said that",
    "def read_config(path):\n",
    "A: Hi! How was your weekend?\nB:",
)
AUSTEN_PREFIX = "austen"
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; a larger file is refused before it is parsed
IMAGE_SOURCES = ("textile",)  # labelled images for vision encoders (compress.calibration.images)


# ----------------------------------------------------------------------------------- checks
def austen_text_names() -> tuple[str, ...]:
    """Names accepted after ``austen:``: ``calibration`` and every novel shipped in ``compress/data``."""
    data_dir = Path(__file__).resolve().parent / "data"
    novels = sorted(p.name.split(".")[0] for p in data_dir.glob("*.txt*"))
    return ("calibration", *novels)


_NOT_IN_RUN_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def check_run_name(value: str) -> str:
    """A run name names one folder (``outputs/<name>``): no path separator or control character,
    not starting with a dot (so not ``.`` or ``..``), not blank, at most 200 characters; raise
    ValueError otherwise."""
    if _NOT_IN_RUN_NAME.search(value) or value.startswith(".") or not value.strip() or len(value) > 200:
        raise ValueError(f"must be a plain name for the folder outputs/<name>: no / or \\, no control characters, "
                         f"not starting with a dot, at most 200 characters; got {show_value(value)}")
    return value


def normalize_device(value: str) -> str:
    """Return ``value`` if it names a device a recipe may ask for; raise ValueError otherwise."""
    return check_device_name(value)


def general_text_names() -> tuple[str, ...]:
    """Text sources of the embedded general corpus (``compress/data/general/manifest.json``):
    ``general``, ``general:train``, and per domain ``general:<d>``, ``general:<d>:test`` and, for a
    domain in the calibration mix, ``general:<d>:train``."""
    import json

    manifest = Path(__file__).resolve().parent / "data" / "general" / "manifest.json"
    try:
        domains = json.loads(manifest.read_text(encoding="utf-8"))["domains"]
    except (OSError, ValueError, KeyError):
        return ("general", "general:train")
    names = ["general", "general:train"]
    for name, info in domains.items():
        names += [f"general:{name}", f"general:{name}:test"]
        if info.get("in_mix"):
            names.append(f"general:{name}:train")
    return tuple(names)


def check_text_source(value: str) -> str:
    """A text source is ``general``, ``general:<domain>[:train]``, ``austen``, ``austen:<name>`` or an
    existing .txt/.jsonl file or folder; vision encoders read the image source ``textile`` instead."""
    if value == AUSTEN_PREFIX or value in IMAGE_SOURCES:
        return value
    if value == "general" or value.startswith("general:"):
        allowed = general_text_names()
        if value not in allowed:
            domains = list(dict.fromkeys(n.split(":")[1] for n in allowed if n.count(":") == 2))
            with_train = [n.split(":")[1] for n in allowed if n.endswith(":train") and n.count(":") == 2]
            raise ValueError(
                f"unknown general-corpus source {show_value(value)}; allowed: general (the calibration mix), "
                f"general:<domain> (test split) with <domain> one of {', '.join(domains)}, or "
                f"general:<domain>:train with <domain> one of {', '.join(with_train)}"
            )
        return value
    if value.startswith(AUSTEN_PREFIX + ":"):
        name = value.split(":", 1)[1]
        allowed = austen_text_names()
        if name not in allowed:
            choices = ", ".join(f"austen:{n}" for n in allowed)
            raise ValueError(f"unknown Austen text {show_value(value)}; allowed: austen, {choices}")
        return value
    if not Path(value).exists():
        raise ValueError(
            f"no such file or folder {show_value(value)} (relative paths resolve against the current "
            "working directory); use general, general:<domain>, austen, austen:<novel>, or a .txt/.jsonl "
            "file or folder of them (vision encoders: textile)"
        )
    return value


def _check_export_format(value: str) -> str:
    if value in EXPORT_FORMATS_AVAILABLE:
        return value
    available = ", ".join(EXPORT_FORMATS_AVAILABLE)
    if value in EXPORT_FORMATS_PLANNED:
        raise ValueError(f"{value} export is not available yet; available now: {available}")
    raise ValueError(f"unknown export format {show_value(value)}; available: {available}")


TextSource = Annotated[str, AfterValidator(check_text_source)]
ExportFormat = Annotated[str, AfterValidator(_check_export_format)]


# ----------------------------------------------------------------------------------- schema
class _Strict(StrictModel):
    """Base of every recipe section: unknown fields are errors, floats are finite."""


class ModelSpec(_Strict):
    """Which model to compress. ``model: <source>`` is shorthand for ``model: {source: <source>}``."""

    source: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="Hub id (resolved offline), local folder with safetensors, .gguf file, or smollm2-135m.",
    )
    dtype: Optional[DType] = Field(None, description="Weights dtype; overrides the recipe's top-level dtype.")
    trust_remote_code: StrictBool = Field(False, description="Allow the model folder's own Python code to run (true or false).")


class CalibrationSpec(_Strict):
    """The text fed through the model to score what to prune."""

    source: TextSource = Field("general", description="general (the embedded general-domain mix), "
                               "general:<domain>:train, austen, austen:<novel>, or a .txt/.jsonl file or folder; "
                               "vision encoders: textile.")
    samples: int = Field(256, gt=0, description="Number of random windows (encoders: sentences or images).")
    seqlen: int = Field(128, gt=1, description="Tokens per window (text encoders: most tokens per sentence).")
    seed: Seed = Field(0, description="Seed for the window positions.")
    batch_size: int = Field(16, gt=0, description="Windows per forward pass.")


class OnnxSpec(_Strict):
    """How the ONNX decoder (with KV cache) is written: ``export.onnx``."""

    opset: int = Field(18, ge=18, le=23, description="ONNX opset of the default domain.")
    fp16: bool = Field(False, description="Write float16 weights, activations and cache.")
    slim: bool = Field(True, description="Simplify the graph with onnxslim (constant folding, dead nodes).")


class ExportSpec(_Strict):
    """Where the compressed model and the report go, and in which formats."""

    output: Optional[str] = Field(None, min_length=1, description="Output folder; default outputs/<name>.")
    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["safetensors"], min_length=1, description="Model formats to write."
    )
    onnx: OnnxSpec = Field(default_factory=OnnxSpec, description="ONNX options (used when formats has onnx).")

    @field_validator("formats")
    @classmethod
    def _unique_formats(cls, formats: list[str]) -> list[str]:
        return list(dict.fromkeys(formats))


class EvaluateSpec(_Strict):
    """Perplexity, next-token accuracy and dense-vs-pruned agreement on held-out text.

    Decoders are measured on a named suite of domains (default ``v2``: Persuasion and the test
    split of every domain of the general corpus); ``datasets`` adds sources to it, or replaces it
    when no ``suite`` is named.
    """

    suite: Optional[str] = Field(
        None, description=f"A named evaluation suite ({', '.join(EVALUATION_SUITES)}); decoders default to "
        f"{DEFAULT_SUITE} when datasets is not given.")
    datasets: Optional[list[TextSource]] = Field(
        None,
        min_length=1,
        description="Text sources to measure (added to the suite; alone when no suite is named).",
    )
    seqlen: int = Field(128, gt=1, description="Tokens per evaluation window.")
    max_windows: int = Field(256, gt=0, description="Non-overlapping windows from the start of each text.")
    batch_size: int = Field(8, gt=0, description="Windows per forward pass.")
    dense: bool = Field(True, description="Also evaluate the dense model (needed for PPL ratios; its figures are "
                        "cached by model and data, so a second run measures only the compressed model).")
    agreement: bool = Field(True, description="Count where dense and pruned agree on the top-1 token.")
    kl: bool = Field(False, description="Also measure the mean KL(dense || pruned) per token; this runs the dense "
                     "model beside the pruned one (on by itself when validate.max_mean_kl is set).")
    continuation_tokens: int = Field(
        48, ge=0, description="Greedy tokens the report shows per validate.generation_prompts prompt, with their "
        "repeated 4-grams and the dense model's perplexity of them (0: none).")
    items: Optional[int] = Field(
        None, gt=1, description="Encoders: held-out sentences per text (default 1000, the first ones) or images "
        "(default: the whole textile test split; with items, the first items of the test and of the probe's train split).")
    pairs: int = Field(200, gt=0, description="Encoders: seeded input pairs for the Spearman rank agreement of similarities.")

    @field_validator("suite")
    @classmethod
    def _known_suite(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in EVALUATION_SUITES:
            raise ValueError(f"unknown suite {show_value(value)}; the suites are {', '.join(EVALUATION_SUITES)}")
        return value

    def sources(self, default: Optional[list[str]] = None) -> list[str]:
        """The text sources to measure: the suite's, then ``datasets`` not already in it; without a
        suite, ``datasets``; with neither, ``default`` (or the default suite)."""
        if self.suite is not None:
            suite = list(EVALUATION_SUITES[self.suite])
            return suite + [d for d in self.datasets or [] if d not in suite]
        if self.datasets:
            return list(self.datasets)
        return list(default) if default is not None else list(EVALUATION_SUITES[DEFAULT_SUITE])

    def suite_name(self) -> Optional[str]:
        """The suite measured: the named one, or the default when neither suite nor datasets is set."""
        return self.suite if self.suite is not None else (None if self.datasets else DEFAULT_SUITE)


class ValidateSpec(_Strict):
    """Gates: the run fails (exit 3) when a measured value is on the wrong side of its threshold."""

    reload_max_abs_diff: Optional[float] = Field(
        1.0e-4, ge=0, description="Max |logit difference| between the in-memory and the reloaded export."
    )
    max_ppl_ratio: Optional[float] = Field(None, gt=0, description="Max pruned/dense perplexity ratio on the "
                                           "worst evaluation domain.")
    max_geomean_ppl_ratio: Optional[float] = Field(
        None, gt=0, description="Max geometric mean over the evaluation domains of the pruned/dense perplexity ratio.")
    min_top1_agreement: Optional[float] = Field(
        None, ge=0, le=1, description="Min fraction of tokens where dense and pruned agree on the top-1 token."
    )
    max_mean_kl: Optional[float] = Field(None, ge=0, description="Max mean KL(dense || pruned) per token.")
    min_embedding_cosine: Optional[float] = Field(
        None, ge=-1, le=1, description="Encoders: min mean cosine between dense and pruned embeddings (worst dataset).")
    onnx_atol: float = Field(1.0e-4, ge=0, description="ONNX vs PyTorch logits: absolute tolerance (fp32, CPU).")
    onnx_rtol: float = Field(1.0e-3, ge=0, description="ONNX vs PyTorch logits: relative tolerance (fp32, CPU).")
    onnx_cuda_factor: float = Field(
        10.0, ge=1, description="Both tolerances are multiplied by this when ONNX Runtime runs on CUDA."
    )
    onnx_fp16_atol: float = Field(0.5, ge=0, description="Absolute logits tolerance of an fp16 graph vs fp32 PyTorch.")
    onnx_fp16_rtol: float = Field(0.05, ge=0, description="Relative logits tolerance of an fp16 graph vs fp32 PyTorch.")
    onnx_windows: int = Field(4, gt=0, description="Evaluation windows in the fixed ONNX parity batch.")
    onnx_decode_steps: int = Field(
        4, ge=0, description="Tokens of each parity window fed one by one through the KV cache after the prefill."
    )
    generation_tokens: int = Field(
        32, ge=0, description="Greedy tokens per prompt that ONNX Runtime must reproduce exactly (0 = skip)."
    )
    generation_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_GENERATION_PROMPTS),
        description="Prompts for the greedy generation check.",
    )


class PassEntry(BaseModel):
    """One validated entry of ``passes``: the registered pass name and its options instance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    options: SerializeAsAny[BaseModel]

    def options_dict(self) -> dict[str, Any]:
        """The options as plain JSON-compatible values."""
        return self.options.model_dump(mode="json")


# The field ``validate`` shadows BaseModel.validate; pydantic warns once when the class is built.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)

    class Recipe(_Strict):
        """A validated recipe. Build it with :func:`load_recipe` or :func:`parse_recipe`.

        After parsing, ``model.dtype`` is always set (the top-level ``dtype`` unless the model mapping
        names one) and ``export.output`` is always set (``outputs/<name>`` unless the recipe names one).
        """

        name: str = Field(min_length=1, description="Run name; default: the recipe file's stem.")
        model: ModelSpec = Field(default_factory=ModelSpec, description="Model source (shorthand or mapping).")
        device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
        dtype: DType = Field("float32", description="Weights dtype unless model.dtype says otherwise.")
        seed: Seed = Field(0, description="Global seed.")
        calibration: Optional[CalibrationSpec] = Field(
            default_factory=CalibrationSpec,
            description="Calibration text; null or false for a calibration-free recipe (data-free passes only).",
        )
        passes: list[PassEntry] = Field(default_factory=list, description="Ordered passes.")
        export: ExportSpec = Field(default_factory=ExportSpec, description="Output folder and formats.")
        evaluate: Optional[EvaluateSpec] = Field(
            default_factory=EvaluateSpec, description="Evaluation; null or false turns it off."
        )
        # Shadows pydantic's deprecated ``BaseModel.validate`` classmethod on purpose: the recipe key is
        # ``validate`` and callers read ``recipe.validate``.
        validate: ValidateSpec = Field(default_factory=ValidateSpec, description="Gates on the evaluation results.")
        max_memory: Optional[ByteSize] = Field(
            None, gt=0, description="Prune out of core, one block at a time, under this much resident memory "
            "(bytes or e.g. 8GiB); see docs/scale.md.",
        )
        offload_dir: Optional[str] = Field(
            None, min_length=1, description="Out of core: keep the calibration activations in this folder on disk.",
        )

        _source_name: str = PrivateAttr(default="<recipe>")

        @field_validator("model", mode="before")
        @classmethod
        def _model_shorthand(cls, value: Any) -> Any:
            if isinstance(value, str):
                return {"source": value}
            if value is not None and not isinstance(value, dict):
                raise ValueError(
                    "must be a model source (hub id, folder, .gguf file or smollm2-135m) or a mapping with "
                    f"source, dtype, trust_remote_code (got {show_value(value)})"
                )
            return value

        @field_validator("name")
        @classmethod
        def _plain_name(cls, value: str) -> str:
            return check_run_name(value)

        @field_validator("device")
        @classmethod
        def _known_device(cls, value: str) -> str:
            return normalize_device(value)

        @field_validator("evaluate", "calibration", mode="before")
        @classmethod
        def _section_off(cls, value: Any) -> Any:
            return None if value is False else value

        # ------------------------------------------------------------------ conveniences
        @property
        def source_name(self) -> str:
            """The file (or label) the recipe was read from, as the user wrote it."""
            return self._source_name

        @property
        def model_source(self) -> str:
            return self.model.source

        @property
        def model_dtype(self) -> str:
            """The dtype to load the weights in: ``model.dtype`` when given, else the top-level ``dtype``."""
            return self.model.dtype or self.dtype

        @property
        def output_dir(self) -> Path:
            """``export.output``, or ``outputs/<name>``; relative to the current working directory."""
            return Path(self.export.output) if self.export.output else Path("outputs") / self.name

        def resolved_device(self) -> str:
            """The device to run on, with ``auto`` resolved."""
            return resolve_device(self.device)

        def with_overrides(self, *, output: str | Path | None = None, device: str | None = None,
                           max_memory: int | None = None, offload_dir: str | Path | None = None) -> "Recipe":
            """A copy with the output folder, device, memory cap and/or offload folder replaced (the
            CLI's ``--output``/``--device``/``--max-memory``/``--offload-dir``)."""
            recipe = self
            if output is not None:
                recipe = recipe.model_copy(update={"export": self.export.model_copy(update={"output": str(output)})})
            if device is not None:
                recipe = recipe.model_copy(update={"device": normalize_device(device)})
            if max_memory is not None:
                recipe = recipe.model_copy(update={"max_memory": ByteSize(max_memory)})
            if offload_dir is not None:
                recipe = recipe.model_copy(update={"offload_dir": str(offload_dir)})
            recipe._source_name = self._source_name
            return recipe

        def to_dict(self) -> dict[str, Any]:
            """The recipe in its YAML form (passes as one-key mappings), JSON-compatible."""
            data = self.model_dump(mode="json", by_alias=True, exclude={"passes"})
            data["passes"] = [{entry.name: entry.options_dict()} for entry in self.passes]
            return data


# ----------------------------------------------------------------------------------- errors
@dataclass(frozen=True)
class RecipeProblem:
    """One bad field: where it is (``loc``, as keys and indices) and what is wrong with it."""

    loc: tuple[str | int, ...]
    message: str

    @property
    def path(self) -> str:
        return yaml_path(self.loc)


class RecipeValidationError(RecipeError):
    """A recipe with one or more bad fields; the message has one line per problem."""

    def __init__(self, source_name: str, problems: list[RecipeProblem]):
        self.source_name = source_name
        self.problems = list(problems)
        lines = [f"{source_name}: {p.path}: {p.message}" if p.loc else f"{source_name}: {p.message}" for p in problems]
        super().__init__("\n".join(lines))


def yaml_path(loc: tuple[str | int, ...]) -> str:
    """``("passes", 0, "flap", "ratio")`` -> ``passes[0].flap.ratio``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def show_value(value: Any) -> str:
    """A short YAML-flavoured rendering of a user's value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"'{shown}'"
    return repr(value)


_BOUND_SYMBOLS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)


def _number(value: Any) -> str:
    return repr(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


def describe_bounds(field: FieldInfo) -> str:
    """The numeric/length constraints of a field in words, e.g. ``> 0 and < 1``; empty if none."""
    parts = []
    for item in field.metadata:
        for cls, attr, symbol in _BOUND_SYMBOLS:
            if isinstance(item, cls):
                parts.append(f"{symbol} {_number(getattr(item, attr))}")
        if isinstance(item, annotated_types.MultipleOf):
            parts.append(f"a multiple of {_number(item.multiple_of)}")
        if isinstance(item, annotated_types.MinLen) and item.min_length:
            parts.append(f"at least {item.min_length} long")
        if isinstance(item, annotated_types.MaxLen):
            parts.append(f"at most {item.max_length} long")
    return " and ".join(parts)


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` (possibly inside ``Optional``), else None."""
    annotation = _strip_optional(annotation)
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return None


def _strip_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _strip_optional(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _strip_optional(members[0])
    return annotation


def _lookup(model_cls: type[BaseModel], loc: tuple[str | int, ...]) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """Follow ``loc`` through nested models/lists: (the model holding the last key, that key's field)."""
    current: Any = model_cls
    holder: type[BaseModel] | None = None
    field: FieldInfo | None = None
    for part in loc:
        current = _strip_optional(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            if typing.get_origin(current) not in (list, tuple) or not args:
                return None, None
            current, field, holder = args[0], None, None
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None, None
        holder = current
        field = _field_by_key(current, part)
        if field is None:
            return holder, None
        current = field.annotation
    return holder, field


def _field_by_key(model_cls: type[BaseModel], key: str) -> FieldInfo | None:
    for name, field in model_cls.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def field_keys(model_cls: type[BaseModel]) -> list[str]:
    """The keys a user writes for a model's fields (aliases where set)."""
    return [field.alias or name for name, field in model_cls.model_fields.items()]


_TYPE_WORDS = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "finite_number": "a finite number (not .inf or .nan)",
}
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of"}


def explain_error(error: dict[str, Any], model_cls: type[BaseModel]) -> str:
    """Turn one pydantic error into ``what is allowed (got X)`` wording."""
    kind = error["type"]
    loc = tuple(error["loc"])
    got = show_value(error.get("input"))
    ctx = error.get("ctx") or {}
    holder, field = _lookup(model_cls, loc)
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        allowed = ", ".join(field_keys(holder)) if holder is not None else ""
        return f"unknown field; allowed here: {allowed}" if allowed else "unknown field"
    if kind in ("literal_error", "enum"):
        choices = literal_choices(field.annotation) if field is not None else None
        allowed = ", ".join(str(c) for c in choices) if choices else ctx.get("expected", "")
        return f"must be one of: {allowed} (got {got})"
    if kind in _BOUND_ERRORS:
        bounds = describe_bounds(field) if field is not None else ""
        if not bounds:
            bounds = " and ".join(
                f"{symbol} {_number(ctx[attr])}" for _, attr, symbol in _BOUND_SYMBOLS if attr in ctx
            )
        return f"must be {bounds} (got {got})"
    if kind in ("too_short", "too_long"):
        limit = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        word = "at least" if kind == "too_short" else "at most"
        return f"must have {word} {limit} item(s) (got {ctx.get('actual_length', '?')})"
    if kind in _TYPE_WORDS:
        return f"must be {_TYPE_WORDS[kind]} (got {got})"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return f"{error.get('msg', kind)} (got {got})"


def problems_from(error: ValidationError, model_cls: type[BaseModel], prefix: tuple = ()) -> list[RecipeProblem]:
    """Every error of a pydantic ValidationError as a RecipeProblem with the YAML path under ``prefix``."""
    return [
        RecipeProblem(loc=prefix + tuple(item["loc"]), message=explain_error(item, model_cls))
        for item in error.errors()
    ]


# ----------------------------------------------------------------------------------- passes
class PassListParser:
    """Validates the raw ``passes`` list against the pass registry, collecting every problem.

    Accepted entry forms (``i`` is the entry's index):
      * ``{flap: {ratio: 0.5}}`` — one key, the pass name; options at ``passes[i].flap.<option>``;
      * ``{flap: null}`` or the bare string ``flap`` — the pass with default options;
      * ``{name: flap, ratio: 0.5}`` — options beside ``name``, at ``passes[i].<option>``.
    """

    def __init__(self) -> None:
        self.entries: list[PassEntry] = []
        self.problems: list[RecipeProblem] = []

    def parse(self, raw_passes: Any) -> "PassListParser":
        if raw_passes is None:
            return self
        if not isinstance(raw_passes, list):
            self._problem(("passes",), f"must be a list of passes (got {show_value(raw_passes)})")
            return self
        for index, raw_entry in enumerate(raw_passes):
            self._parse_entry(index, raw_entry)
        return self

    def _problem(self, loc: tuple, message: str) -> None:
        self.problems.append(RecipeProblem(loc=loc, message=message))

    def _parse_entry(self, index: int, raw_entry: Any) -> None:
        here: tuple = ("passes", index)
        if isinstance(raw_entry, str):
            name, options, options_loc = raw_entry, {}, here
        elif isinstance(raw_entry, dict) and "name" in raw_entry:
            options = {k: v for k, v in raw_entry.items() if k != "name"}
            name, options_loc = raw_entry["name"], here
            if not isinstance(name, str):
                self._problem(here + ("name",), f"must be a pass name (got {show_value(name)})")
                return
        elif isinstance(raw_entry, dict) and len(raw_entry) == 1:
            name, options = next(iter(raw_entry.items()))
            options_loc = here + (str(name),)
            if options is None:
                options = {}
            if not isinstance(options, dict):
                self._problem(options_loc, f"options must be a mapping of option: value (got {show_value(options)})")
                return
        else:
            if isinstance(raw_entry, dict):
                shape = f"a mapping with keys {', '.join(map(str, raw_entry))}"
            else:
                shape = show_value(raw_entry)
            self._problem(
                here,
                f"must be a one-key mapping {{pass_name: {{options}}}}, a mapping with name: and options, "
                f"or a pass name (got {shape})",
            )
            return
        self._validate_options(here, str(name), options, options_loc)

    def _validate_options(self, here: tuple, name: str, options: dict, options_loc: tuple) -> None:
        from compress import registry

        spec = registry.get_pass(name)
        if spec is None:
            self._problem(here, unknown_pass_message(name, list(registry.available_passes())))
            return
        options_model = spec.options
        if options_model.model_config.get("extra") != "allow":
            known = set(field_keys(options_model)) | set(options_model.model_fields)
            unknown = [key for key in options if key not in known]
            allowed = ", ".join(field_keys(options_model)) or "(this pass has no options)"
            for key in unknown:
                self._problem(options_loc + (str(key),), f"unknown option of pass {name}; allowed: {allowed}")
            options = {k: v for k, v in options.items() if k not in unknown}
        try:
            instance = options_model.model_validate(options)
        except ValidationError as error:
            self.problems.extend(problems_from(error, options_model, options_loc))
            return
        self.entries.append(PassEntry(name=name, options=instance))


def unknown_pass_message(name: str, available: list[str]) -> str:
    """``unknown pass 'flpa' (did you mean 'flap'?); available passes: cfsp, flap``."""
    if not available:
        return f"unknown pass {show_value(name)}; no passes are registered"
    close = difflib.get_close_matches(name, available, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown pass {show_value(name)}{hint}; available passes: {', '.join(available)}"


# ----------------------------------------------------------------------------------- loading
def _cross_field_problems(recipe: Recipe) -> list[RecipeProblem]:
    """Gates that need measurements the ``evaluate`` section turns off."""
    problems = []
    gates = recipe.validate
    evaluate = recipe.evaluate
    for gate in ("max_ppl_ratio", "max_geomean_ppl_ratio"):
        if getattr(gates, gate) is not None and (evaluate is None or not evaluate.dense):
            problems.append(RecipeProblem(("validate", gate), "needs the dense perplexity: keep evaluate on and set "
                                          "evaluate.dense: true"))
    for gate in ("min_top1_agreement", "max_mean_kl"):
        if getattr(gates, gate) is not None and (evaluate is None or not evaluate.agreement or not evaluate.dense):
            problems.append(
                RecipeProblem(("validate", gate), "needs evaluate.agreement: true and evaluate.dense: true (and "
                              "evaluate on)")
            )
    return problems


def pass_problems(recipe: Recipe, entries: list[PassEntry]) -> list[RecipeProblem]:
    """Passes that need what the recipe turns off: calibration data (``calibration: null``), or
    the whole model in memory (``max_memory``: see :func:`compress.outofcore.out_of_core_problems`)."""
    from compress import registry

    problems = []
    if recipe.calibration is None:
        for index, entry in enumerate(entries):
            if getattr(registry.get_pass(entry.name).cls, "needs_calibration", False):
                problems.append(RecipeProblem(("passes", index), f"{entry.name} needs calibration data, but the "
                                              "recipe has `calibration: null`; add a calibration section"))
    if recipe.offload_dir is not None and recipe.max_memory is None:
        problems.append(RecipeProblem(("offload_dir",), "only used out of core: set max_memory too"))
    if recipe.max_memory is not None:
        from compress.outofcore import out_of_core_problems

        problems.extend(RecipeProblem(loc, message) for loc, message in out_of_core_problems(recipe, entries))
    return problems


def _default_name(source_name: str) -> str:
    """The recipe file's stem, made a valid run name (no control characters or leading dots)."""
    stem = Path(source_name).stem if source_name and not source_name.startswith("<") else ""
    return _NOT_IN_RUN_NAME.sub("-", stem).lstrip(".")[:200].strip() or "recipe"


def _document_order(data: dict, problems: list[RecipeProblem]) -> list[RecipeProblem]:
    """Sort problems by where their top-level key sits in the file (stable within one key)."""
    keys = list(data)

    def position(problem: RecipeProblem) -> int:
        head = problem.loc[0] if problem.loc else None
        return keys.index(head) if head in keys else len(keys)

    return sorted(problems, key=position)


def parse_recipe(data: Any, source_name: str = "<recipe>") -> Recipe:
    """Validate an already-parsed recipe mapping; raise :class:`RecipeValidationError` listing every problem."""
    if not isinstance(data, dict):
        what = "empty" if data is None else f"{show_value(data)}, not a mapping"
        raise RecipeValidationError(
            source_name, [RecipeProblem((), f"a recipe is a YAML mapping of fields (this one is {what})")]
        )
    body = {key: value for key, value in data.items() if key != "passes"}
    body.setdefault("name", _default_name(source_name))
    problems: list[RecipeProblem] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(body)
    except ValidationError as error:
        problems.extend(problems_from(error, Recipe))
    pass_list = PassListParser().parse(data.get("passes"))
    problems.extend(pass_list.problems)
    if recipe is not None:
        problems.extend(_cross_field_problems(recipe))
        problems.extend(pass_problems(recipe, pass_list.entries))
    if problems:
        raise RecipeValidationError(source_name, _document_order(data, problems))
    assert recipe is not None
    recipe = recipe.model_copy(
        update={
            "passes": pass_list.entries,
            "model": recipe.model.model_copy(update={"dtype": recipe.model_dtype}),
            "export": recipe.export.model_copy(update={"output": str(recipe.output_dir)}),
        }
    )
    recipe._source_name = source_name
    return recipe


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key written twice in one mapping."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            seen = key in first_line
        except TypeError:  # unhashable key: let the stock constructor report it
            continue
        if seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first written on line {first_line[key]})", key_node.start_mark
            )
        first_line[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def parse_yaml(text: str, source_name: str) -> Any:
    """Parse YAML text; a syntax error becomes a RecipeError naming the file, line and column."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = error.problem or error.context or "unreadable"
        raise RecipeError(f"{source_name}: {where}invalid YAML: {problem}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{source_name}: invalid YAML: {error}") from None
    except RecursionError:
        raise RecipeError(f"{source_name}: the YAML is nested too deeply to be a recipe") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file. Every failure is a RecipeError naming the file."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path}")
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder; give the path of a recipe .yaml file")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise RecipeError(f"{path}: cannot be read ({error.strerror or error})") from None
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {size:,} bytes is too large for a recipe (at most {MAX_RECIPE_BYTES:,}); "
                          "a recipe names its data, it does not hold it")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text; a recipe is a YAML file") from None
    except OSError as error:
        raise RecipeError(f"{path}: cannot be read ({error.strerror or error})") from None
    data = parse_yaml(text, str(path))
    try:
        return parse_recipe(data, str(path))
    except RecursionError:
        raise RecipeError(f"{path}: the recipe is nested too deeply") from None


__all__ = [
    "DEFAULT_MODEL",
    "CalibrationSpec",
    "EvaluateSpec",
    "ExportSpec",
    "ModelSpec",
    "PassEntry",
    "Recipe",
    "RecipeProblem",
    "RecipeValidationError",
    "ValidateSpec",
    "describe_bounds",
    "load_recipe",
    "normalize_device",
    "parse_recipe",
    "resolve_device",
]
