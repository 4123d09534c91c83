"""The language-model evaluation protocol: several text domains, each model measured once.

For each domain's windows LongTensor [w, seqlen] a model gets: the summed next-token NLL (float64)
over every predicted position, its next-token accuracy (argmax == the next token) and the argmax
itself [w, seqlen - 1], so that a compressed model's top-1 agreement with the dense model is counted
without running the dense model again. The dense model's figures are cached on disk
(``<cache>/evaluations``) under a hash of its weights and of the windows: a second run of a recipe
evaluates only the compressed model. KL(dense || compressed) needs the dense distribution at every
position, so it is measured only when asked for, with the dense model run alongside.

Log-softmaxes are taken ``ROW_CHUNK`` positions at a time, so memory stays at a few
``ROW_CHUNK × vocab`` float32 blocks whatever the batch size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from compress.cache import Digest, cache_root, digest
from compress.calibration.sources import prompt_ids
from compress.evaluation.perplexity import eval_mode, model_device
from compress.progress import progress_bar

ROW_CHUNK = 512
EVALUATIONS_FOLDER = "evaluations"
CACHE_VERSION = "lm-figures/1"


@dataclass
class DomainFigures:
    """One model on one domain: ``nll`` summed over ``tokens`` predicted positions, ``correct``
    of them predicted exactly, and the argmax int32 [w, seqlen - 1]."""

    nll: float
    tokens: int
    correct: int
    argmax: torch.Tensor

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens


@dataclass
class Comparison:
    """A compressed model against the dense one on one domain: argmax matches, and the summed KL
    (None when the dense distribution was not available)."""

    agree: int
    tokens: int
    kl: float | None = None

    @property
    def agreement(self) -> float:
        return self.agree / self.tokens

    @property
    def mean_kl(self) -> float | None:
        return None if self.kl is None else self.kl / self.tokens


# ----------------------------------------------------------------------------------- measuring
def _chunk_figures(logits: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None):
    """logits [n, vocab] (any float dtype) and targets [n] -> (nll sum float64, correct, argmax [n],
    KL sum float64 or None against reference logits [n, vocab])."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    nll = (lse - x.gather(1, targets[:, None]).squeeze(1)).sum(dtype=torch.float64)
    argmax = x.argmax(dim=-1)
    correct = int((argmax == targets).sum())
    kl = None
    if reference is not None:
        ref_logp = F.log_softmax(reference.float(), dim=-1)
        kl = (ref_logp.exp() * (ref_logp - (x - lse[:, None]))).sum(-1).sum(dtype=torch.float64)
    return nll, correct, argmax, kl


@torch.no_grad()
def measure_domain(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = True,
                   description: str = "evaluating", reference_model=None) -> tuple[DomainFigures, float | None]:
    """``model``'s figures on ``windows`` [w, seqlen]; with ``reference_model`` also the summed
    KL(reference || model) over the same positions (else None)."""
    device = model_device(model)
    nll = torch.zeros((), dtype=torch.float64)
    kl = torch.zeros((), dtype=torch.float64) if reference_model is not None else None
    correct, argmaxes = 0, []
    batches = windows.split(batch_size)
    with eval_mode(model):
        for batch in progress_bar(batches, description, enabled=progress, total=len(batches)):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits[:, :-1]
            reference = reference_model(input_ids=batch.to(model_device(reference_model))).logits[:, :-1] \
                if reference_model is not None else None
            reference = reference.to(device) if reference is not None else None
            # window by window: logits[b] [seqlen - 1, vocab] is contiguous, so no batch-sized copy
            for b in range(batch.shape[0]):
                targets = batch[b, 1:]
                for start in range(0, targets.shape[0], ROW_CHUNK):
                    part = slice(start, start + ROW_CHUNK)
                    n, c, a, k = _chunk_figures(logits[b, part], targets[part],
                                                reference[b, part] if reference is not None else None)
                    nll += n.cpu()
                    correct += c
                    argmaxes.append(a.to(torch.int32).cpu())
                    if k is not None:
                        kl += k.cpu()
            del logits, reference
    argmax = torch.cat(argmaxes).view(windows.shape[0], windows.shape[1] - 1)
    figures = DomainFigures(nll=float(nll), tokens=argmax.numel(), correct=correct, argmax=argmax)
    return figures, (float(kl) if kl is not None else None)


def compare(dense: DomainFigures, pruned: DomainFigures, kl: float | None = None) -> Comparison:
    """Top-1 agreement of two models' figures on the same windows (and a KL sum, if measured)."""
    if dense.argmax.shape != pruned.argmax.shape:
        raise ValueError(f"figures of different windows: {tuple(dense.argmax.shape)} vs {tuple(pruned.argmax.shape)}")
    return Comparison(agree=int((dense.argmax == pruned.argmax).sum()), tokens=pruned.tokens, kl=kl)


