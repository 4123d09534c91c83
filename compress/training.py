"""A small, reusable LoRA training loop: attach adapters, train on random text windows, merge.

Used by the ``lora_recover`` pass (recovery fine-tuning after pruning) and meant for any pass that
needs to train low-rank adapters on a causal LM (LoRAPrune, …). The pieces:

    attach_lora(model, spec, seed)            peft LoRA layers injected in place (``inject_adapter_in_model``)
    train_lora(model, ids, spec, train, …)     attach + AdamW on random windows of ``ids``; LoRA stays attached
    train_weights(model, ids, names, train, …) the same loop on the model's own parameters ``names``
                                                (full fine-tuning, e.g. the ``distill`` pass)
    PartSampler                                 windows of a mix's parts, drawn by the model's excess loss over
                                                the teacher on each (``balance``; dynamic batch loading)
    TrainingHooks                               where a pass plugs in (scores before each optimizer step, masks
                                                after it, state saved in the checkpoint), e.g. ``loraprune``
    merge_lora(model) -> factors               detach the adapters, add ``scaling · B @ A`` to each weight
    apply_lora_factors(model, factors)         the same addition from saved factors (plan replay)

Factors are a flat tensor dict (float32, CPU) with three entries per adapted linear, keyed by the
linear's module name in ``model``: ``<name>.lora_A`` [r, in], ``<name>.lora_B`` [out, r] and
``<name>.scaling`` (a 0-d tensor). :func:`merge_lora` and :func:`apply_lora_factors` run the very
same code, so replaying saved factors on the untrained model reproduces the merged weights bit for
bit.

Training is deterministic for a seed: the LoRA initialisation and dropout use the torch RNG seeded
with ``seed`` (inside ``torch.random.fork_rng``, so the caller's global state is left alone), and
the batches come from a private ``random.Random(seed)`` that draws one seed per micro-batch for
:func:`compress.calibration.sources.random_windows`. A run writes a checkpoint every
``checkpoint_every`` optimizer steps and at the end (LoRA weights, optimizer, scheduler, both RNG
states, step, losses; to a temporary file renamed into place), and a restarted run with the same
fingerprint (model weights, token stream, LoRA and training settings) resumes from it and ends on
the same weights as an uninterrupted run. (Checkpoints hold the trained tensors, LoRA factors or
the model's own weights, under one format.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from compress.errors import CompressError
from compress.roles import DEFAULT_TARGET_ROLES

CHECKPOINT_FORMAT = "compress.training-checkpoint/2"
CHECKPOINT_NAME = "checkpoint.pt"
FINGERPRINT_VERSION = "compress.training-run/2"
ADAPTER_NAME = "default"


# ------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class LoRASpec:
    """Which linears get adapters and how big they are.

    Args:
        target_modules: module names in the model (exact names such as
            ``model.layers.0.self_attn.q_proj``, or name suffixes such as ``q_proj``, as peft takes them).
        rank: default rank ``r``.
        alpha: LoRA alpha; each adapter's scaling is ``alpha / r`` of its own rank.
        dropout: dropout on the adapter input during training.
        rank_pattern: exact module name -> rank, overriding ``rank`` for that module.
    """

    target_modules: tuple[str, ...] = DEFAULT_TARGET_ROLES
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def peft_config(self):
        import re

        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            # peft matches a pattern key k against a module name n as re.match(rf"(.*\.)?({k})$", n):
            # escaped exact names therefore select exactly that module.
            rank_pattern={re.escape(name): int(r) for name, r in self.rank_pattern.items()},
            bias="none",
            init_lora_weights=True,
        )


@dataclass(frozen=True)
class TrainSpec:
    """The optimisation: AdamW on ``steps`` optimizer steps of ``grad_accum`` micro-batches each of
    ``batch_size`` random windows of ``seqlen`` tokens, linear warm-up over ``warmup_steps``, then a
    constant learning rate (``schedule: constant``) or a cosine decay to ``MIN_LR_SHARE`` of it at
    the last step (``schedule: cosine``)."""

    steps: int = 200
    lr: float = 2e-4
    batch_size: int = 4
    seqlen: int = 128
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 0
    schedule: str = "constant"  # after the warm-up: "constant" | "cosine"
    loss: str = "next_token"  # "next_token" | "kl": KL(teacher || model) per token (needs a teacher)
    temperature: float = 1.0  # "kl": both distributions at this softmax temperature (loss scaled by T²)
    hidden_weight: float = 0.0  # "kl": plus this times the blocks' hidden-state distance (hidden_state_loss)
    balance: float = 0.0  # "kl", a mixed source: draw its parts by excess loss to this power (PartSampler)
    bf16: bool = False  # forward passes under bfloat16 autocast (CPU: AMX/AVX-512 BF16; CUDA: tensor cores)
    bos: int | None = None  # every window starts with this token (models that expect BOS: Gemma, Llama 3)

    def __post_init__(self):
        for name in ("steps", "batch_size", "seqlen", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise CompressError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.warmup_steps < 0:
            raise CompressError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.schedule not in ("constant", "cosine"):
            raise CompressError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.loss not in ("next_token", "kl"):
            raise CompressError(f"loss must be next_token or kl, got {self.loss!r}")
        if self.hidden_weight < 0:
            raise CompressError(f"hidden_weight must be >= 0, got {self.hidden_weight!r}")
        if self.hidden_weight and self.loss != "kl":
            raise CompressError("hidden_weight needs loss: kl (the teacher's hidden states)")
        if self.balance < 0:
            raise CompressError(f"balance must be >= 0, got {self.balance!r}")
        if self.balance and self.loss != "kl":
            raise CompressError("balance needs loss: kl (the excess loss is measured against the teacher)")


@dataclass
class TrainResult:
    """What a training run did. ``losses[k]`` is the mean loss of optimizer step ``k + 1``;
    ``modules``: the adapted modules (LoRA) or the trained parameters (full fine-tuning)."""

    losses: list[float]
    steps: int
    resumed_from: int
    fingerprint: str
    checkpoint: Path | None
    modules: list[str]
    trainable_params: int
    part_weights: dict[str, float] | None = None  # a balanced run: each part's final draw probability

    def summary(self) -> dict:
        """The step details every training pass reports: parameters trained, the step resumed
        from, and the mean loss of the first and of the last ten steps."""
        head, tail = self.losses[:10], self.losses[-10:]
        return {
            "trainable_params": self.trainable_params,
            "resumed_from_step": self.resumed_from,
            "loss_first_steps": sum(head) / len(head),
            "loss_last_steps": sum(tail) / len(tail),
            **({"part_weights": self.part_weights} if self.part_weights is not None else {}),
        }


# ------------------------------------------------------------------------------------ adapters
def attach_lora(model: nn.Module, spec: LoRASpec, seed: int | None = None) -> list[str]:
    """Inject peft LoRA layers into ``model`` in place; return the adapted module names (sorted).

    With ``seed``, the adapter initialisation uses ``torch.manual_seed(seed)`` inside a forked RNG.
    Only the adapter weights are left trainable (peft's rule); :func:`detach_lora` undoes it.
    """
    from peft import inject_adapter_in_model

    if lora_modules(model):
        raise CompressError("the model already has LoRA adapters attached; merge or detach them first")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model._compress_requires_grad = flags  # restored by detach_lora
    if seed is None:
        inject_adapter_in_model(spec.peft_config(), model, adapter_name=ADAPTER_NAME)
    else:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            torch.manual_seed(seed)
            inject_adapter_in_model(spec.peft_config(), model, adapter_name=ADAPTER_NAME)
    names = sorted(lora_modules(model))
    if not names:
        detach_lora(model)
        raise CompressError(f"no module of the model matches the LoRA targets {list(spec.target_modules)}")
    return names


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers in ``model`` by their (base) module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable adapter parameters, in a fixed order (sorted by name)."""
    found = [(n, p) for n, p in model.named_parameters() if ".lora_" in n and p.requires_grad]
    return sorted(found, key=lambda item: item[0])


def lora_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<name>.lora_A`` [r, in], ``<name>.lora_B`` [out, r], ``<name>.scaling`` [] per adapter
    (float32 CPU copies)."""
    factors: dict[str, torch.Tensor] = {}
    for name, layer in sorted(lora_modules(model).items()):
        if getattr(layer, "fan_in_fan_out", False):
            raise CompressError(f"{name}: fan_in_fan_out LoRA layers are not supported")
        a = layer.lora_A[ADAPTER_NAME].weight.detach()
        b = layer.lora_B[ADAPTER_NAME].weight.detach()
        factors[f"{name}.lora_A"] = a.to(device="cpu", dtype=torch.float32).clone().contiguous()
        factors[f"{name}.lora_B"] = b.to(device="cpu", dtype=torch.float32).clone().contiguous()
        factors[f"{name}.scaling"] = torch.tensor(float(layer.scaling[ADAPTER_NAME]), dtype=torch.float32)
    return factors


def detach_lora(model: nn.Module) -> None:
    """Replace every LoRA layer by its base layer (no merge) and restore ``requires_grad``."""
    for name, layer in sorted(lora_modules(model).items(), key=lambda item: -item[0].count(".")):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    flags = getattr(model, "_compress_requires_grad", None)
    if flags is not None:
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])
        del model._compress_requires_grad


def merge_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """Merge the attached adapters into the weights and detach them: the model becomes a plain model
    again. Returns the factors (see :func:`lora_factors`); ``apply_lora_factors`` on the unmerged
    model with them gives bit-identical weights."""
    factors = lora_factors(model)
    detach_lora(model)
    apply_lora_factors(model, factors)
    return factors


def factor_modules(factors: dict[str, torch.Tensor]) -> list[str]:
    """The module names a factor dict adapts, sorted."""
    return sorted(key[: -len(".lora_A")] for key in factors if key.endswith(".lora_A"))


@torch.no_grad()
def apply_lora_factors(model: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Add ``scaling · (B @ A)`` (computed in float32, cast to the weight's dtype) to the weight of each
    module the factors name, in sorted module order."""
    for name in factor_modules(factors):
        try:
            a, b, scaling = (factors[f"{name}.{part}"] for part in ("lora_A", "lora_B", "scaling"))
        except KeyError as exc:
            raise CompressError(f"LoRA factors for {name} are incomplete (missing {exc})") from None
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CompressError(f"LoRA factors name module {name!r}, which this model does not have") from None
        weight = linear.weight
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise CompressError(
                f"LoRA factors for {name} have shapes B {tuple(b.shape)} @ A {tuple(a.shape)}, "
                f"the weight is {tuple(weight.shape)}"
            )
        delta = (b.float() @ a.float()) * scaling.float()
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype))


