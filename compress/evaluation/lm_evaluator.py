"""The ``evaluate`` section of a decoder run, from windows to the report section.

``LMEvaluator`` reads the section's text sources once (token ids cached on disk), measures the
dense model before the passes change it (figures cached by model and data), and measures the
compressed model afterwards: per domain PPL, ratio, next-token accuracy, top-1 agreement (and KL
when asked for), with the geometric mean and the worst domain. See
:mod:`compress.evaluation.protocol`.
"""

from __future__ import annotations

import copy

import torch

from compress.calibration.sources import sequential_windows, window_bos
from compress.calibration.suites import dataset_name
from compress.calibration.token_cache import source_ids
from compress.evaluation.protocol import DenseFigures, dense_figures, evaluate_model, generations_section


class LMEvaluator:
    """``spec`` is an :class:`compress.recipe.EvaluateSpec`; ``kl``: measure KL(dense || pruned)
    too, which keeps a copy of the dense model until the end."""

    def __init__(self, spec, tokenizer, *, kl: bool = False, progress: bool = True):
        self.spec = spec
        self.kl = kl
        self.progress = progress
        self.sources = {dataset_name(s): s for s in spec.sources()}
        bos = window_bos(tokenizer)
        self.windows: dict[str, torch.Tensor] = {
            name: sequential_windows(source_ids(tokenizer, source), spec.seqlen, spec.max_windows, source=source, bos=bos,
                                     field="evaluate")
            for name, source in self.sources.items()
        }
        self.dense: DenseFigures | None = None
        self.dense_model = None

    def first_windows(self) -> torch.Tensor:
        return next(iter(self.windows.values()))

    def spread_windows(self, count: int) -> torch.Tensor:
        """Up to ``count`` windows [n, seqlen] taken in turn from every domain (first windows first)."""
        domains = list(self.windows.values())
        picked = [domains[i % len(domains)][i // len(domains)] for i in range(count)
                  if i // len(domains) < len(domains[i % len(domains)])]
        return torch.stack(picked)

    def measure_dense(self, model) -> None:
        """The dense model's figures (from the cache when it has them); call before pruning."""
        if not self.spec.dense:
            return
        self.dense = dense_figures(model, self.windows, self.spec.batch_size, self.progress)
        if self.kl:
            self.dense_model = copy.deepcopy(model)

    def evaluate(self, model) -> dict:
        """The report's ``evaluation`` section for the compressed ``model``."""
        evaluation = evaluate_model(
            model, self.windows, self.sources, seqlen=self.spec.seqlen, max_windows=self.spec.max_windows,
            suite=self.spec.suite_name(), batch_size=self.spec.batch_size, progress=self.progress,
            dense=self.dense, dense_model=self.dense_model, agreement=self.spec.agreement,
        )
        section = evaluation.section()
        if self.dense is not None and not self.dense.cached:
            section["dense_seconds"] = round(self.dense.seconds, 1)
        return section

    def generations(self, model, tokenizer, prompts: list[str], load_dense) -> dict | None:
        """What a user sees (see :func:`compress.evaluation.protocol.generations_section`);
        ``load_dense()`` gives the dense model (the kept copy is used when there is one)."""
        if not self.spec.continuation_tokens or not prompts:
            return None
        loader = (lambda: self.dense_model) if self.dense_model is not None else load_dense
        return generations_section(model, tokenizer, prompts, self.spec.continuation_tokens, loader,
                                   eos_ids(model))


def eos_ids(model) -> set[int]:
    """End-of-text token ids of ``model`` (generation config, else model config)."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return set(eos if isinstance(eos, (list, tuple)) else [eos])
    return set()
