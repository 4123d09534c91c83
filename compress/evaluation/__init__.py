"""Evaluation: perplexity over token windows, and logit agreement with a reference model."""

from __future__ import annotations

from compress.evaluation.compare import LogitComparison, compare_logits
from compress.evaluation.perplexity import PerplexityResult, perplexity

__all__ = ["LogitComparison", "PerplexityResult", "compare_logits", "perplexity"]
