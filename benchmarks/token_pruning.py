"""Token pruning and merging baked into the graph, on real encoders: all-MiniLM-L6-v2 and DINOv2-S/14.

    python benchmarks/token_pruning.py                        # both models, every rewrite and keep ratio
    python benchmarks/token_pruning.py --part dinov2 --configs cls_topk tome --ratios 0.5

Every row runs a recipe through `compress run`'s pipeline (the `token_prune` or `token_merge` pass,
safetensors + ONNX export, reload gate, ONNX gates on kept-index sets and values, evaluation),
off the shelf (no fine-tuning):

- MiniLM: figures on the first 1,000 sentences of Persuasion, one sentence per batch so that the
  keep ratio applies to each sentence's own length: mean / min cosine of pruned vs dense sentence
  embeddings (size-weighted mean pooling, L2) and Spearman agreement over 200 pairs. Latency: ONNX
  Runtime on 4 fixed padded batches of 32 sentences (the token budget then follows the padded length).
- DINOv2-S/14 at 224² (256 patches + CLS): figures on 300 textile test images: feature cosine
  ([CLS ; size-weighted mean of the kept patches]), accuracy of the logistic probe fitted on dense
  features of 300 train images (applied to pruned features) and of a probe refitted on pruned
  features. Latency: 4 batches of 16 images.
- Stages: cls_topk and divprune prune after layers L/4, L/2, 3L/4 (EViT's 3, 6, 9 of 12; MiniLM
  1, 3, 4), each keeping keep_ratio^(1/3); tome merges after every layer but the last.
- Kept-index check: the exported graph in ONNX Runtime vs PyTorch on 100 inputs (DINOv2: 100 real
  test images and 100 standard-normal images; MiniLM: sentences 1,001-1,100 of Persuasion in padded
  batches of 20), counting inputs whose sets of
  kept token indices differ.

Latencies are medians of 7 alternating dense / pruned runs on a shared 2-core machine: noisy.
Prints a row as each finishes, then a markdown table per model, and writes JSON (default
bench-results/token_pruning.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from encoder_heads import latency_feeds, ort_latency, session  # noqa: E402  (the head benchmark's latency protocol)

CACHE = ROOT / "bench-results" / "token_pruning"
RATIOS = {"minilm": (0.7, 0.5), "dinov2": (0.7, 0.5, 0.25)}
CONFIGS = {
    "cls_topk": {"token_prune": {"method": "cls_topk"}},
    "cls_topk-ensemble": {"token_prune": {"method": "cls_topk", "score_layers": 3}},
    "divprune": {"token_prune": {"method": "divprune"}},
    "tome": {"token_merge": {}},
}
TEXT_CONFIGS = ("cls_topk", "cls_topk-ensemble", "tome")
MODELS = {
    "minilm": {"source": "all-minilm-l6-v2",
               "evaluate": {"datasets": ["austen:persuasion"], "items": 1000, "seqlen": 128, "batch_size": 1}},
    "dinov2": {"source": "dinov2-s14", "evaluate": {"datasets": ["textile"], "items": 300, "batch_size": 32}},
}


def run_row(model: str, config: str | None, ratio: float | None) -> dict:
    """Run one recipe (``config`` None: the dense model through the same pipeline); its report."""
    from compress.run import run_recipe
    from compress.recipe import parse_recipe

    spec = MODELS[model]
    out = CACHE / model / (f"{config}-{ratio}" if config else "dense")
    passes = []
    if config:
        (name, options), = CONFIGS[config].items()
        passes = [{name: {**options, "keep_ratio": ratio}}]
    data = {"name": out.name, "model": spec["source"], "seed": 0, "passes": passes,
            "export": {"output": str(out), "formats": ["safetensors", "onnx"]}, "evaluate": spec["evaluate"]}
    start = time.perf_counter()
    result = run_recipe(parse_recipe(data, "token_pruning.py"), progress=False)
    if not result.passed:
        raise SystemExit(f"{out.name}: {result.failures}")
    report = result.report
    report["run_s"] = round(time.perf_counter() - start, 1)
    return report


def index_check_inputs(model: str) -> dict[str, list[dict]]:
    """Named lists of input batches (100 inputs each) for the kept-index comparison."""
    import torch
    from transformers import AutoTokenizer

    from compress.calibration.encoder_data import ImageBatches, text_batches, textile_split
    from compress.calibration.sources import first_sentences
    from compress.models.loading import PACKAGED_ENCODERS

    if model == "minilm":
        tokenizer = AutoTokenizer.from_pretrained(PACKAGED_ENCODERS["all-minilm-l6-v2"]())
        sentences = first_sentences("austen:persuasion", 1100)[1000:]  # after the 1,000 evaluated ones
        return {"sentences": text_batches(tokenizer, sentences, 20, 128)}  # padded batches of 20
    images = ImageBatches(textile_split().test[-100:], 224, 20)
    generator = torch.Generator().manual_seed(0)
    noise = [{"pixel_values": torch.randn(20, 3, 224, 224, generator=generator)} for _ in range(5)]
    return {"images": [images[i] for i in range(len(images))], "noise": noise}


def kept_index_check(folder: Path, model: str) -> dict:
    """Inputs whose kept index sets differ between the reloaded export (PyTorch) and its ONNX graph."""
    import torch
    from transformers import AutoModel

    import compress.models  # noqa: F401
    from exporters.encoder import kept_index_agreement

    reloaded = AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    graph = session(folder / "onnx" / "model.onnx")
    names = [i.name for i in graph.get_inputs()]
    result = {}
    for name, batches in index_check_inputs(model).items():
        inputs, mismatches = 0, 0
        for batch in batches:
            with torch.no_grad():
                expected = reloaded(**batch)
            feeds = {k: batch[k].numpy() for k in names}
            _, sizes, positions = graph.run(["last_hidden_state", "token_sizes", "kept_positions"], feeds)
            agreement = kept_index_agreement(expected.token_sizes.numpy(), expected.kept_positions.numpy(),
                                             sizes, positions)
            inputs += agreement["kept_index_rows"]
            mismatches += agreement["kept_index_mismatches"]
        result[name] = {"inputs": inputs, "mismatches": mismatches}
    return result


def row_of(model: str, config: str, ratio: float, report: dict, dense_onnx: Path, feeds) -> dict:
    (name, figures), = report["evaluation"]["datasets"].items()
    details = report["passes"][0]["details"]
    folder = Path(report["artifacts"]["dir"])
    dense_ms, pruned_ms = ort_latency(dense_onnx, folder / "onnx" / "model.onnx", feeds)
    row = {"model": model, "config": config, "keep_ratio": ratio,
           "tokens_out": details.get("tokens_out"), "tokens_in": details.get("tokens_in"),
           "mean_cosine": figures["mean_cosine"], "min_cosine": figures["min_cosine"], "spearman": figures["spearman"],
           "dense_ms": dense_ms, "pruned_ms": pruned_ms, "speedup": dense_ms / pruned_ms,
           "onnx_max_abs": report["onnx"]["validation"]["parity"]["last_hidden_state"]["max_abs"],
           "onnx_nodes": report["onnx"]["nodes"], "run_s": report["run_s"],
           "kept_index": kept_index_check(folder, model)}
    for key in ("probe_dense_accuracy", "probe_accuracy", "probe_retrained_accuracy"):
        if key in figures:
            row[key] = figures[key]
    return row


def print_row(row: dict) -> None:
    skip = ("model", "config")
    figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k not in skip)
    print(f"{row['model']:<7} {row['config']:<18} {figures}", flush=True)


def print_tables(rows: list[dict]) -> None:
    """The rows as one markdown table per model, keep ratio descending."""
    order = list(CONFIGS)
    for model in ("minilm", "dinov2"):
        selected = sorted((r for r in rows if r["model"] == model),
                          key=lambda r: (-r["keep_ratio"], order.index(r["config"])))
        if not selected:
            continue
        probe = model == "dinov2"
        header = ["rewrite", "keep", "tokens", "cos mean / min", "Spearman"] + (
            ["probe dense fit", "probe refit"] if probe else []) + ["ORT dense ms", "pruned ms", "speed-up",
                                                                   "kept-index mismatches"]
        print(f"\n{model}" + (f" (dense probe {selected[0]['probe_dense_accuracy']:.3f})" if probe else ""))
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for r in selected:
            cells = [r["config"], r["keep_ratio"], r["tokens_out"] or "",
                     f"{r['mean_cosine']:.4f} / {r['min_cosine']:.3f}", f"{r['spearman']:.3f}"]
            if probe:
                cells += [f"{r['probe_accuracy']:.3f}", f"{r['probe_retrained_accuracy']:.3f}"]
            cells += [f"{r['dense_ms']:.0f}", f"{r['pruned_ms']:.0f}", f"{r['speedup']:.2f}x",
                      ", ".join(f"{name} {v['mismatches']}/{v['inputs']}" for name, v in r["kept_index"].items())]
            print("| " + " | ".join(str(c) for c in cells) + " |")


def remeasure_latency(rows: list[dict], out: Path) -> None:
    """Replace every row's dense / pruned ORT latency with a new measurement (same protocol)."""
    feeds = {}
    for row in rows:
        model = row["model"]
        feeds.setdefault(model, latency_feeds(model))
        folder = CACHE / model / f"{row['config']}-{row['keep_ratio']}"
        dense_ms, pruned_ms = ort_latency(CACHE / model / "dense" / "onnx" / "model.onnx",
                                          folder / "onnx" / "model.onnx", feeds[model])
        row.update(dense_ms=dense_ms, pruned_ms=pruned_ms, speedup=dense_ms / pruned_ms, latency_remeasured=True)
        print_row(row)
    out.write_text(json.dumps({"rows": rows}, indent=2))
    print_tables(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["minilm", "dinov2", "all"], default="all")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--ratios", nargs="+", type=float, help="keep ratios (default: 0.7 0.5 for MiniLM, "
                        "0.7 0.5 0.25 for DINOv2)")
    parser.add_argument("--skip-dense", action="store_true", help="reuse the dense run's folder from an earlier run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "token_pruning.json")
    parser.add_argument("--latency-only", action="store_true", help="re-measure only the ORT latencies of the rows "
                        "already in --out, from their exported folders (run it on a quiet machine)")
    args = parser.parse_args()

    rows = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    if args.latency_only:
        remeasure_latency(rows, args.out)
        return
    for model in (["minilm", "dinov2"] if args.part == "all" else [args.part]):
        dense_onnx = CACHE / model / "dense" / "onnx" / "model.onnx"
        if not (args.skip_dense and dense_onnx.is_file()):
            dense = run_row(model, None, None)
            (figures,) = dense["evaluation"]["datasets"].values()
            print(f"{model}: dense through the pipeline: cosine {figures['mean_cosine']:.6f}, "
                  f"probe {figures.get('probe_accuracy')}", flush=True)
        feeds = latency_feeds(model)
        configs = [c for c in args.configs if model != "minilm" or c in TEXT_CONFIGS]
        for ratio in args.ratios or RATIOS[model]:
            for config in configs:
                row = row_of(model, config, ratio, run_row(model, config, ratio), dense_onnx, feeds)
                print_row(row)
                rows = [r for r in rows if (r["model"], r["config"], r["keep_ratio"]) != (model, config, ratio)]
                rows.append(row)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"rows": rows}, indent=2))
    print_tables(rows)
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
