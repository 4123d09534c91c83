"""Options shared by the pass declarations (light: no torch, see compress.registry), and helpers
the implementations share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.calibration.suites import MIXED_SOURCES
from compress.schema import Seed
from compress.pruning.settings import PrunerSettings
from compress.recipe import TextSource
from compress.roles import DEFAULT_TARGET_ROLES


class StructuredOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ratio: float = Field(gt=0.0, lt=1.0, description="Fraction of decoder attention+MLP linear weights to remove.")
    gqa: Literal["query_heads", "kv_groups"] = Field(
        "query_heads",
        description="Attention unit: 'query_heads' removes the same number of query heads from every KV group "
        "(KV heads stay); 'kv_groups' removes whole KV heads with their query heads.",
    )
    min_heads: int = Field(1, ge=0, description="Attention units (query-head slots or KV groups) every layer keeps.")
    min_channels: int = Field(1, ge=0, description="MLP channels every layer keeps.")
    skip_layers: list[int] = Field(
        default_factory=list,
        description="Layers never pruned (negative indices count from the end, e.g. [0, -1] keeps the first and last).",
    )
    round_to: int = Field(1, ge=1, description="Round each layer's kept MLP channels to a multiple of this (e.g. 64, 128).")
    block_metric: Literal["angular", "cosine", "mse"] = Field(
        "angular", description="block_budget allocator: how far a block turns its hidden state (mean per token)."
    )
    block_temperature: float = Field(
        0.075, gt=0, description="block_budget allocator: sigmoid temperature on the block distances; smaller "
        "gives more unequal blocks (0.075 matches the reference's 1e4 over 128 × 1024 summed tokens)."
    )

    compensation: Literal["bias", "least_squares", "none"] = Field(
        "none",
        description="After slicing: 'bias' adds the removed units' mean output (FLAP); 'least_squares' refits "
        "o_proj/down_proj on the kept inputs to reproduce the dense output on calibration data (ridge, "
        "closed form in float64) and adds the intercept as a bias; 'none' leaves the consumers as sliced.",
    )
    ls_damp: Union[Annotated[float, Field(gt=0)], Literal["auto"]] = Field(
        1e-2, description="least_squares: ridge strength relative to the mean diagonal of X^T X, or 'auto': per "
        "consumer, the strength (0 to inf) whose refit best reconstructs the dense output on held-out "
        "calibration windows."
    )
    search_evaluations: int = Field(240, ge=1, description="search allocator: candidate allocations tried.")
    search_windows: int = Field(8, ge=1, le=32, description="search allocator: held-out calibration windows the "
                                "KL is measured on.")
    ls_prior: Literal["zero", "dense"] = Field(
        "zero", description="least_squares: the ridge pulls the refit weights toward 'zero' or toward the "
        "'dense' weights (an infinite ridge toward dense is FLAP's bias compensation)."
    )
    ls_target: Literal["consumer", "dense_output"] = Field(
        "consumer", description="least_squares: what the refit reproduces. 'consumer': each consumer's dense output "
        "on the pruned model's inputs. 'dense_output' (needs sequential: true): then down_proj is refit once more "
        "so the block's output follows the dense model's own block output, absorbing the drift carried from the "
        "layers above; its ridge is chosen on held-out calibration windows (docs/general.md)."
    )

    @model_validator(mode="after")
    def _dense_output_needs(self):
        if self.ls_target == "dense_output":
            if self.compensation != "least_squares":
                raise ValueError("ls_target: dense_output needs compensation: least_squares")
            if not getattr(self, "sequential", False):
                raise ValueError("ls_target: dense_output needs sequential: true (it follows the pruned model's "
                                 "stream beside the dense one)")
        return self


AllocatorName = Literal["uniform", "global", "block_budget", "search"]
ALLOCATOR_HELP = (
    "'uniform': every layer loses the same share; 'global': FLAP's standardised global threshold over all "
    "layers; 'block_budget': CFSP's per-block budget from how much each block changes the hidden state; "
    "'search': start from 'global' and move budget between sublayers while the KL to the dense model on "
    "held-out calibration windows falls (Týr-the-Pruner; search_evaluations tries)."
)


def pruner_settings(options: StructuredOptions, **method) -> PrunerSettings:
    """``PrunerSettings`` from the options every structured pass shares; ``method`` gives the rest
    (scorer-specific choices such as ``aggregation`` and ``allocator``) and may override any field."""
    shared = dict(
        ratio=options.ratio,
        gqa=options.gqa,
        min_heads=options.min_heads,
        min_channels=options.min_channels,
        round_to=options.round_to,
        skip_layers=tuple(options.skip_layers),
        compensation=options.compensation,
        ls_damp=None if options.ls_damp == "auto" else options.ls_damp,
        ls_prior=options.ls_prior,
        ls_target=options.ls_target,
        search_evaluations=options.search_evaluations,
        search_windows=options.search_windows,
        block_metric=options.block_metric,
        block_temperature=options.block_temperature,
    )
    shared.update(method)
    return PrunerSettings(**shared)


# ------------------------------------------------------------------------------------ LoRA training
TargetRole = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainOptions(BaseModel):
    """Options of every pass that trains on text (distill, and the LoRA passes below)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int = Field(200, ge=1, description="Optimizer steps.")
    lr: float = Field(2e-4, gt=0.0, description="AdamW learning rate (after warm-up).")
    batch_size: int = Field(4, ge=1, description="Windows per micro-batch.")
    seqlen: int = Field(128, ge=2, description="Tokens per training window.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (gradient accumulation).")
    warmup_steps: float = Field(
        10, ge=0.0, description="Linear learning-rate warm-up: a number of steps, or a fraction of `steps` when below 1."
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="After the warm-up: a 'constant' rate, or a 'cosine' decay to a tenth of lr at "
        "the last step."
    )
    max_grad_norm: Optional[float] = Field(None, gt=0.0, description="Clip the adapters' gradient norm (null: no clipping).")
    source: TextSource = Field("general", description="Training text source (default: the general corpus' "
                               "calibration mix).")
    seed: Seed = Field(0, description="Seeds the adapter initialisation, dropout and the window draws.")
    checkpoint_every: int = Field(50, ge=0, description="Checkpoint every this many steps (0: only at the end).")
    checkpoint_dir: Optional[str] = Field(
        None,
        description="Checkpoint folder; default <cache>/checkpoints/<hash of model weights, text and options> "
        "with <cache> = $COMPRESS_CACHE or ~/.cache/compress. A restarted identical run resumes from it.",
    )

    @field_validator("warmup_steps")
    @classmethod
    def _whole_or_fraction(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError(f"must be a whole number of steps or a fraction below 1 (got {value})")
        return value

    def warmup(self) -> int:
        """The learning-rate warm-up in optimizer steps."""
        if 0 < self.warmup_steps < 1:
            return int(round(self.warmup_steps * self.steps))
        return int(self.warmup_steps)

    def train_spec(self):
        from compress.training import TrainSpec

        return TrainSpec(steps=self.steps, lr=self.lr, batch_size=self.batch_size, seqlen=self.seqlen,
                         grad_accum=self.grad_accum, warmup_steps=self.warmup(), max_grad_norm=self.max_grad_norm,
                         seed=self.seed, schedule=self.lr_schedule)

    def checkpoint_folder(self, fingerprint: str) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir).expanduser()
        from compress.models.loading import cache_root

        return cache_root() / "checkpoints" / fingerprint