# ----------------------------------------------------------------------------------- dense cache
def model_fingerprint(model) -> str:
    """A hash of the model's config and every parameter's bytes (tied tensors once)."""
    import numpy as np

    config = getattr(model, "config", None)
    key = Digest()
    key.update(config.to_json_string(use_diff=False) if config is not None else type(model).__name__)
    seen = set()
    for name, tensor in sorted(model.state_dict().items()):
        pointer = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if pointer in seen:
            continue
        seen.add(pointer)
        data = tensor.detach().cpu().contiguous()
        raw = data.view(torch.uint8) if data.dtype == torch.bfloat16 else data
        for part in (name, str(tensor.dtype), str(tuple(tensor.shape)), np.ascontiguousarray(raw.numpy())):
            key.update(part)  # the weights hashed in place, one tensor at a time (no copy of the model)
    return key.hexdigest()


def windows_fingerprint(windows: dict[str, torch.Tensor]) -> str:
    parts: list[bytes | str] = []
    for name, tensor in windows.items():
        parts += [name, str(tuple(tensor.shape)), tensor.to(torch.int64).contiguous().numpy().tobytes()]
    return digest(*parts)


def _cache_path(model_key: str, windows: dict[str, torch.Tensor]):
    return cache_root() / EVALUATIONS_FOLDER / f"{digest(CACHE_VERSION, model_key, windows_fingerprint(windows))}.safetensors"


def _load_cached(path, names) -> dict[str, DomainFigures] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["figures"])
            return {name: DomainFigures(nll=meta[name]["nll"], tokens=meta[name]["tokens"],
                                        correct=meta[name]["correct"], argmax=handle.get_tensor(name))
                    for name in names}
    except Exception:  # a missing, torn or foreign cache file is only a cache miss
        return None


def _save_cached(path, figures: dict[str, DomainFigures]) -> None:
    from safetensors.torch import save_file

    from compress.cache import write_atomically

    meta = {name: {"nll": f.nll, "tokens": f.tokens, "correct": f.correct} for name, f in figures.items()}
    tensors = {name: f.argmax.contiguous() for name, f in figures.items()}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"figures": json.dumps(meta)}))


@dataclass
class DenseFigures:
    """The dense model's figures per domain, and whether they came from the cache."""

    domains: dict[str, DomainFigures]
    cached: bool = False
    seconds: float = 0.0


def dense_figures(model, windows: dict[str, torch.Tensor], batch_size: int = 8, progress: bool = True,
                  use_cache: bool = True) -> DenseFigures:
    """The figures of ``model`` (the dense reference) on every domain's windows, from the cache
    when it has them, else measured and cached."""
    import time

    path = _cache_path(model_fingerprint(model), windows) if use_cache else None
    if path is not None:
        cached = _load_cached(path, list(windows))
        if cached is not None:
            return DenseFigures(cached, cached=True)
    start = time.perf_counter()
    domains = {name: measure_domain(model, w, batch_size, progress, f"dense model on {name}")[0]
               for name, w in windows.items()}
    if path is not None:
        _save_cached(path, domains)
    return DenseFigures(domains, cached=False, seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------------- the section
@dataclass
class Evaluation:
    """Everything measured on one evaluation set; :meth:`section` is the report's ``evaluation``."""

    sources: dict[str, str]
    seqlen: int
    max_windows: int
    suite: str | None
    pruned: dict[str, DomainFigures]
    dense: DenseFigures | None = None
    comparisons: dict[str, Comparison] = field(default_factory=dict)

    def section(self) -> dict:
        datasets = {}
        for name, figures in self.pruned.items():
            row = {"source": self.sources[name], "windows": int(figures.argmax.shape[0]), "tokens": figures.tokens,
                   "dense_ppl": None, "pruned_ppl": figures.ppl, "ppl_ratio": None, "dense_accuracy": None,
                   "pruned_accuracy": figures.accuracy, "top1_agreement": None, "mean_kl": None}
            if self.dense is not None:
                dense = self.dense.domains[name]
                row.update(dense_ppl=dense.ppl, ppl_ratio=figures.ppl / dense.ppl, dense_accuracy=dense.accuracy)
            if name in self.comparisons:
                row.update(top1_agreement=self.comparisons[name].agreement, mean_kl=self.comparisons[name].mean_kl)
            datasets[name] = row
        section = {"suite": self.suite, "seqlen": self.seqlen, "max_windows": self.max_windows, "datasets": datasets}
        section.update(summarise(datasets))
        if self.dense is not None:
            section["dense_from_cache"] = self.dense.cached
        return section


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summarise(datasets: dict[str, dict]) -> dict:
    """Geometric mean and worst of the PPL ratios; domain means (each domain weighs the same) of
    accuracy, agreement and KL."""
    ratios = {name: row["ppl_ratio"] for name, row in datasets.items() if row.get("ppl_ratio") is not None}
    summary: dict = {"geomean_ppl_ratio": None, "worst_dataset": None, "worst_ppl_ratio": None}
    if ratios:
        worst = max(ratios, key=ratios.get)
        summary.update(geomean_ppl_ratio=math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios)),
                       worst_dataset=worst, worst_ppl_ratio=ratios[worst])
    rows = list(datasets.values())
    summary.update(dense_accuracy=_mean([r.get("dense_accuracy") for r in rows]),
                   pruned_accuracy=_mean([r.get("pruned_accuracy") for r in rows]),
                   top1_agreement=_mean([r.get("top1_agreement") for r in rows]),
                   mean_kl=_mean([r.get("mean_kl") for r in rows]))
    return summary