# ------------------------------------------------------------------------------------ batches
class WindowSampler:
    """Micro-batches of random windows from one token stream, reproducible from ``seed``.

    A private ``random.Random(seed)`` draws a 63-bit seed per micro-batch for
    :func:`~compress.calibration.sources.random_windows`; its state is saved in checkpoints.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seqlen: int, seed: int, bos: int | None = None):
        self.ids, self.batch_size, self.seqlen, self.bos = ids, batch_size, seqlen, bos
        self.rng = random.Random(seed)

    def next(self) -> torch.Tensor:
        from compress.calibration.sources import random_windows

        return random_windows(self.ids, self.batch_size, self.seqlen, self.rng.getrandbits(63), bos=self.bos)

    def state_dict(self) -> list:
        version, internal, gauss = self.rng.getstate()
        return [version, list(internal), gauss]

    def load_state_dict(self, state: list) -> None:
        version, internal, gauss = state
        self.rng.setstate((int(version), tuple(int(x) for x in internal), gauss))


PART_FLOOR = 0.1  # PartSampler: this share of the draws stays uniform over the parts
PART_DECAY = 0.95  # PartSampler: the excess estimates forget this share per micro-batch (~20 batches)


class PartSampler:
    """Micro-batches of random windows from the parts of a mixed source (several token streams),
    each window's part drawn at random and reweighted as training goes: dynamic batch loading
    (Sheared-LLaMA), with the teacher as the reference.

    Part ``i`` is drawn with probability ``PART_FLOOR / k + (1 - PART_FLOOR) · e_i^power / Σ e^power``,
    ``e_i`` being the decayed mean (``PART_DECAY`` per micro-batch) of the excess loss of its recent
    windows, clipped at 0 (:meth:`observe`: the model's mean next-token NLL minus the teacher's, the
    log of the PPL ratio on that window). Until every part has been seen, and at ``power`` 0, the
    draw is uniform. A private ``random.Random(seed)`` draws the parts and one seed per window for
    :func:`~compress.calibration.sources.random_windows`; its state and the estimates are checkpointed.
    """

    def __init__(self, parts: dict[str, torch.Tensor], batch_size: int, seqlen: int, seed: int,
                 bos: int | None = None, power: float = 1.0):
        self.names = list(parts)
        self.parts = [parts[name] for name in self.names]
        self.batch_size, self.seqlen, self.bos, self.power = batch_size, seqlen, bos, power
        self.rng = random.Random(seed)
        self.sums = [0.0] * len(self.names)  # decayed sum of excess, per part
        self.counts = [0.0] * len(self.names)  # decayed window count, per part
        self.last: list[int] = []  # the part of each window of the last batch

    def weights(self) -> list[float]:
        """The current draw probability of each part (sums to 1)."""
        k = len(self.names)
        if not self.power or not all(self.counts):
            return [1.0 / k] * k
        scores = [max(total / count, 0.0) ** self.power for total, count in zip(self.sums, self.counts)]
        norm = sum(scores)
        if norm <= 0:
            return [1.0 / k] * k
        return [PART_FLOOR / k + (1 - PART_FLOOR) * score / norm for score in scores]

    def next(self) -> torch.Tensor:
        """A micro-batch [batch_size, seqlen]."""
        from compress.calibration.sources import random_windows

        self.last = self.rng.choices(range(len(self.names)), weights=self.weights(), k=self.batch_size)
        return torch.cat([random_windows(self.parts[i], 1, self.seqlen, self.rng.getrandbits(63), bos=self.bos)
                          for i in self.last])

    def observe(self, excess: torch.Tensor) -> None:
        """Record the excess loss [batch_size] of each window of the last batch."""
        self.sums = [PART_DECAY * v for v in self.sums]
        self.counts = [PART_DECAY * v for v in self.counts]
        for i, value in zip(self.last, excess.double().tolist()):
            self.sums[i] += value
            self.counts[i] += 1.0

    def part_weights(self) -> dict[str, float]:
        return {name: round(w, 4) for name, w in zip(self.names, self.weights())}

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "sums": list(self.sums), "counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
        self.sums = [float(v) for v in state["sums"]]
        self.counts = [float(v) for v in state["counts"]]


def make_sampler(ids, train: "TrainSpec") -> WindowSampler | PartSampler:
    """The batches of a run: one token stream [N] (a :class:`WindowSampler`), or a mix's parts as a
    dict of streams (a :class:`PartSampler` drawing them by excess loss to the power ``train.balance``)."""
    if isinstance(ids, dict):
        return PartSampler(ids, train.batch_size, train.seqlen, train.seed, train.bos, train.balance)
    if train.balance:
        raise CompressError("balance needs a mixed text source (its parts as separate token streams)")
    return WindowSampler(ids, train.batch_size, train.seqlen, train.seed, train.bos)


DISTILL_CHUNK = 256  # positions per KL chunk (bounds the float32 temporaries at chunk × vocab)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(teacher || model) at ``temperature`` (times T², so gradients keep
    their scale): logits [b, t, vocab] of the model and of the teacher (no gradient)."""
    return distillation_terms(logits, teacher_logits, temperature)[0]


