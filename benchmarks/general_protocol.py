"""Decoder pruning on the standard protocol v2 (../shared/assets.md; suite v2 of compress).

SmolLM2-135M (embedded) unless ``--model`` names another (e.g. ``gemma3-270m``), fp32, CPU. Calibration: random 128-token windows of a text source (the
general mix by default; ``--calibration`` for another, e.g. ``austen`` or ``general:wiki:train``),
seed 0. Evaluation: for each domain of suite v2 (Persuasion + the test split of every general
domain, the held-out ``chat`` included) the perplexity at 128 tokens over the first 256
non-overlapping windows, its ratio to the dense model, next-token accuracy and top-1 agreement;
the headline is the geometric mean of the ratios, with the worst domain beside it.

    python benchmarks/general_protocol.py --configs flap-50 flap-ls-50
    python benchmarks/general_protocol.py --configs flap-50 --calibration austen --tag austen
    python benchmarks/general_protocol.py --windows 64 --configs ...     # a quicker sweep (not v2)
    python benchmarks/general_protocol.py --model gemma3-270m --eval-batch 4 --out docs/results/families.json ...

Windows start with BOS when the model's tokenizer adds one (Gemma; ``window_bos``), as in ``compress run``.

Each configuration runs in its own process (its peak RSS is its own); rows are appended to the
JSON file given by ``--out`` (default bench-results/general_protocol.json) under the key
``<config>@<calibration>[#tag]``, so several invocations build one table. The dense model's
figures come from compress's evaluation cache after the first run. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m"
SEQLEN = 128
CALIBRATION = {"source": "general", "samples": 256, "seqlen": 128, "seed": 0}
LSD = {"compensation": "least_squares", "ls_prior": "dense", "ls_damp": "auto"}
# --distill: the recovery rows (steps set by --distill; warm-up in steps and a constant rate after it, so
# the first 100 steps of a 500-step run are the 100-step run, and one run gives every row).
# --recovery full: the distill pass (every parameter of the decoder blocks), rows "+distill-full<N>";
# --recovery lora: lora_recover with loss kl (rank-32 LoRA), rows "+distill<N>" (the earlier rows).
# --lr-schedule cosine: the rate decays to a tenth at the last step, so only the last row is that run's
# own schedule; rows "+distill-full-cos<N>".
# --lr: another learning rate than RECOVERY's; rows "+distill-full-lr<lr>-<N>" (e.g. "+distill-full-lr0.0004-500").
# --hidden-weight (full only): the distill pass's hidden-state term beside the KL; rows "+distill-full-hid<w>-<N>".
# --balance: draw the mix's parts by excess loss to this power; rows "+distill-full-bal<p>-<N>" (lora: "+distill-bal<p>-<N>").
RECOVERY = {
    "full": ("distill", "distill-full", {"source": "general", "seqlen": 128, "batch_size": 8, "lr": 2e-4,
                                         "warmup_steps": 10, "bf16": True, "checkpoint_every": 0}),
    "lora": ("lora_recover", "distill", {"loss": "kl", "source": "general", "seqlen": 128, "batch_size": 8,
                                         "rank": 32, "alpha": 32.0, "lr": 5e-4, "warmup_steps": 10, "bf16": True,
                                         "checkpoint_every": 0}),
}

# name -> list of (pass, options) run in order; [] = the dense model
CONFIGS: dict[str, list[tuple[str, dict]]] = {
    "dense": [],
    # FLAP and its parts
    "flap-20": [("flap", {"ratio": 0.2})],
    "flap-50": [("flap", {"ratio": 0.5})],
    "flap-ls-20": [("flap", {"ratio": 0.2, "compensation": "least_squares"})],
    "flap-ls-50": [("flap", {"ratio": 0.5, "compensation": "least_squares"})],
    "flap-uniform-50": [("flap", {"ratio": 0.5, "allocator": "uniform"})],
    "flap-bb-50": [("flap", {"ratio": 0.5, "allocator": "block_budget"})],
    "flap-noskip-50": [("flap", {"ratio": 0.5, "skip_layers": []})],
    "flap-seq-50": [("flap", {"ratio": 0.5, "sequential": True})],
    "flap-ls-seq-50": [("flap", {"ratio": 0.5, "compensation": "least_squares", "sequential": True})],
    "flap-ls-uniform-50": [("flap", {"ratio": 0.5, "compensation": "least_squares", "allocator": "uniform"})],
    "flap-ls-bb-50": [("flap", {"ratio": 0.5, "compensation": "least_squares", "allocator": "block_budget"})],
    "flap-ls-qh-50": [("flap", {"ratio": 0.5, "compensation": "least_squares", "gqa": "query_heads"})],
    "flap-ls-damp1-50": [("flap", {"ratio": 0.5, "compensation": "least_squares", "ls_damp": 1.0})],
    "flap-ls-damp1e-1-50": [("flap", {"ratio": 0.5, "compensation": "least_squares", "ls_damp": 0.1})],
    "flap-ls-damp1e-3-50": [("flap", {"ratio": 0.5, "compensation": "least_squares", "ls_damp": 1e-3})],
    "wanda_sp-50": [("wanda_sp", {"ratio": 0.5})],
    "cfsp-50": [("cfsp", {"ratio": 0.5})],
    "cfsp-ls-50": [("cfsp", {"ratio": 0.5, "compensation": "least_squares"})],
    "cfsp-20": [("cfsp", {"ratio": 0.2})],
    "cfsp-ls-20": [("cfsp", {"ratio": 0.2, "compensation": "least_squares"})],
    # least squares toward the dense weights, its ridge chosen per consumer on held-out windows
    "flap-lsd-50": [("flap", {"ratio": 0.5, **LSD})],
    "flap-lsd-20": [("flap", {"ratio": 0.2, **LSD})],
    "flap-lsz-auto-50": [("flap", {"ratio": 0.5, "compensation": "least_squares", "ls_damp": "auto"})],
    "cfsp-lsd-50": [("cfsp", {"ratio": 0.5, **LSD})],
    "cfsp-lsd-seq-50": [("cfsp", {"ratio": 0.5, "sequential": True, **LSD})],
    "cfsp-ls-seq-50": [("cfsp", {"ratio": 0.5, "sequential": True, "compensation": "least_squares"})],
    "cfsp-lsd-global-seq-50": [("cfsp", {"ratio": 0.5, "sequential": True, "allocator": "global", **LSD})],
    "cfsp-lsd-attn-seq-50": [("cfsp", {"ratio": 0.5, "sequential": True, "attention": True, **LSD})],
    "cfsp-lsd-seq-20": [("cfsp", {"ratio": 0.2, "sequential": True, **LSD})],
    "cfsp-lsd-20": [("cfsp", {"ratio": 0.2, **LSD})],
    "cfsp-lsd-search-seq-50": [("cfsp", {"ratio": 0.5, "sequential": True, "allocator": "search", **LSD})],
    "cfsp-lsd-search-seq-20": [("cfsp", {"ratio": 0.2, "sequential": True, "allocator": "search", **LSD})],
    "flap-lsd-seq-50": [("flap", {"ratio": 0.5, "sequential": True, **LSD})],
    "flap-lsd-uniform-50": [("flap", {"ratio": 0.5, "allocator": "uniform", **LSD})],
    "flap-lsd-uniform-seq-50": [("flap", {"ratio": 0.5, "allocator": "uniform", "sequential": True, **LSD})],
    "flap-ls-uniform-seq-50": [("flap", {"ratio": 0.5, "allocator": "uniform", "sequential": True,
                                         "compensation": "least_squares"})],
    "flap-lsd-qh-seq-50": [("flap", {"ratio": 0.5, "gqa": "query_heads", "sequential": True, **LSD})],
    "flap-lsd-uniform-seq-20": [("flap", {"ratio": 0.2, "allocator": "uniform", "sequential": True, **LSD})],
    "flap-lsd-seq-20": [("flap", {"ratio": 0.2, "sequential": True, **LSD})],
    "flap-lsd-uniform-qh-seq-50": [("flap", {"ratio": 0.5, "allocator": "uniform", "gqa": "query_heads",
                                             "sequential": True, **LSD})],
    "flap-lsd-uniform-qh-seq-20": [("flap", {"ratio": 0.2, "allocator": "uniform", "gqa": "query_heads",
                                             "sequential": True, **LSD})],
    # ls_target dense_output: down_proj also absorbs the drift from the dense model's block output
    "flap-lsd-uniform-qh-seq-drift-50": [("flap", {"ratio": 0.5, "allocator": "uniform", "gqa": "query_heads",
                                                   "sequential": True, "ls_target": "dense_output", **LSD})],
    "flap-lsd-uniform-qh-seq-drift-20": [("flap", {"ratio": 0.2, "allocator": "uniform", "gqa": "query_heads",
                                                   "sequential": True, "ls_target": "dense_output", **LSD})],
    # metric obs: channels and heads scored by the error left after the least-squares refit (OBS)
    "flap-obs-lsd-uniform-qh-seq-drift-50": [("flap", {"ratio": 0.5, "metric": "obs", "allocator": "uniform",
                                                       "gqa": "query_heads", "sequential": True,
                                                       "ls_target": "dense_output", **LSD})],
    "flap-obs-lsd-uniform-qh-seq-drift-20": [("flap", {"ratio": 0.2, "metric": "obs", "allocator": "uniform",
                                                       "gqa": "query_heads", "sequential": True,
                                                       "ls_target": "dense_output", **LSD})],
    "cfsp-lsd-seq-drift-50": [("cfsp", {"ratio": 0.5, "sequential": True, "ls_target": "dense_output", **LSD})],
    "cfsp-lsd-seq-drift-20": [("cfsp", {"ratio": 0.2, "sequential": True, "ls_target": "dense_output", **LSD})],
    # the search allocator (Týr-the-Pruner style)
    "flap-lsd-search-seq-50": [("flap", {"ratio": 0.5, "allocator": "search", "sequential": True, **LSD})],
    "flap-search-50": [("flap", {"ratio": 0.5, "allocator": "search"})],
    "flap-search-20": [("flap", {"ratio": 0.2, "allocator": "search"})],
    "flap-lsd-search-50": [("flap", {"ratio": 0.5, "allocator": "search", **LSD})],
    "flap-lsd-search-20": [("flap", {"ratio": 0.2, "allocator": "search", **LSD})],
    "cfsp-lsd-search-50": [("cfsp", {"ratio": 0.5, "allocator": "search", "attention": True, **LSD})],
    "flap-50+recover-ce200": [("flap", {"ratio": 0.5}), ("lora_recover", {"loss": "next_token", "steps": 200,
                                                                          "source": "general"})],
}


def run_one(name: str, calibration: dict, windows: int, threads: int, distill: list[int], model_name: str = MODEL,
            eval_batch: int = 8, recovery: str = "full", schedule: str = "constant",
            lr: float | None = None, hidden_weight: float = 0.0, balance: float = 0.0,
            distilled_only: bool = False) -> list[dict]:
    """Load, prune and evaluate one configuration in this process; with ``distill`` (step counts),
    then distil it (``--recovery``: see ``RECOVERY``) and evaluate after each count too
    (``distilled_only``: only then; the pruned model's row is left out)."""
    import torch

    from compress.calibration.sources import random_windows, window_bos
    from compress.calibration.token_cache import source_ids
    from compress.context import PassContext
    from compress.evaluation.lm_evaluator import LMEvaluator
    from compress.models.adapters import get_adapter
    from compress.models.loading import load_model
    from compress.kinds.decoder import HELDOUT_SEED_OFFSET, HELDOUT_WINDOWS
    from compress.recipe import EvaluateSpec
    from compress.registry import get_pass

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    loaded = load_model(model_name, dtype="float32", device="cpu", progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = get_adapter(model)
    dense_linear, dense_total = adapter.decoder_linear_params(), adapter.param_counts()["total"]
    bos = window_bos(tokenizer)
    evaluator = LMEvaluator(EvaluateSpec(suite="v2", seqlen=SEQLEN, max_windows=windows, batch_size=eval_batch,
                                         continuation_tokens=0), tokenizer, progress=False)
    evaluator.measure_dense(model)

    def calibration_windows() -> torch.Tensor:
        return random_windows(source_ids(tokenizer, calibration["source"]), calibration["samples"],
                              calibration["seqlen"], calibration["seed"], bos=bos)

    def heldout_windows() -> torch.Tensor:  # as compress run draws them
        return random_windows(source_ids(tokenizer, calibration["source"]), HELDOUT_WINDOWS, calibration["seqlen"],
                              calibration["seed"] + HELDOUT_SEED_OFFSET, bos=bos)

    ctx = PassContext(model=model, tokenizer=tokenizer, calibration_loader=calibration_windows, batch_size=16,
                      progress=False, heldout_loader=heldout_windows,
                      dense_loader=lambda: load_model(model_name, dtype="float32", device="cpu", progress=False).model)
    step_times, step_details = [], []
    for pass_name, options in CONFIGS[name]:
        spec = get_pass(pass_name)
        start = time.perf_counter()
        step = spec.cls(spec.options(**options)).run(ctx)
        step_times.append(round(time.perf_counter() - start, 1))
        step_details.append({k: v for k, v in step.details.items() if isinstance(v, (int, float, str, dict))})
        ctx.release_dense()
    prune_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    adapter = get_adapter(model)
    start = time.perf_counter()
    section = None if distilled_only else evaluator.evaluate(model)
    row = {
        "config": name,
        "model": model_name,
        "passes": [{p: o} for p, o in CONFIGS[name]],
        "calibration": calibration,
        "decoder_linear": adapter.decoder_linear_params(),
        "total_params": adapter.param_counts()["total"],
        "pruning_ratio": 1 - adapter.decoder_linear_params() / dense_linear,
        "total_ratio": 1 - adapter.param_counts()["total"] / dense_total,
        "step_s": step_times,
        "step_details": step_details,
        "prune_s": round(sum(step_times), 1),
        "prune_peak_rss_mb": round(prune_peak_mb, 1),
        "eval_s": None if distilled_only else round(time.perf_counter() - start, 1),
        "evaluation": section,
    }
    distilled = distilled_rows(row, model, ctx, evaluator, distill, recovery, schedule, lr, hidden_weight,
                               balance) if distill else []
    return distilled if distilled_only else [row] + distilled


def distilled_rows(base: dict, model, ctx, evaluator, checkpoints: list[int], recovery: str,
                   schedule: str = "constant", lr: float | None = None, hidden_weight: float = 0.0,
                   balance: float = 0.0) -> list[dict]:
    """Distil ``model`` for max(checkpoints) steps with the ``recovery`` pass's training (``RECOVERY``)
    and evaluate it (LoRA adapters still attached) after each count; the evaluation time is not
    counted in ``train_s``."""
    from dataclasses import replace

    from compress.calibration.sources import window_bos
    from compress.registry import get_pass
    from compress.training import LoRASpec, train_lora, train_weights
    from passes._common import target_names, training_ids
    from passes.distill.run import block_parameter_names

    pass_name, suffix, settings = RECOVERY[recovery]
    settings = {**settings, "lr_schedule": schedule, **({"lr": lr} if lr else {}),
                **({"hidden_weight": hidden_weight} if hidden_weight else {}),
                **({"balance": balance} if balance else {})}
    suffix += "-cos" if schedule == "cosine" else ""
    suffix += f"-lr{lr:g}-" if lr else ""
    suffix += f"-hid{hidden_weight:g}-" if hidden_weight else ""
    suffix += f"-bal{balance:g}-" if balance else ""
    options = get_pass(pass_name).options(**{**settings, "steps": max(checkpoints)})
    train = replace(options.train_spec(), bos=window_bos(ctx.tokenizer))
    rows, trained, started = [], 0.0, time.perf_counter()

    def callback(step: int, loss: float) -> None:
        nonlocal trained, started
        if step in checkpoints:
            trained += time.perf_counter() - started
            section = evaluator.evaluate(model)
            rows.append({**base, "config": f"{base['config']}+{suffix}{step}",
                         "distill": {"pass": pass_name, **settings, "steps": step, "train_s": round(trained, 1),
                                     "last_loss": loss},
                         "evaluation": section})
            model.train()
            started = time.perf_counter()

    ids = training_ids(ctx, options.source, pass_name, parts=bool(balance))
    if recovery == "full":
        result = train_weights(model, ids, block_parameter_names(model, ctx.adapter()), train, progress=False,
                               callback=callback, teacher=ctx.dense_model())
    else:
        names = target_names(ctx, options.target_modules)
        lora = LoRASpec(target_modules=tuple(n for layer in names for n in layer), rank=options.rank,
                        alpha=options.alpha, dropout=options.dropout)
        result = train_lora(model, ids, lora, train, progress=False, callback=callback, teacher=ctx.dense_model())
    if result.part_weights is not None:
        rows[-1]["distill"]["part_weights"] = result.part_weights
    return rows


def row_key(config: str, calibration: str, tag: str | None) -> str:
    return f"{config}@{calibration}" + (f"#{tag}" if tag else "")


def markdown_table(rows: dict[str, dict]) -> str:
    """One line per row: per-domain PPL ratios, geometric mean, worst, mean accuracy, prune seconds."""
    domains: list[str] = []
    for row in rows.values():
        for name in row["evaluation"]["datasets"]:
            if name not in domains:
                domains.append(name)
    head = ["row", "ratio", *domains, "geomean", "worst", "acc.", "prune s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in rows.items():
        e = row["evaluation"]
        cells = [key, f"{row['pruning_ratio']:.0%}"]
        for name in domains:
            d = e["datasets"].get(name)
            cells.append(f"{d['ppl_ratio']:.2f}" if d and d.get("ppl_ratio") else "—")
        cells += [f"**{e['geomean_ppl_ratio']:.2f}**" if e.get("geomean_ppl_ratio") else "—",
                  f"{e['worst_ppl_ratio']:.2f} ({e['worst_dataset']})" if e.get("worst_ppl_ratio") else "—",
                  f"{e['pruned_accuracy']:.1%}", f"{row['prune_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crosscal_table(rows: dict[str, dict], config: str) -> str:
    """Rows ``config@<calibration>`` as calibration source × evaluation domain: the PPL ratio of each
    domain when the pass calibrates on one source; a method that overfits its calibration text shows
    a low ratio on its own domain's column and high ones elsewhere."""
    picked = {key.split("@", 1)[1]: row for key, row in rows.items()
              if key.split("@", 1)[0] == config and "#" not in key}
    if not picked:
        return f"(no rows of {config})"
    domains = list(next(iter(picked.values()))["evaluation"]["datasets"])
    head = ["calibrated on", *domains, "geomean", "worst"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for calibration, row in picked.items():
        e = row["evaluation"]
        cells = [calibration] + [f"{e['datasets'][d]['ppl_ratio']:.2f}" for d in domains]
        cells += [f"**{e['geomean_ppl_ratio']:.2f}**", f"{e['worst_ppl_ratio']:.2f} ({e['worst_dataset']})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=["dense", "flap-20", "flap-50"], help=f"of: {', '.join(CONFIGS)}")
    parser.add_argument("--calibration", default=CALIBRATION["source"], help="calibration text source")
    parser.add_argument("--samples", type=int, default=CALIBRATION["samples"])
    parser.add_argument("--calib-seqlen", type=int, default=CALIBRATION["seqlen"])
    parser.add_argument("--windows", type=int, default=256, help="evaluation windows per domain (v2: 256)")
    parser.add_argument("--tag", help="suffix of the row key (variants of the same config)")
    parser.add_argument("--distill", type=int, nargs="*", default=[],
                        help="also distil each config and add a row after each of these step counts")
    parser.add_argument("--recovery", choices=sorted(RECOVERY), default="full",
                        help="--distill: 'full' (the distill pass) or 'lora' (lora_recover, loss kl)")
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                        help="--distill: the learning rate after the warm-up")
    parser.add_argument("--lr", type=float, help="--distill: the learning rate (default: RECOVERY's)")
    parser.add_argument("--hidden-weight", type=float, default=0.0,
                        help="--distill (full): weight of the hidden-state term beside the KL")
    parser.add_argument("--balance", type=float, default=0.0,
                        help="--distill: draw the mix's parts by excess loss to this power (0: the mix as is)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "general_protocol.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=MODEL, help="model source (default: the embedded SmolLM2-135M)")
    parser.add_argument("--eval-batch", type=int, default=8, help="evaluation windows per forward pass")
    parser.add_argument("--table", action="store_true", help="only print the table of --out")
    parser.add_argument("--rows", nargs="*", help="--table: only these row keys, in this order")
    parser.add_argument("--crosscal", help="--table: the cross-calibration table of this config instead")
    parser.add_argument("--distilled-only", action="store_true",
                        help="--distill: evaluate and write only the distilled rows (the pruned model's row is "
                        "already in --out)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    calibration = {**CALIBRATION, "source": args.calibration, "samples": args.samples, "seqlen": args.calib_seqlen}

    if args.one:
        rows = run_one(args.one, calibration, args.windows, args.threads, sorted(args.distill), args.model,
                       args.eval_batch, args.recovery, args.lr_schedule, args.lr, args.hidden_weight,
                       args.balance, args.distilled_only)
        args.row_out.write_text(json.dumps(rows if args.distill else rows[0]))
        return
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"protocol": {}, "rows": {}}
    if not args.table:
        unknown = [c for c in args.configs if c not in CONFIGS]
        if unknown:
            parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data["protocol"] = {"model": args.model, "suite": "v2", "seqlen": SEQLEN, "windows": args.windows,
                            "standard": args.windows == 256}
        for name in args.configs:
            row_file = args.out.with_suffix(f".{name}.row.json")
            cmd = [sys.executable, __file__, "--one", name, "--row-out", str(row_file), "--threads", str(args.threads),
                   "--calibration", args.calibration, "--samples", str(args.samples), "--calib-seqlen",
                   str(args.calib_seqlen), "--windows", str(args.windows), "--model", args.model,
                   "--eval-batch", str(args.eval_batch), "--recovery", args.recovery, "--lr-schedule", args.lr_schedule,
                   *(["--lr", str(args.lr)] if args.lr else []), "--hidden-weight", str(args.hidden_weight),
                   "--balance", str(args.balance), *(["--distilled-only"] if args.distilled_only else []),
                   "--distill", *[str(n) for n in args.distill]]
            subprocess.run(cmd, check=True)
            written = json.loads(row_file.read_text())
            for row in written if isinstance(written, list) else [written]:
                row["windows"] = args.windows
                data["rows"][row_key(row["config"], args.calibration, args.tag)] = row
                e = row["evaluation"]
                print(f"done {row['config']}: geomean {e['geomean_ppl_ratio'] or math.nan:.3f}, worst "
                      f"{e['worst_dataset']} {e['worst_ppl_ratio'] or math.nan:.3f}", flush=True)
            row_file.unlink()
            args.out.write_text(json.dumps(data, indent=1))
    if args.crosscal:
        print(crosscal_table(data["rows"], args.crosscal))
        return
    rows = {key: data["rows"][key] for key in args.rows if key in data["rows"]} if args.rows else data["rows"]
    print(markdown_table(rows))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
