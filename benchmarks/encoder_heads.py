"""Attention-head pruning of real encoders: all-MiniLM-L6-v2 (text) and DINOv2-S/14 (images).

    python benchmarks/encoder_heads.py                      # both models, every score, 25% and 50%
    python benchmarks/encoder_heads.py --part minilm --configs output_norm taylor_gate

Every row runs a recipe through `compress run`'s pipeline (calibration, the `heads` or
`head_routing` pass, safetensors + ONNX export, reload and ONNX parity gates, evaluation):

- MiniLM: calibration = 256 random sentences of the Austen calibration split (seed 0); figures on
  the first 1,000 sentences of Persuasion (≥ 6 words, at most 128 tokens): mean / min cosine of
  pruned vs dense sentence embeddings (mean pooling, L2), Spearman rank agreement of the cosine
  similarities of 200 seeded sentence pairs, and ONNX Runtime latency of dense vs pruned on the
  same batches (runs alternate; medians of 7 and their ratio).
- DINOv2-S/14: calibration = 64 images of the textile train split (stratified 70 / 30, seed 0),
  224²; figures on 300 test images (the split's first 300, in its seeded order): feature cosine
  ([CLS ; mean patch]), accuracy of the logistic probe fitted on dense features of 300 train images
  (applied to pruned features), and of a probe refitted on pruned features of the same train images.

Prints a table and writes JSON (default bench-results/encoder_heads.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "bench-results" / "encoder_heads"
RATIOS = (0.25, 0.5)
# config name -> pass entry (ratio filled in per row)
CONFIGS = {
    "weight_norm": {"heads": {"score": "weight_norm", "compensation": "none"}},
    "output_norm": {"heads": {"score": "output_norm", "compensation": "none"}},
    "usage_top1": {"heads": {"score": "usage_top1", "compensation": "none"}},
    "ablation": {"heads": {"score": "ablation", "compensation": "none"}},
    "taylor_gate": {"heads": {"score": "taylor_gate", "compensation": "none"}},
    "taylor_gate-iterative": {"heads": {"score": "taylor_gate", "schedule": "iterative", "compensation": "none"}},
    "output_norm-uniform": {"heads": {"score": "output_norm", "allocator": "uniform", "compensation": "none"}},
    "head_routing": {"head_routing": {}},
    # with FLAP-style bias compensation (the pass's default)
    "weight_norm+bias": {"heads": {"score": "weight_norm"}},
    "output_norm+bias": {"heads": {"score": "output_norm"}},
    "ablation+bias": {"heads": {"score": "ablation"}},
    "taylor_gate+bias": {"heads": {"score": "taylor_gate"}},
    "taylor_gate-iterative+bias": {"heads": {"score": "taylor_gate", "schedule": "iterative"}},
}
MODELS = {
    "minilm": {"source": "all-minilm-l6-v2", "calibration": {"source": "austen", "samples": 256, "seqlen": 128},
               "evaluate": {"datasets": ["austen:persuasion"], "items": 1000, "seqlen": 128, "batch_size": 32}},
    "dinov2": {"source": "dinov2-s14", "calibration": {"source": "textile", "samples": 64, "batch_size": 16},
               "evaluate": {"datasets": ["textile"], "items": 300, "batch_size": 32}},
}


def pass_entry(config: str, ratio: float) -> dict:
    (name, options), = CONFIGS[config].items()
    if name == "head_routing":
        return {name: {"keep": 1 - ratio}}
    return {name: {**options, "ratio": ratio}}


def run_row(model: str, config: str, ratio: float | None) -> dict:
    """Run one recipe (``ratio`` None: the dense model through the same pipeline); its report."""
    from compress.run import run_recipe
    from compress.recipe import parse_recipe

    spec = MODELS[model]
    out = CACHE / model / (f"{config}-{ratio}" if ratio is not None else "dense")
    data = {"name": out.name, "model": spec["source"], "seed": 0,
            "calibration": {**spec["calibration"], "seed": 0},
            "passes": [pass_entry(config, ratio)] if ratio is not None else [],
            "export": {"output": str(out), "formats": ["safetensors", "onnx"]},
            "evaluate": spec["evaluate"]}
    start = time.perf_counter()
    result = run_recipe(parse_recipe(data, "encoder_heads.py"), progress=False)
    if not result.passed:
        raise SystemExit(f"{out.name}: {result.failures}")
    report = result.report
    report["run_s"] = round(time.perf_counter() - start, 1)
    return report


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_feeds(model: str) -> list[dict]:
    """Four fixed batches for the latency comparison."""
    from transformers import AutoTokenizer

    from compress.calibration.encoder_data import ImageBatches, text_batches, textile_split
    from compress.calibration.sources import first_sentences
    from compress.models.loading import PACKAGED_ENCODERS

    if model == "minilm":
        tokenizer = AutoTokenizer.from_pretrained(PACKAGED_ENCODERS["all-minilm-l6-v2"]())
        batches = text_batches(tokenizer, first_sentences("austen:persuasion", 128), 32, 128)
    else:
        images = ImageBatches(textile_split().test[:64], 224, 16)
        batches = [images[i] for i in range(len(images))]
    return [{k: v.numpy() for k, v in b.items()} for b in batches[:4]]


def ort_latency(dense_path: Path, pruned_path: Path, feeds: list[dict], runs: int = 7) -> tuple[float, float]:
    """Median ms per batch of the dense and the pruned graph, runs alternating."""
    dense, pruned = session(dense_path), session(pruned_path)
    names = {s: {i.name for i in s.get_inputs()} for s in (dense, pruned)}
    times: dict = {dense: [], pruned: []}
    for _ in range(runs):
        for sess in (dense, pruned):
            start = time.perf_counter()
            for f in feeds:
                sess.run(None, {k: v for k, v in f.items() if k in names[sess]})
            times[sess].append((time.perf_counter() - start) * 1000 / len(feeds))
    return statistics.median(times[dense]), statistics.median(times[pruned])


def row_of(model: str, config: str, ratio: float, report: dict, dense_onnx: Path, feeds) -> dict:
    (name, figures), = report["evaluation"]["datasets"].items()
    details = report["passes"][0]["details"]
    pruned_onnx = Path(report["artifacts"]["dir"]) / "onnx" / "model.onnx"
    dense_ms, pruned_ms = ort_latency(dense_onnx, pruned_onnx, feeds)
    row = {"model": model, "config": config, "ratio": ratio,
           "heads_removed": details["heads_removed"],
           "params_removed": report["params"]["total_ratio"],
           "mean_cosine": figures["mean_cosine"], "min_cosine": figures["min_cosine"], "spearman": figures["spearman"],
           "dense_ms": dense_ms, "pruned_ms": pruned_ms, "speedup": dense_ms / pruned_ms,
           "onnx_max_abs": report["onnx"]["validation"]["parity"]["last_hidden_state"]["max_abs"],
           "run_s": report["run_s"], "kept_heads": details.get("kept_heads")}
    for key in ("probe_dense_accuracy", "probe_accuracy", "probe_retrained_accuracy"):
        if key in figures:
            row[key] = figures[key]
    return row


def print_row(row: dict) -> None:
    skip = ("model", "config", "kept_heads")
    figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k not in skip)
    print(f"{row['model']:<7} {row['config']:<24} {figures}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["minilm", "dinov2", "all"], default="all")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--skip-dense", action="store_true", help="reuse the dense run's folder from an earlier run")
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "encoder_heads.json")
    args = parser.parse_args()
    models = ["minilm", "dinov2"] if args.part == "all" else [args.part]
    rows = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    for model in models:
        dense_onnx = CACHE / model / "dense" / "onnx" / "model.onnx"
        if not (args.skip_dense and dense_onnx.is_file()):
            dense = run_row(model, "dense", None)
            (_, figures), = dense["evaluation"]["datasets"].items()
            print(f"{model}: dense through the pipeline: cosine {figures['mean_cosine']:.6f}, "
                  f"probe {figures.get('probe_dense_accuracy')}", flush=True)
        feeds = latency_feeds(model)
        for ratio in args.ratios:
            for config in args.configs:
                row = row_of(model, config, ratio, run_row(model, config, ratio), dense_onnx, feeds)
                rows = [r for r in rows if (r["model"], r["config"], r["ratio"]) != (model, config, ratio)] + [row]
                print_row(row)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
