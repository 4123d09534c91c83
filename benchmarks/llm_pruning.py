"""LLM pruning benchmark on the standard protocol (shared/assets.md).

SmolLM2-135M (embedded), fp32, calibration = 256 random 128-token windows of the Austen
calibration split (seed 0), perplexity at 128 tokens over the first 256 windows of persuasion and
northangerabbey. Each configuration runs in its own process so that its peak RSS is its own.

    python benchmarks/llm_pruning.py                      # every configuration
    python benchmarks/llm_pruning.py --configs dense flap-50 parity-50
    python benchmarks/llm_pruning.py --out bench-results/llm_pruning.json

Prints a table and writes JSON (one row per configuration: PPLs, parameters, pruning wall time,
peak RSS). Pruning time excludes model loading and evaluation.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m"
EVAL_SETS = ("persuasion", "northangerabbey")
CALIBRATION = {"source": "austen", "samples": 256, "seqlen": 128, "seed": 0}
SEQLEN, WINDOWS = 128, 256

RECOVERY_STEPS = 200  # lora_recover rows: steps of batch 4 x 128 tokens on the calibration split
# issue 5: LoRAPrune and flap + lora_recover on the same budget. A LoRAPrune step trains the dense
# (masked) model, about 5 s on 2 CPU cores, so 100 steps of 4 x 128 tokens is what fits here.
TRAIN_STEPS = 100

# name -> (pass, options), or a list of them run in order; None = the dense model
CONFIGS: dict[str, tuple[str, dict] | list[tuple[str, dict]] | None] = {
    "dense": None,
    "flap-20": ("flap", {"ratio": 0.2}),
    "flap-50": ("flap", {"ratio": 0.5}),
    "parity-20": ("flap", {"ratio": 0.2, "parity": True, "gqa": "kv_groups"}),
    "parity-50": ("flap", {"ratio": 0.5, "parity": True, "gqa": "kv_groups"}),
    "wanda_sp-20": ("wanda_sp", {"ratio": 0.2}),
    "wanda_sp-50": ("wanda_sp", {"ratio": 0.5}),
    "magnitude_sp-20": ("magnitude_sp", {"ratio": 0.2}),
    "magnitude_sp-50": ("magnitude_sp", {"ratio": 0.5}),
    # issue 4: CFSP, allocators as parts, least-squares compensation, recovery
    "cfsp-20": ("cfsp", {"ratio": 0.2}),
    "cfsp-50": ("cfsp", {"ratio": 0.5}),
    "cfsp-ref-50": ("cfsp", {"ratio": 0.5, "score": "reference"}),
    "cfsp-attn-20": ("cfsp", {"ratio": 0.2, "attention": True}),
    "cfsp-attn-50": ("cfsp", {"ratio": 0.5, "attention": True}),
    "flap-bb-20": ("flap", {"ratio": 0.2, "allocator": "block_budget"}),
    "flap-bb-50": ("flap", {"ratio": 0.5, "allocator": "block_budget"}),
    "flap-ls-20": ("flap", {"ratio": 0.2, "compensation": "least_squares"}),
    "flap-ls-50": ("flap", {"ratio": 0.5, "compensation": "least_squares"}),
    "flap-ls-seq-50": ("flap", {"ratio": 0.5, "compensation": "least_squares", "sequential": True}),
    "cfsp-ls-50": ("cfsp", {"ratio": 0.5, "compensation": "least_squares"}),
    "cfsp-ls-seq-50": ("cfsp", {"ratio": 0.5, "compensation": "least_squares", "sequential": True}),
    "flap-50+recover": [("flap", {"ratio": 0.5}), ("lora_recover", {"steps": RECOVERY_STEPS})],
    "cfsp-50+recover": [("cfsp", {"ratio": 0.5}), ("lora_recover", {"steps": RECOVERY_STEPS})],
    # issue 5: LoRAPrune (importance from the LoRA gradients, or exact group Taylor) vs flap + recovery
    "loraprune-20": ("loraprune", {"ratio": 0.2, "steps": TRAIN_STEPS, "importance": "lora"}),
    "loraprune-50": ("loraprune", {"ratio": 0.5, "steps": TRAIN_STEPS, "importance": "lora"}),
    "loraprune-exact-20": ("loraprune", {"ratio": 0.2, "steps": TRAIN_STEPS, "importance": "exact"}),
    "loraprune-exact-50": ("loraprune", {"ratio": 0.5, "steps": TRAIN_STEPS, "importance": "exact"}),
    "loraprune-global-50": ("loraprune", {"ratio": 0.5, "steps": TRAIN_STEPS, "allocator": "global"}),
    "flap-20+recover100": [("flap", {"ratio": 0.2}), ("lora_recover", {"steps": TRAIN_STEPS})],
    "flap-50+recover100": [("flap", {"ratio": 0.5}), ("lora_recover", {"steps": TRAIN_STEPS})],
}

# The reference FLAP code on this machine, same protocol (issue #2).
REFERENCE = {
    "dense": {"persuasion": 51.71, "northangerabbey": 45.09},
    "parity-20": {"persuasion": 65.97, "northangerabbey": 57.34, "prune_s": 538, "peak_rss_mb": 2600},
    "parity-50": {"persuasion": 268.10, "northangerabbey": 252.61, "prune_s": 1067, "peak_rss_mb": 2510},
}


def run_one(name: str, threads: int) -> dict:
    """Load, prune, evaluate one configuration in this process."""
    import torch

    from compress.calibration.sources import random_windows, read_text, sequential_windows, tokenize_text
    from compress.context import PassContext
    from compress.evaluation.perplexity import perplexity
    from compress.models.adapters import get_adapter
    from compress.models.loading import load_model
    from compress.registry import get_pass

    torch.set_num_threads(threads)
    loaded = load_model(MODEL, dtype="float32", device="cpu", progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = get_adapter(model)
    dense_linear, dense_total = adapter.decoder_linear_params(), adapter.param_counts()["total"]

    prune_s = 0.0
    config = CONFIGS[name]
    steps = [] if config is None else (config if isinstance(config, list) else [config])
    step_times, step_details = [], []
    if steps:

        def calibration() -> torch.Tensor:
            ids = tokenize_text(tokenizer, read_text(CALIBRATION["source"]))
            return random_windows(ids, CALIBRATION["samples"], CALIBRATION["seqlen"], CALIBRATION["seed"])

        ctx = PassContext(model=model, tokenizer=tokenizer, calibration_loader=calibration, batch_size=16, progress=False)
        for pass_name, options in steps:
            spec = get_pass(pass_name)
            instance = spec.cls(spec.options(**options))
            start = time.perf_counter()
            step = instance.run(ctx)
            step_times.append(round(time.perf_counter() - start, 1))
            step_details.append({k: v for k, v in step.details.items() if isinstance(v, (int, float, str))})
        prune_s = sum(step_times)
    prune_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    adapter = get_adapter(model)
    row = {
        "config": name,
        "pass": " + ".join(p for p, _ in steps) or None,
        "options": steps[0][1] if len(steps) == 1 else [{p: o} for p, o in steps],
        "step_s": step_times,
        "step_details": step_details,
        "decoder_linear": adapter.decoder_linear_params(),
        "total_params": adapter.param_counts()["total"],
        "pruning_ratio": 1 - adapter.decoder_linear_params() / dense_linear,
        "total_ratio": 1 - adapter.param_counts()["total"] / dense_total,
        "prune_s": round(prune_s, 1),
        "prune_peak_rss_mb": round(prune_peak_mb, 1),
    }
    for dataset in EVAL_SETS:
        windows = sequential_windows(tokenize_text(tokenizer, read_text(f"austen:{dataset}")), SEQLEN, WINDOWS)
        start = time.perf_counter()
        row[f"ppl_{dataset}"] = perplexity(model, windows, batch_size=16, progress=False).ppl
        row[f"eval_s_{dataset}"] = round(time.perf_counter() - start, 1)
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def print_table(rows: list[dict]) -> None:
    header = f"{'config':<16} {'dec. linears':>13} {'ratio':>7} {'total':>7} {'persuasion':>11} {'northanger':>11} {'prune s':>8} {'peak RSS':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['config']:<16} {r['decoder_linear'] / 1e6:>12.2f}M {r['pruning_ratio']:>7.2%} {r['total_ratio']:>7.2%} "
            f"{r['ppl_persuasion']:>11.2f} {r['ppl_northangerabbey']:>11.2f} {r['prune_s']:>8.1f} {r['prune_peak_rss_mb'] / 1024:>8.2f}G"
        )
    for name, ref in REFERENCE.items():
        mine = next((r for r in rows if r["config"] == name), None)
        if mine is None:
            continue
        parts = [f"{d}: {mine[f'ppl_{d}'] / ref[d] - 1:+.2%}" for d in EVAL_SETS]
        if "prune_s" in ref and mine["prune_s"]:
            parts.append(f"speed-up {ref['prune_s'] / mine['prune_s']:.2f}x")
            parts.append(f"peak RSS {mine['prune_peak_rss_mb'] / ref['peak_rss_mb']:.2f}x of reference")
        print(f"vs reference {name:<10} " + ", ".join(parts))
    flap50 = next((r for r in rows if r["config"] == "flap-50"), None)
    if flap50:
        ref = REFERENCE["parity-50"]
        print("flap-50 (default) vs reference 50%: " + ", ".join(f"{d} {flap50[f'ppl_{d}'] / ref[d] - 1:+.2%}" for d in EVAL_SETS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help=f"subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "llm_pruning.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        args.row_out.write_text(json.dumps(run_one(args.one, args.threads)))
        return
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.configs:
        row_file = args.out.with_suffix(f".{name}.json")
        cmd = [sys.executable, __file__, "--one", name, "--row-out", str(row_file), "--threads", str(args.threads)]
        subprocess.run(cmd, check=True)
        rows.append(json.loads(row_file.read_text()))
        row_file.unlink()
        print(f"done {name}: persuasion {rows[-1]['ppl_persuasion']:.2f}", flush=True)
        args.out.write_text(json.dumps({"protocol": {"model": MODEL, "calibration": CALIBRATION, "seqlen": SEQLEN,
                                                     "windows": WINDOWS, "eval": EVAL_SETS}, "rows": rows,
                                        "reference": REFERENCE}, indent=2))
    print()
    print_table(rows)
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