class BalanceOption(BaseModel):
    """The ``balance`` option of the passes that distil on a mixed source (distill, lora_recover);
    mixed into a :class:`TrainOptions`, whose ``source`` its check reads."""

    balance: float = Field(0.0, ge=0.0, description="Draw the windows of a mixed source (general) part by part, "
                           "each part in proportion to the model's excess loss over the dense model there, "
                           "to this power (dynamic batch loading; 0: the mix as it is).")

    @model_validator(mode="after")
    def _balance_needs_a_mix(self):
        if self.balance and self.source not in MIXED_SOURCES:
            raise ValueError(f"balance needs a mixed training source ({' or '.join(MIXED_SOURCES)}); "
                             f"source is {self.source!r}")
        return self


class LoRATrainOptions(TrainOptions):
    """Options of every pass that trains LoRA adapters on text (lora_recover, loraprune)."""

    rank: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0.0, description="LoRA alpha; the scaling of an adapter is alpha / its rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input while training.")
    target_modules: list[TargetRole] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_ROLES),
        min_length=1,
        description="Decoder linears that get adapters (q/k/v/o_proj, gate/up/down_proj).",
    )

    @field_validator("target_modules")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists a module twice (got {value})")
        return value


def target_names(ctx, roles: list[str]) -> list[list[str]]:
    """Per layer, the module names (in ``ctx.model``) of the linears with these roles."""
    from compress.training import module_names

    adapter = ctx.adapter()
    per_layer = []
    for i in range(adapter.num_layers):
        linears = {**adapter.attention_linears(i), **adapter.mlp_linears(i)}
        per_layer.append(module_names(ctx.model, [linears[role] for role in roles]))
    return per_layer


def training_ids(ctx, source: str, pass_name: str, *, parts: bool = False):
    """[N] token ids of a text source, read with the model's tokenizer; with ``parts``, the source
    must be a mix (:data:`MIXED_SOURCES`) and the result is a dict of each part's ids [N_part]."""
    from compress.calibration.token_cache import mix_part_ids, source_ids
    from compress.errors import CompressError

    if ctx.tokenizer is None:
        raise CompressError(f"{pass_name} needs the model's tokenizer to read its text source")
    return mix_part_ids(ctx.tokenizer, source) if parts else source_ids(ctx.tokenizer, source)


def count_or_fraction(value):
    """Validator of a ``keep`` option: a whole count >= 1 (returned as int) or a fraction in (0, 1)."""
    if value <= 0:
        raise ValueError(f"must be a count >= 1 or a fraction in (0, 1) (got {value})")
    if value >= 1 and value != int(value):
        raise ValueError(f"a count must be a whole number (got {value})")
    return int(value) if value >= 1 else value


# A ``keep`` option: how many units each layer keeps, as a count or a fraction.
KeepCount = Annotated[Union[int, float], AfterValidator(count_or_fraction)]
