"""The pydantic schema of a recipe: one model per section (model, calibration, export with its
ONNX options, evaluate, validate), a validated pass entry, and :class:`Recipe` itself with the
values it resolves (model dtype, output folder, device).

Every section forbids unknown fields. Pass options are not validated here: ``passes`` holds
:class:`PassEntry` objects that :mod:`compress.recipe.pass_list` builds from the registry.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    StrictBool,
    field_validator,
)

from compress.calibration.suites import DEFAULT_SUITE, EVALUATION_SUITES
from compress.devices import resolve_device
from compress.recipe.fields import (
    DEFAULT_GENERATION_PROMPTS,
    DEFAULT_MODEL,
    DType,
    ExportFormat,
    TextSource,
    check_run_name,
    normalize_device,
)
from compress.recipe.problems import show_value
from compress.schema import Seed, StrictModel


class StrictSection(StrictModel):
    """Base of every recipe section: unknown fields are errors, floats are finite."""


class ModelSpec(StrictSection):
    """Which model to compress. ``model: <source>`` is shorthand for ``model: {source: <source>}``."""

    source: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="Hub id (resolved offline), local folder with safetensors, .gguf file, or smollm2-135m.",
    )
    dtype: Optional[DType] = Field(None, description="Weights dtype; overrides the recipe's top-level dtype.")
    trust_remote_code: StrictBool = Field(False, description="Allow the model folder's own Python code to run (true or false).")


class CalibrationSpec(StrictSection):
    """The text fed through the model to score what to prune."""

    source: TextSource = Field("general", description="general (the embedded general-domain mix), "
                               "general:<domain>:train, austen, austen:<novel>, or a .txt/.jsonl file or folder; "
                               "vision encoders: textile.")
    samples: int = Field(256, gt=0, description="Number of random windows (encoders: sentences or images).")
    seqlen: int = Field(128, gt=1, description="Tokens per window (text encoders: most tokens per sentence).")
    seed: Seed = Field(0, description="Seed for the window positions.")
    batch_size: int = Field(16, gt=0, description="Windows per forward pass.")


class OnnxSpec(StrictSection):
    """How the ONNX decoder (with KV cache) is written: ``export.onnx``."""

    opset: int = Field(18, ge=18, le=23, description="ONNX opset of the default domain.")
    fp16: bool = Field(False, description="Write float16 weights, activations and cache.")
    slim: bool = Field(True, description="Simplify the graph with onnxslim (constant folding, dead nodes).")
    optimize: bool = Field(True, description="Run torch.onnx's onnxscript optimizer before onnxslim (about half of "
                           "the export time; the graph runs no faster without it, but SPA on the exported graph "
                           "needs its folded form).")
    graph: Literal["auto", "fused", "traced"] = Field(
        "auto", description="fused: the deployment graph (ONNX Runtime's GroupQueryAttention and "
        "SkipSimplifiedLayerNormalization, one node per layer with its own head counts, written from the weights in "
        "seconds; LLaMA, Mistral and Qwen2 layers in float32); traced: torch.onnx's trace of the model, op for op "
        "(every family, fp16, MoE); auto: fused where it can be written, else traced.")
    last_logits: bool = Field(True, description="fused graphs: logits of the last position only ([batch, 1, vocab]: "
                              "what generation reads); the gates still compare every position, from the same weights.")
    quantize: list[Literal["int8", "int4"]] = Field(
        default_factory=list, description="Also write weight-only quantized decoders (MatMulNBits), one folder each: "
        "onnx-int8/, onnx-int4/. The float graph is still written and validated.")
    block_size: int = Field(32, description="Quantization: input channels per scale (16, 32, 64, 128 or 256).")
    symmetric: bool = Field(False, description="Quantization: symmetric blocks (no zero points) where rounding to "
                            "nearest.")
    int4_method: Literal["hqq", "rtn", "gptq"] = Field(
        "hqq", description="int4: how the decoder linears are quantized: hqq (half-quadratic, data-free; float zero "
        "points, which ONNX Runtime's CPU kernel runs slowly), rtn (round to nearest; fast, least accurate) or gptq "
        "(GPTQ with integer zero points on the linears' input statistics from calibration windows: fast and close to "
        "hqq; needs the fused graph and a calibration section).")
    gptq_windows: int = Field(64, gt=0, description="int4_method gptq: calibration windows whose activations give each "
                              "linear's input second moments (at most calibration.samples).")
    head_bits: Optional[Literal[4, 8]] = Field(
        8, description="int4: bits of the LM head (untied from the embedding); null keeps it in float. int8 graphs "
        "keep the head in float.")
    quantize_embeddings: bool = Field(True, description="int4: quantize the token embedding too (GatherBlockQuantized).")
    accuracy_level: Optional[Literal[0, 1, 2, 3, 4]] = Field(
        None, description="MatMulNBits compute: 4 multiplies int8-quantized activations with the weights (ONNX "
        "Runtime's fast CPU kernels; the model builder's CPU default); 0 dequantizes the weights to float. Default: "
        "4 for int4 graphs, 0 for int8 graphs (int8 activations moved 2 of 5 greedy continuations of the shipped "
        "FLAP-50 graph, which the int8 gate refuses). With hqq (float zero points) ONNX Runtime 1.32's CPU kernel "
        "is slow at any level: int4_method rtn is the fast int4.")

    @field_validator("quantize")
    @classmethod
    def _unique_quantize(cls, quantize: list[str]) -> list[str]:
        return list(dict.fromkeys(quantize))

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, block_size: int) -> int:
        if block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"must be one of 16, 32, 64, 128, 256 (got {block_size})")
        return block_size


class GgufSpec(StrictSection):
    """How the GGUF for llama.cpp is written: ``export.gguf``."""

    dtype: Literal["f32", "f16", "q8_0", "q4_0"] = Field(
        "f16", description="Type of the 2-D weights (a weight whose input width is not a multiple of 32 is written "
        "in f16 when q8_0/q4_0 is asked); norms and biases stay f32.")


class ExportSpec(StrictSection):
    """Where the compressed model and the report go, and in which formats."""

    output: Optional[str] = Field(None, min_length=1, description="Output folder; default outputs/<name>.")
    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["safetensors"], min_length=1, description="Model formats to write."
    )
    onnx: OnnxSpec = Field(default_factory=OnnxSpec, description="ONNX options (used when formats has onnx).")
    gguf: GgufSpec = Field(default_factory=GgufSpec, description="GGUF options (used when formats has gguf).")

    @field_validator("formats")
    @classmethod
    def _unique_formats(cls, formats: list[str]) -> list[str]:
        return list(dict.fromkeys(formats))


class EvaluateSpec(StrictSection):
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


class ValidateSpec(StrictSection):
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
    gguf_atol: float = Field(1.0e-3, ge=0, description="GGUF (f32) in llama.cpp vs PyTorch: max |logit difference| "
                             "on the parity windows.")
    quant_max_ppl_ratio: float = Field(
        1.05, gt=0, description="Quantized ONNX (export.onnx.quantize): max perplexity ratio to the float ONNX graph "
        "on the quantization check windows.")
    quant_min_top1_agreement: float = Field(
        0.75, ge=0, le=1, description="Quantized ONNX: min share of next-token argmax equal to the float graph's.")
    quant_windows: int = Field(8, gt=0, description="Evaluation windows for the quantized-vs-float check.")
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

    class Recipe(StrictSection):
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

        def set_source_name(self, source_name: str) -> None:
            """Record the file (or label) this recipe was read from (see :attr:`source_name`)."""
            self._source_name = source_name

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
