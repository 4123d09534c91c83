"""FLAP ablation: many variants from one set of calibration statistics.

Every non-sequential FLAP variant is a function of the dense model's statistics, so they are
gathered once (standard protocol: SmolLM2-135M, 256 × 128 Austen calibration windows, seed 0) and
each variant only scores, allocates, slices a copy of the dense model and is evaluated. The
evaluation is a quick proxy: persuasion perplexity over the first ``--windows`` windows (64 by
default; the full protocol uses 256, see llm_pruning.py).

    python benchmarks/flap_ablation.py --ratio 0.5 --windows 64

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# label -> (FlapPass options that change scoring/allocation)
VARIANTS: dict[str, dict] = {
    "parity": {"parity": True, "gqa": "kv_groups"},
    "query_heads, plain": {"gqa": "query_heads", "square_attention": False, "skip_layers": []},
    "kv_groups, plain": {"gqa": "kv_groups", "square_attention": False, "skip_layers": []},
    "kv_groups, squared": {"gqa": "kv_groups", "skip_layers": []},
    "query_heads, squared": {"gqa": "query_heads", "skip_layers": []},
    "kv_groups, wifn": {"gqa": "kv_groups", "metric": "wifn", "square_attention": False, "skip_layers": []},
    "default (kv_groups, squared, skip first+last)": {},
    "default + skip 0,1,-2,-1": {"skip_layers": [0, 1, -2, -1]},
    "query_heads, squared, skip first+last": {"gqa": "query_heads"},
    "default, no bias": {"compensation": "none"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "flap_ablation.json")
    args = parser.parse_args()

    from compress.calibration.runner import LayerRunner
    from compress.calibration.sources import random_windows, read_text, sequential_windows, tokenize_text
    from compress.evaluation.perplexity import perplexity
    from compress.models.adapters import get_adapter
    from compress.models.loading import load_model
    from compress.pruning.scores import FluctuationScorer
    from compress.pruning.structured import PrunerSettings, StructuredPruner
    from compress.pruning.surgeon import apply_layer_plan
    from passes.flap.run import FlapPass

    loaded = load_model("smollm2-135m", progress=False)
    dense, tokenizer = loaded.model, loaded.tokenizer
    adapter = get_adapter(dense)
    calibration = random_windows(tokenize_text(tokenizer, read_text("austen")), 256, 128, 0)
    evaluation = sequential_windows(tokenize_text(tokenizer, read_text("austen:persuasion")), 128, args.windows)

    start = time.perf_counter()
    collector = StructuredPruner(None, PrunerSettings(ratio=args.ratio, reference_statistics=True))
    runner = LayerRunner(adapter, calibration, batch_size=16, progress=True)
    runner.capture_inputs()
    stats = [collector.observe_block(runner, i, update=True) for i in range(adapter.num_layers)]
    print(f"statistics: {time.perf_counter() - start:.1f} s")
    rows = [{"variant": "dense", "ppl": perplexity(dense, evaluation, batch_size=16, progress=False).ppl, "ratio": 0.0}]

    for label, options in VARIANTS.items():
        flap = FlapPass(FlapPass.Options(ratio=args.ratio, **options))
        o = flap.options
        model = copy.deepcopy(dense)
        model_adapter = get_adapter(model)
        pruner = StructuredPruner(FluctuationScorer(o.metric, parity=o.parity, square_attention=o.square_attention), flap.settings())
        units = [pruner.layer_units(model_adapter, i, pruner.scorer(model_adapter, i, stats[i])) for i in range(adapter.num_layers)]
        counts = pruner.allocate(units)
        plans = [pruner.layer_plan(model_adapter, u, a, m, stats[i]) for i, (u, (a, m)) in enumerate(zip(units, counts))]
        for plan in plans:
            apply_layer_plan(model_adapter, plan)
        ratio = 1 - model_adapter.decoder_linear_params() / adapter.decoder_linear_params()
        ppl = perplexity(model, evaluation, batch_size=16, progress=False).ppl
        rows.append({"variant": label, "options": options, "ppl": ppl, "ratio": ratio,
                     "heads": sum(w.heads for w in model_adapter.all_widths())})
        print(f"{label:<48} ratio {ratio:.4f}  PPL@{args.windows} {ppl:9.2f}", flush=True)
        del model

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ratio": args.ratio, "windows": args.windows, "rows": rows}, indent=2))
    print(f"\n{'variant':<48} {'ratio':>7} {'PPL':>9}")
    for r in rows:
        print(f"{r['variant']:<48} {r['ratio']:>7.2%} {r['ppl']:>9.2f}")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