def distillation_terms(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                       batch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`distillation_loss` and, given the windows ``batch`` [b, t], each window's
    :func:`excess_nll` [b] float64 (no gradient; else None), read from the same chunked log-softmax
    at temperature 1 (at another temperature the excess takes its own).

    The KL runs chunk by chunk (:class:`_ChunkedKL`) and keeps for the backward pass only its
    gradient, one tensor the size and dtype of ``logits``: autograd would keep float32 copies of
    both models' log-probabilities, [b·t, vocab] each, which dominate the memory of a training step.
    """
    b, t, vocab = logits.shape
    labels = None
    if batch is not None:  # the next token of each position; -1 after a window's last
        labels = torch.full((b, t), -1, dtype=torch.long, device=logits.device)
        labels[:, :-1] = batch[:, 1:].to(logits.device)
        labels = labels.reshape(-1)
    loss, gaps = _ChunkedKL.apply(logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab).detach(), labels,
                                  float(temperature))
    excess = gaps.view(b, t).sum(1) / max(t - 1, 1) if batch is not None else None
    return loss, excess


class _ChunkedKL(torch.autograd.Function):
    """``T² · mean_rows KL(softmax(teacher/T) || softmax(rows/T))`` over rows [n, vocab], DISTILL_CHUNK
    rows at a time. Its gradient, ``T · (p − q) / n`` with p, q the two softmaxes, is computed in the
    forward pass and saved in the dtype of ``rows``. With ``labels`` [n] (-1: no next token), the
    second output is each row's next-token NLL of the model minus the teacher's [n] float64 (else empty)."""

    @staticmethod
    def forward(ctx, rows, teacher_rows, labels, temperature):
        n = rows.shape[0]
        grad = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        gaps = torch.zeros(n if labels is not None else 0, dtype=torch.float64, device=rows.device)
        total = torch.zeros((), dtype=torch.float64, device=rows.device)
        for start in range(0, n, DISTILL_CHUNK):
            part = slice(start, start + DISTILL_CHUNK)
            logp = torch.log_softmax(_scaled(rows[part], temperature), dim=-1)
            target = torch.log_softmax(_scaled(teacher_rows[part], temperature), dim=-1)
            q = target.exp()
            total += (q * (target - logp)).sum(dtype=torch.float64)
            if grad is not None:
                grad[part] = (logp.exp() - q).mul_(temperature / n)
            if labels is not None:
                gaps[part] = _nll_gap(logp, target, rows[part], teacher_rows[part], labels[part], temperature)
        ctx.mark_non_differentiable(gaps)
        ctx.save_for_backward(grad)
        return (total * temperature**2 / n).float(), gaps

    @staticmethod
    def backward(ctx, grad_loss, grad_gaps):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None


def _scaled(rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """``rows / temperature`` in float32 (no copy of float32 rows at temperature 1)."""
    rows = rows.float()
    return rows if temperature == 1 else rows / temperature


def _nll_gap(logp: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, teacher_rows: torch.Tensor,
             labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per position [n], the model's next-token NLL minus the teacher's (0 where ``labels`` is -1),
    from the log-probabilities [n, vocab] at ``temperature`` when it is 1, else from the raw rows."""
    if temperature != 1:
        logp, target = (torch.log_softmax(r.float(), dim=-1) for r in (rows, teacher_rows))
    index = labels.clamp_min(0).unsqueeze(1)
    gap = (target.gather(1, index) - logp.gather(1, index)).squeeze(1).double()
    return torch.where(labels >= 0, gap, torch.zeros_like(gap))


def hidden_state_loss(hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over the decoder blocks' outputs and over positions of ``‖h − h_T‖² / ‖h_T‖²``: each a
    tuple of [b, t, hidden] (the embeddings first, as ``output_hidden_states`` gives them; skipped).

    Width pruning keeps the residual stream's size, so the pruned model's block outputs compare with
    the dense model's directly. The distance is relative per position, so a block whose stream is
    large (deep layers, the first token's massive activations) weighs no more than the others.
    """
    if len(hidden) != len(teacher_hidden):
        raise CompressError(f"the model gives {len(hidden)} hidden states, the teacher {len(teacher_hidden)}")
    total = hidden[0].new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden[1:], teacher_hidden[1:]):
        t = t.float().to(h.device)
        err = (h.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)
        total = total + err.mean()
    return total / max(len(hidden) - 1, 1)


def excess_nll(logits: torch.Tensor, teacher_logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Per window, the model's mean next-token NLL minus the teacher's: logits [b, t, vocab] of
    both and the windows [b, t] -> [b] float64 (no gradient), the log of the PPL ratio per window.
    Training reads it from the KL's log-softmax instead (:func:`distillation_terms`); this is the reference."""
    with torch.no_grad():
        labels = batch[:, 1:].to(logits.device)
        out = []
        for row, teacher_row, target in zip(logits[:, :-1], teacher_logits[:, :-1], labels):
            model_nll = torch.nn.functional.cross_entropy(row.float(), target)
            teacher_nll = torch.nn.functional.cross_entropy(teacher_row.float().to(row.device), target)
            out.append((model_nll - teacher_nll).double())
        return torch.stack(out)


def training_loss(model: nn.Module, batch: torch.Tensor, train: TrainSpec, teacher: nn.Module | None) -> torch.Tensor:
    """The loss of one micro-batch [b, t]: next-token cross-entropy, or KL to ``teacher`` (plus
    ``hidden_weight`` × :func:`hidden_state_loss` when that is set)."""
    return step_loss(model, batch, train, teacher)[0]


def step_loss(model: nn.Module, batch: torch.Tensor, train: TrainSpec,
              teacher: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`training_loss` and, for a balanced run (``train.balance``), each window's
    :func:`excess_nll` [b] (else None)."""
    device_type = batch.device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=train.bf16)
    if train.loss == "next_token":
        with autocast:
            return model(input_ids=batch, labels=batch, use_cache=False).loss.float(), None
    if teacher is None:
        raise CompressError("loss: kl needs the dense model as teacher")
    hidden = bool(train.hidden_weight)
    with torch.no_grad(), autocast:
        target = teacher(input_ids=batch.to(next(teacher.parameters()).device), use_cache=False,
                         output_hidden_states=hidden)
    with autocast:
        out = model(input_ids=batch, use_cache=False, output_hidden_states=hidden)
    loss, excess = distillation_terms(out.logits, target.logits.to(out.logits.device), train.temperature,
                                      batch if train.balance else None)
    if hidden:
        loss = loss + train.hidden_weight * hidden_state_loss(out.hidden_states, target.hidden_states)
    return loss, excess


MIN_LR_SHARE = 0.1  # schedule cosine: the learning rate of the last step, as a share of ``lr``


def lr_factor(warmup_steps: int, steps: int = 0, schedule: str = "constant") -> Callable[[int], float]:
    """Learning-rate factor of optimizer step ``s`` (0-based): ``(s + 1) / warmup`` during warm-up;
    then 1 (constant), or cosine from 1 at the end of the warm-up to ``MIN_LR_SHARE`` at step ``steps - 1``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or steps - 1 <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (steps - 1 - warmup_steps))
        return MIN_LR_SHARE + (1 - MIN_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ------------------------------------------------------------------------------------ fingerprint
def model_state_digest(model: nn.Module) -> str:
    """blake2b of every tensor of ``model.state_dict()`` (names, dtypes, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def run_fingerprint(model: nn.Module, ids: torch.Tensor, trained: LoRASpec | list[str], train: TrainSpec,
                    extra: dict | None = None) -> str:
    """What identifies a training run: the model weights (before adapters), the token stream, what is
    trained (a LoRA spec, or the names of the model's own parameters) and every setting that changes
    the result. Checkpoints resume only into a run with the same one."""
    h = hashlib.blake2b(digest_size=16)
    settings = {
        "version": FINGERPRINT_VERSION,
        "trained": dataclasses.asdict(trained) if isinstance(trained, LoRASpec) else sorted(trained),
        "train": dataclasses.asdict(train),
        "extra": extra or {},
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(model_state_digest(model).encode())
    streams = ids.items() if isinstance(ids, dict) else [("", ids)]
    for name, stream in streams:  # a mix's parts: each name and stream, in order
        h.update(name.encode())
        h.update(torch.as_tensor(stream, dtype=torch.long).contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ checkpoints
def _cuda_devices(model: nn.Module) -> list[int]:
    devices = {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    return sorted(devices)


def _rng_states(model: nn.Module) -> dict:
    states = {"torch": torch.get_rng_state()}
    for index in _cuda_devices(model):
        states[f"cuda:{index}"] = torch.cuda.get_rng_state(index)
    return states


def _restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    for key, state in states.items():
        if key.startswith("cuda:"):
            torch.cuda.set_rng_state(state, int(key.split(":")[1]))


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    """The checkpoint at ``path`` if it belongs to the run ``fingerprint``; else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: start afresh (it will be overwritten)
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
        return None
    return state


# ------------------------------------------------------------------------------------ training
class TrainingHooks:
    """Points where a pass plugs into :func:`train_lora` (every method is optional to override).

    The order within one optimizer step ``s`` (1-based): the micro-batches' forward and backward,
    gradient clipping, ``on_pre_optimizer_step(model, s)`` (final gradients, before the update),
    ``optimizer.step()``, ``on_step_end(model, s, loss)``, then the checkpoint (which stores
    ``state_dict()``). ``on_train_begin`` runs once after the adapters are attached and any
    checkpoint was restored (``load_state_dict`` first).
    """

    def on_train_begin(self, model: nn.Module) -> None:
        pass

    def on_pre_optimizer_step(self, model: nn.Module, step: int) -> None:
        pass

    def on_step_end(self, model: nn.Module, step: int, loss: float) -> None:
        pass

    def status(self) -> str:
        """Extra text for the progress bar (e.g. the current sparsity)."""
        return ""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _progress(enabled: bool):
    from rich.progress import Progress, TextColumn

    from compress.progress import bar_columns

    columns = bar_columns(TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[status]}"))
    return Progress(*columns, transient=True, disable=not enabled)


def train_lora(
    model: nn.Module,
    ids: torch.Tensor,
    lora: LoRASpec,
    train: TrainSpec,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    fingerprint: str | None = None,
    progress: bool = True,
    description: str = "LoRA training",
    callback: Callable[[int, float], None] | None = None,
    hooks: TrainingHooks | None = None,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Attach LoRA to ``model`` and train it on random windows of the token stream ``ids`` [N].

    The adapters stay attached when this returns (call :func:`merge_lora` to fold them in, or
    :func:`detach_lora` to drop them); if training raises, they are detached again. The model is in
    train mode while training and back in its previous mode afterwards.

    Args:
        checkpoint_dir: folder for ``checkpoint.pt``; None: no checkpoints, no resume.
        checkpoint_every: write a checkpoint every this many optimizer steps (and after the last);
            0 writes only the final one.
        fingerprint: the run's identity (default :func:`run_fingerprint`); a checkpoint with another
            fingerprint is ignored and overwritten.
        callback: ``callback(step, loss)`` after every optimizer step (and after its checkpoint).
        hooks: a :class:`TrainingHooks` whose state is checkpointed with the adapters.
        teacher: with ``train.loss == "kl"``, the model whose next-token distributions are the
            targets (e.g. the dense model; it stays in eval mode and gets no gradients).
    """
    ids, fingerprint, checkpoint = _run_identity(model, ids, lora, train, fingerprint, checkpoint_dir)
    with _training_session(model, train.seed):
        modules = attach_lora(model, lora)
        try:
            named = lora_parameters(model)
            for _, p in named:  # adapters train in float32 whatever the base dtype
                p.data = p.data.float()
            result = _train_loop(model, named, ids, train, fingerprint, checkpoint, checkpoint_every, progress,
                                 description, callback, hooks or TrainingHooks(), teacher)
        except BaseException:
            detach_lora(model)
            raise
    result.modules = list(modules)
    return result


def train_weights(
    model: nn.Module,
    ids: torch.Tensor,
    names: list[str],
    train: TrainSpec,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    fingerprint: str | None = None,
    progress: bool = True,
    description: str = "fine-tuning",
    callback: Callable[[int, float], None] | None = None,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Train the model's own parameters ``names`` (full fine-tuning; every other parameter frozen
    meanwhile) with the same loop, batches, checkpoints and resume as :func:`train_lora`. The
    parameters must be float32 (AdamW updates in half precision lose most small steps); the
    forward passes may still run under ``train.bf16`` autocast. ``requires_grad`` and the train/eval
    mode are restored afterwards."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing or not names:
        raise CompressError(f"no parameter named {missing[:3]} in the model" if missing else "nothing to train")
    half = sorted({str(params[n].dtype) for n in names if params[n].dtype != torch.float32})
    if half:
        raise CompressError(f"fine-tuning trains float32 weights; the model's are {', '.join(half)} "
                            "(load it with dtype: float32)")
    ids, fingerprint, checkpoint = _run_identity(model, ids, list(names), train, fingerprint, checkpoint_dir)
    flags = {n: p.requires_grad for n, p in params.items()}
    chosen = set(names)
    try:
        for n, p in params.items():
            p.requires_grad_(n in chosen)
        with _training_session(model, train.seed):
            named = sorted(((n, params[n]) for n in chosen), key=lambda item: item[0])
            result = _train_loop(model, named, ids, train, fingerprint, checkpoint, checkpoint_every, progress,
                                 description, callback, TrainingHooks(), teacher)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    result.modules = sorted(chosen)
    return result


def _run_identity(model: nn.Module, ids, trained: LoRASpec | list[str], train: TrainSpec, fingerprint: str | None,
                  checkpoint_dir: str | Path | None) -> tuple[torch.Tensor | dict[str, torch.Tensor], str, Path | None]:
    """A run's token stream as a flat long tensor [N] (a mix's parts: a dict of them), its fingerprint
    (:func:`run_fingerprint` unless given; taken before any adapter is attached) and its checkpoint
    file (None: no checkpoints)."""
    if isinstance(ids, dict):
        ids = {name: torch.as_tensor(stream, dtype=torch.long).reshape(-1) for name, stream in ids.items()}
    else:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if fingerprint is None:
        fingerprint = run_fingerprint(model, ids, trained, train)
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    return ids, fingerprint, checkpoint


@contextmanager
def _training_session(model: nn.Module, seed: int):
    """Seed a forked RNG (the caller's random state is untouched) and restore the model's train/eval
    mode on the way out."""
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            torch.manual_seed(seed)
            yield
    finally:
        model.train(was_training)


def _train_loop(model, named: list[tuple[str, nn.Parameter]], ids, train: TrainSpec, fingerprint, checkpoint,
                checkpoint_every, progress, description, callback, hooks: TrainingHooks, teacher=None) -> TrainResult:
    """AdamW on the parameters ``named`` (sorted by name) over ``train.steps`` optimizer steps,
    resuming from ``checkpoint`` when it belongs to ``fingerprint``."""
    device = next(model.parameters()).device
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train.warmup_steps, train.steps, train.schedule))
    sampler = make_sampler(ids, train)
    losses: list[float] = []
    start = 0

    state = load_checkpoint(checkpoint, fingerprint) if checkpoint is not None else None
    if state is not None:
        with torch.no_grad():
            for name, p in named:
                p.copy_(state["params"][name].to(p.device, p.dtype))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        _restore_rng_states(state["rng"])
        losses = [float(x) for x in state["losses"]]
        start = int(state["step"])
        hooks.load_state_dict(state.get("hooks", {}))
    hooks.on_train_begin(model)

    def write_checkpoint(step: int) -> None:
        save_checkpoint(checkpoint, {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "step": step,
            "params": {name: p.detach().cpu() for name, p in named},  # saved now: no copy needed
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": _rng_states(model),
            "losses": list(losses),
            "hooks": hooks.state_dict(),
        })

    model.train()
    last = f"{losses[-1]:.4f}" if losses else "-"
    with _progress(progress) as bar:
        task = bar.add_task(description, total=train.steps, completed=start, loss=last, status=hooks.status())
        for step in range(start, train.steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(train.grad_accum):
                batch = sampler.next().to(device)
                loss, excess = step_loss(model, batch, train, teacher)
                if excess is not None:
                    sampler.observe(excess)
                (loss / train.grad_accum).backward()
                total += float(loss.detach()) / train.grad_accum
            if train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            done = step + 1
            hooks.on_pre_optimizer_step(model, done)
            optimizer.step()
            scheduler.step()
            losses.append(total)
            hooks.on_step_end(model, done, total)
            if checkpoint is not None and (done == train.steps or (checkpoint_every and done % checkpoint_every == 0)):
                write_checkpoint(done)
            bar.update(task, advance=1, loss=f"{total:.4f}", status=hooks.status())
            if callback is not None:
                callback(done, total)
    if checkpoint is not None and start == train.steps and not checkpoint.is_file():
        write_checkpoint(train.steps)
    return TrainResult(losses=losses, steps=train.steps, resumed_from=start, fingerprint=fingerprint,
                       checkpoint=checkpoint, modules=[], trainable_params=sum(p.numel() for p in params),
                       part_weights=sampler.part_weights() if isinstance(sampler, PartSampler) else None)


def module_names(model: nn.Module, modules: Iterable[nn.Module]) -> list[str]:
    """Names of ``modules`` inside ``model`` (in the given order)."""
    by_id = {id(m): name for name, m in model.named_modules()}
    names = []
    for m in modules:
        if id(m) not in by_id:
            raise CompressError("a target module is not part of the model")
        names.append(by_id[id(m)])
    return names
