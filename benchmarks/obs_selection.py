"""Does a better choice of MLP channels shrink what the least-squares refit cannot repair?

For some decoder layers of the dense model, the down_proj input (the MLP channels) is recorded on
the general calibration mix (the recipes' 256 windows of 128 tokens) and on its held-out windows.
Three selections remove the same number of channels from each layer:

- ``wifv``: FLAP's score, ``‖W[:, j]‖² · Var(x_j)`` (the channel's own output variance);
- ``obs``: the project's ``metric: obs`` (``ObsScorer``), ``‖W[:, j]‖² / (Ĝ⁻¹)_jj``, every channel
  scored once against all the others;
- ``obs-greedy``: the same score re-taken after each removal of ``--batch`` channels, the weights
  and the inverse updated as Optimal Brain Surgeon does (ZipLM / SlimGPT); here only, not a pass.

Each kept set then gets the refit the passes use (``least_squares_refit``, ridge 1e-2 toward the
dense weights). The table shows the share of down_proj's output variance the refit leaves
unexplained, on the calibration windows and on the held-out ones, for the channel shares the two
protocol ratios take from the MLP when all the pruning lands there (CFSP's default): 20% of the
decoder linears is 26.7% of the MLP channels, 50% is 66.7%. Writes JSON (no machine paths).

    python3 benchmarks/obs_selection.py --out docs/results/obs_selection.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.calibration.sources import random_windows, window_bos  # noqa: E402
from compress.calibration.token_cache import source_ids  # noqa: E402
from compress.kinds.decoder import HELDOUT_SEED_OFFSET, HELDOUT_WINDOWS  # noqa: E402
from compress.models.adapters import get_adapter  # noqa: E402
from compress.models.loading import load_model  # noqa: E402
from compress.pruning.compensation import GramStats, least_squares_refit, refit_error  # noqa: E402
from compress.pruning.scores import ObsScorer  # noqa: E402

SELECTIONS = ("wifv", "obs", "obs-greedy")


def record_grams(model, adapter, layers: list[int], windows: torch.Tensor, batch: int = 16) -> dict[int, GramStats]:
    """layer -> the Gram of its MLP consumer's input over every token of ``windows`` [n, seqlen]."""
    grams = {i: GramStats(adapter.mlp_consumer(i).in_features) for i in layers}

    def recorder(gram: GramStats):
        def hook(_module, args) -> None:
            gram.update(args[0])
        return hook

    handles = [adapter.mlp_consumer(i).register_forward_pre_hook(recorder(grams[i])) for i in layers]
    try:
        with torch.no_grad():
            for chunk in windows.split(batch):
                model(chunk)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def covariance(gram: GramStats) -> torch.Tensor:
    """[C, C] per-token covariance of the input the Gram summarises."""
    c = gram.channels
    return gram.matrix[:c, :c] / gram.tokens - torch.outer(gram.mean, gram.mean)


def remove_wifv(weight: torch.Tensor, gram: GramStats, count: int) -> list[int]:
    """FluctuationScorer's WIFV from the Gram (its variance is the unbiased one, n/(n-1) times this:
    the same order)."""
    scores = weight.square().sum(0) * covariance(gram).diagonal()
    return scores.argsort()[:count].tolist()


def remove_obs(weight: torch.Tensor, gram: GramStats, count: int) -> list[int]:
    return ObsScorer().channel_errors(weight, gram).argsort()[:count].tolist()


def remove_obs_greedy(weight: torch.Tensor, gram: GramStats, count: int, batch: int) -> list[int]:
    """Remove ``batch`` channels at a time by the current OBS score, then update the remaining weights
    (and the bias column) and the inverse as if those channels were gone."""
    c = gram.channels
    inverse = ObsScorer().damped_inverse(gram)  # [C + 1, C + 1]
    w = torch.cat([weight, torch.zeros(weight.shape[0], 1, dtype=weight.dtype)], dim=1)  # the bias column
    alive = torch.ones(c + 1, dtype=torch.bool)
    alive[c] = False  # the constant channel stays
    removed: list[int] = []
    while len(removed) < count:
        errors = w.square().sum(0) / inverse.diagonal().clamp_min(1e-300)
        errors[~alive] = float("inf")
        chosen = errors.argsort()[:min(batch, count - len(removed))]
        solved = torch.linalg.solve(inverse[chosen][:, chosen], inverse[chosen])  # [s, C + 1]
        w -= w[:, chosen] @ solved
        inverse -= inverse[:, chosen] @ solved
        alive[chosen] = False
        removed += chosen.tolist()
    return removed


