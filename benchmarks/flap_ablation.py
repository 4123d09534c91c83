"""FLAP ablation: many variants from one set of calibration statistics.

Every non-sequential FLAP variant is a function of the dense model's statistics, so they are
gathered once (standard protocol: SmolLM2-135M, 256 × 128 Austen calibration windows, seed 0) and
each variant only scores, allocates, slices a copy of the dense model and is evaluated. A
``sequential`` variant allocates on those statistics too, then re-scores each layer on the pruned
copy (one more calibration pass, as the pass does). The evaluation is persuasion perplexity over
the first N windows of 128 tokens for each N of ``--windows``: the first windows are evaluated
once and the counts share them (64 is a quick proxy; 256 is the full protocol's persuasion figure,
see llm_pruning.py).

    python benchmarks/flap_ablation.py --ratio 0.5 --windows 64 256 --out docs/results/flap_ablation.json
    python benchmarks/flap_ablation.py --variants parity "default, no bias"   # some rows
    python benchmarks/flap_ablation.py --table --out docs/results/flap_ablation.json

Rows are keyed by variant. A run merges its rows into ``--out`` (default
bench-results/flap_ablation.json) when the file was written with the same ratio and windows,
replacing the variants it ran and keeping the others; each row records the command that measured
it. Prints one line per variant and the Markdown table of the file.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

from repo_paths import ROOT, command_line, display  # noqa: E402  (beside this script)

sys.path.insert(0, str(ROOT))

SEQLEN = 128
PROTOCOL = {"version": "v1", "model": "smollm2-135m", "dtype": "float32",
            "calibration": {"source": "austen", "samples": 256, "seqlen": SEQLEN, "seed": 0},
            "evaluation": {"source": "austen:persuasion", "seqlen": SEQLEN, "windows": "first N, sequential"}}

# label -> FlapPass options that change scoring/allocation ("plain": attention score not squared)
VARIANTS: dict[str, dict] = {
    "parity": {"parity": True, "gqa": "kv_groups"},
    "query_heads, plain": {"gqa": "query_heads", "square_attention": False, "skip_layers": []},
    "kv_groups, plain": {"gqa": "kv_groups", "square_attention": False, "skip_layers": []},
    "kv_groups, plain, sequential": {"gqa": "kv_groups", "square_attention": False, "skip_layers": [],
                                     "sequential": True},
    "kv_groups, squared": {"gqa": "kv_groups", "skip_layers": []},
    "query_heads, squared": {"gqa": "query_heads", "skip_layers": []},
    "kv_groups, wifn": {"gqa": "kv_groups", "metric": "wifn", "square_attention": False, "skip_layers": []},
    "default (kv_groups, squared, skip first+last)": {},
    "default + skip 0,1,-2,-1": {"skip_layers": [0, 1, -2, -1]},
    "query_heads, squared, skip first+last": {"gqa": "query_heads"},
    "kv_groups, plain, skip first+last": {"gqa": "kv_groups", "square_attention": False},
    "default + sequential": {"sequential": True},
    "default, no bias": {"compensation": "none"},
}


def perplexities(model, evaluation, counts: list[int]) -> dict[str, float]:
    """PPL over the first n windows for each n of ``counts`` (ascending), each window run once."""
    from compress.evaluation.perplexity import perplexity

    nll, done, out = 0.0, 0, {}
    for n in counts:
        result = perplexity(model, evaluation[done:n], batch_size=16, progress=False)
        nll += result.nll * result.tokens
        done = n
        out[str(n)] = math.exp(nll / (n * (evaluation.shape[1] - 1)))
    return out


def table(data: dict) -> str:
    counts = [str(n) for n in data["windows"]]
    head = ["variant", "options", "decoder linears removed", "heads", *[f"PPL@{n}" for n in counts]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = ["dense", *VARIANTS]
    for label in sorted(data["rows"], key=lambda k: order.index(k) if k in order else len(order)):
        row = data["rows"][label]
        options = ", ".join(f"{k}: {json.dumps(v)}" for k, v in row.get("options", {}).items()) or "–"
        cells = [label, options if label != "dense" else "–", f"{row['ratio']:.2%}", str(row.get("heads", "–")),
                 *[f"{row['ppl'][n]:.1f}" if n in row["ppl"] else "–" for n in counts]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--windows", type=int, nargs="+", default=[64],
                        help="evaluation window counts (each variant is scored at every one)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "flap_ablation.json")
    parser.add_argument("--table", action="store_true", help="only print the Markdown table of --out")
    args = parser.parse_args()
    counts = sorted(set(args.windows))

    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    data = {"script": "benchmarks/flap_ablation.py", "protocol": PROTOCOL, "ratio": args.ratio, "windows": counts,
            "rows": {}}
    if args.out.is_file():
        old = json.loads(args.out.read_text())
        if (old.get("ratio"), old.get("windows"), old.get("protocol")) != (args.ratio, counts, PROTOCOL):
            parser.error(f"{display(args.out)} was written with another ratio, windows or protocol; "
                         "choose another --out")
        data = old
    command = command_line(__file__)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")

    from compress.calibration.runner import LayerRunner
    from compress.calibration.sources import random_windows, read_text, sequential_windows, tokenize_text
    from compress.models.adapters import get_adapter
    from compress.models.loading import load_model
    from compress.pruning.scores import FluctuationScorer
    from compress.pruning.structured import PrunerSettings, StructuredPruner
    from compress.pruning.surgeon import apply_layer_plan
    from passes.flap.run import FlapPass

    loaded = load_model("smollm2-135m", progress=False)
    dense, tokenizer = loaded.model, loaded.tokenizer
    adapter = get_adapter(dense)
    c = PROTOCOL["calibration"]
    calibration = random_windows(tokenize_text(tokenizer, read_text(c["source"])), c["samples"], c["seqlen"], c["seed"])
    evaluation = sequential_windows(tokenize_text(tokenizer, read_text("austen:persuasion")), SEQLEN, counts[-1])

    start = time.perf_counter()
    collector = StructuredPruner(None, PrunerSettings(ratio=args.ratio, reference_statistics=True))
    runner = LayerRunner(adapter, calibration, batch_size=16, progress=True)
    runner.capture_inputs()
    stats = [collector.observe_block(runner, i, update=True) for i in range(adapter.num_layers)]
    runner.close()
    data["statistics_s"] = round(time.perf_counter() - start, 1)
    print(f"statistics: {data['statistics_s']} s", flush=True)
    if "dense" not in data["rows"]:
        start = time.perf_counter()
        ppl = perplexities(dense, evaluation, counts)
        data["rows"]["dense"] = {"ratio": 0.0, "heads": sum(w.heads for w in adapter.all_widths()), "ppl": ppl,
                                 "eval_s": round(time.perf_counter() - start, 1), "command": command}
        save()
        print(f"{'dense':<48} " + "  ".join(f"PPL@{n} {v:9.2f}" for n, v in ppl.items()), flush=True)

    for label in args.variants or VARIANTS:
        options = VARIANTS[label]
        start = time.perf_counter()
        flap = FlapPass(FlapPass.Options(ratio=args.ratio, **options))
        o = flap.options
        model = copy.deepcopy(dense)
        model_adapter = get_adapter(model)
        pruner = StructuredPruner(FluctuationScorer(o.metric, parity=o.parity, square_attention=o.square_attention),
                                  flap.settings())
        units = [pruner.layer_units(model_adapter, i, pruner.scorer(model_adapter, i, stats[i]))
                 for i in range(adapter.num_layers)]
        allocation = pruner.allocate(units)
        if not pruner.settings.sequential:
            for i, (u, (a, m)) in enumerate(zip(units, allocation)):
                apply_layer_plan(model_adapter, pruner.layer_plan(model_adapter, u, a, m, stats[i]))
        else:  # as StructuredPruner._run_global: widths from the dense statistics,
            # channels and biases re-scored on the pruned copy
            rescoring = LayerRunner(model_adapter, calibration, batch_size=16, progress=False)
            rescoring.capture_inputs()
            for i in range(adapter.num_layers):
                layer_stats = pruner.observe_block(rescoring, i, update=False)
                u = pruner.layer_units(model_adapter, i, pruner.scorer(model_adapter, i, layer_stats))
                apply_layer_plan(model_adapter, pruner.layer_plan(model_adapter, u, *allocation[i], layer_stats))
                rescoring.run_block(i, update=True)
            rescoring.close()
        prune_s = time.perf_counter() - start
        ratio = 1 - model_adapter.decoder_linear_params() / adapter.decoder_linear_params()
        start = time.perf_counter()
        ppl = perplexities(model, evaluation, counts)
        heads = sum(w.heads for w in model_adapter.all_widths())
        data["rows"][label] = {"options": options, "ratio": ratio, "heads": heads, "ppl": ppl,
                               "prune_s": round(prune_s, 1), "eval_s": round(time.perf_counter() - start, 1),
                               "command": command}
        save()
        print(f"{label:<48} ratio {ratio:.4f}  " + "  ".join(f"PPL@{n} {v:9.2f}" for n, v in ppl.items())
              + f"  ({prune_s:.0f} s + {data['rows'][label]['eval_s']:.0f} s)", flush=True)
        del model

    save()
    print("\n" + table(data))
    print(f"JSON: {display(args.out)}")


if __name__ == "__main__":
    main()