def evaluate_model(model, windows: dict[str, torch.Tensor], sources: dict[str, str], *, seqlen: int, max_windows: int,
                   suite: str | None = None, batch_size: int = 8, progress: bool = True,
                   dense: DenseFigures | None = None, dense_model=None, agreement: bool = True) -> Evaluation:
    """Measure ``model`` on every domain and, with ``dense``, its PPL ratios and (``agreement``)
    its top-1 agreement with the dense model; with ``dense_model``, also the KL to it."""
    pruned, comparisons = {}, {}
    for name, w in windows.items():
        figures, kl = measure_domain(model, w, batch_size, progress, f"evaluating {name}", reference_model=dense_model)
        pruned[name] = figures
        if dense is not None and (agreement or kl is not None):
            comparisons[name] = compare(dense.domains[name], figures, kl)
    return Evaluation(sources=sources, seqlen=seqlen, max_windows=max_windows, suite=suite, pruned=pruned,
                      dense=dense, comparisons=comparisons)


# ----------------------------------------------------------------------------------- generations
def repetition(tokens: list[int], n: int = 4) -> float:
    """Share of the ``n``-grams of ``tokens`` that repeat an earlier one (0 = none repeats)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def greedy_continuation(model, prompt_ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy tokens after ``prompt_ids`` (stops at an end-of-text token), with the KV cache."""
    device = model_device(model)
    ids = torch.tensor([prompt_ids], device=device)
    out, past = [], None
    with eval_mode(model):
        for _ in range(max_new_tokens):
            result = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            if token in eos:
                break
            ids = torch.tensor([[token]], device=device)
    return out


@torch.no_grad()
def continuation_ppl(model, prompt_ids: list[int], continuation: list[int]) -> float | None:
    """``model``'s perplexity of ``continuation`` given ``prompt_ids``."""
    if not continuation:
        return None
    device = model_device(model)
    ids = torch.tensor([prompt_ids + continuation], device=device)
    with eval_mode(model):
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    nll = F.cross_entropy(logits, ids[0, len(prompt_ids):], reduction="mean")
    return float(torch.exp(nll))


def generations_section(model, tokenizer, prompts: list[str], max_new_tokens: int,
                        load_dense: Callable[[], object] | None, eos: set[int]) -> dict:
    """What a user sees: per prompt the compressed model's greedy continuation, its share of
    repeated 4-grams, and the dense model's perplexity of it (with the dense continuation beside)."""
    rows = []
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    pruned = [greedy_continuation(model, ids, max_new_tokens, eos) for ids in encoded]
    dense_model = load_dense() if load_dense is not None else None
    for prompt, ids, tokens in zip(prompts, encoded, pruned):
        row = {"prompt": prompt, "pruned_text": tokenizer.decode(tokens), "pruned_repetition": repetition(tokens),
               "dense_ppl_of_pruned": None, "dense_text": None, "dense_repetition": None, "dense_ppl_of_dense": None}
        if dense_model is not None:
            dense_tokens = greedy_continuation(dense_model, ids, max_new_tokens, eos)
            row.update(dense_ppl_of_pruned=continuation_ppl(dense_model, ids, tokens),
                       dense_text=tokenizer.decode(dense_tokens), dense_repetition=repetition(dense_tokens),
                       dense_ppl_of_dense=continuation_ppl(dense_model, ids, dense_tokens))
        rows.append(row)
    del dense_model
    summary = {"mean_pruned_repetition": _mean([r["pruned_repetition"] for r in rows]),
               "mean_dense_repetition": _mean([r["dense_repetition"] for r in rows]),
               "mean_dense_ppl_of_pruned": _mean([r["dense_ppl_of_pruned"] for r in rows])}
    return {"max_new_tokens": max_new_tokens, "prompts": rows, **summary}