def lost_share(weight: torch.Tensor, fit: GramStats, heldout: GramStats, removed: list[int]) -> dict[str, float]:
    """Share of the consumer's output variance the refit of the kept channels leaves, on both sets."""
    keep = sorted(set(range(fit.channels)) - set(removed))
    refit, intercept = least_squares_refit(weight, fit, keep, 1e-2, "dense")
    out = {}
    for name, gram in (("calibration", fit), ("heldout", heldout)):
        variance = float((weight * (weight @ covariance(gram))).sum())
        out[name] = refit_error(weight, gram, keep, refit, intercept) / gram.tokens / variance
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="*", default=[0, 5, 10, 15, 20, 25, 29])
    parser.add_argument("--shares", type=float, nargs="*", default=[0.267, 0.667],
                        help="share of each layer's MLP channels removed")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch", type=int, default=12, help="channels per greedy step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype="float32", device="cpu", progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = get_adapter(model)
    ids, bos = source_ids(tokenizer, "general"), window_bos(tokenizer)
    fit = record_grams(model, adapter, args.layers, random_windows(ids, args.samples, args.seqlen, 0, bos=bos))
    heldout = record_grams(model, adapter, args.layers,
                           random_windows(ids, HELDOUT_WINDOWS, args.seqlen, HELDOUT_SEED_OFFSET, bos=bos))
    rows = []
    for layer in args.layers:
        weight = adapter.mlp_consumer(layer).weight.detach().to(torch.float64)
        for share in args.shares:
            count = round(share * fit[layer].channels)
            for selection in SELECTIONS:
                start = time.perf_counter()
                if selection == "wifv":
                    removed = remove_wifv(weight, fit[layer], count)
                elif selection == "obs":
                    removed = remove_obs(weight, fit[layer], count)
                else:
                    removed = remove_obs_greedy(weight, fit[layer], count, args.batch)
                seconds = time.perf_counter() - start
                rows.append({"layer": layer, "share": share, "removed": count, "selection": selection,
                             "select_s": round(seconds, 2), **lost_share(weight, fit[layer], heldout[layer], removed)})
                print(f"layer {layer:2d} share {share:.3f} {selection:10s} "
                      f"lost {rows[-1]['calibration']:.4f} / held-out {rows[-1]['heldout']:.4f}", flush=True)
    summary = {}
    print("\n| share removed | selection | lost variance, calibration (median) | held-out (median) "
          "| held-out vs wifv (median ratio) |\n|---|---|---|---|---|")
    for share in args.shares:
        base = {r["layer"]: r["heldout"] for r in rows if r["share"] == share and r["selection"] == "wifv"}
        for selection in SELECTIONS:
            mine = [r for r in rows if r["share"] == share and r["selection"] == selection]
            entry = {"calibration": median(r["calibration"] for r in mine),
                     "heldout": median(r["heldout"] for r in mine),
                     "heldout_vs_wifv": median(r["heldout"] / base[r["layer"]] for r in mine)}
            summary[f"{share}/{selection}"] = entry
            print(f"| {share:.1%} | {selection} | {entry['calibration']:.4f} | {entry['heldout']:.4f} "
                  f"| {entry['heldout_vs_wifv']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "benchmark": "obs_selection", "model": args.model, "calibration": {"source": "general",
            "samples": args.samples, "seqlen": args.seqlen, "heldout_windows": HELDOUT_WINDOWS},
            "refit": {"damp": 1e-2, "prior": "dense"}, "greedy_batch": args.batch, "threads": args.threads,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
