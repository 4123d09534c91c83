"""ONNX Runtime deployment speed: SmolLM2-135M dense vs FLAP-pruned 20 % and 50 %.

Each variant is built (pruned on the standard calibration protocol of ``llm_pruning.py``) and
exported with ``exporters.onnx.export_onnx`` in its own subprocess, into a cache folder
(``bench-results/onnx_speed/<variant>/``) that later runs reuse. The timing then opens every
variant's session (``optimization="all"``) in ONE process, which holds no torch model, and runs

    prefill   batch × seqlen tokens, empty past (batch 1 and 8, seqlen 128 by default)
    decode    batch 1, one token, past of seqlen positions built by a real prefill; by default the
              same single step is timed over and over with that fixed past (``--decode-mode
              fixed``); ``--decode-mode chain`` feeds each step's present back instead (the past
              grows from seqlen to seqlen + repeats)

after warm-up, alternating between variants round-robin (v1, v2, v3, v1, v2, v3, …) so machine
noise hits them all alike. Only ``session.run`` is timed (the feeds are built beforehand; on CUDA
inputs and outputs stay on the GPU through IOBinding). Peak RSS is measured per variant in a
separate small subprocess that opens the session and runs the largest prefill once.

    python benchmarks/onnx_speed.py                                   # full run (CPU, all cores)
    python benchmarks/onnx_speed.py --variants dense flap-50 --repeats 10
    python benchmarks/onnx_speed.py --device cuda                     # needs onnxruntime-gpu and a GPU
    python benchmarks/onnx_speed.py --variants dense --repeats 2 --warmup 1 --decode-repeats 8 \\
        --out /tmp/onnx_speed_smoke.json                             # smoke test

Prints a table and writes JSON (``--out``, default ``bench-results/onnx_speed.json``) with every
median, p10/p90, quartiles, per-repeat samples, analytic FLOPs, the environment and the method.
The figure of merit is ``efficiency = speed-up / FLOP ratio`` (both relative to dense); the issue's
target is efficiency >= 0.85 for flap-50 prefill at 8 x 128 on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from llm_pruning import CALIBRATION, CONFIGS, MODEL  # noqa: E402  (the shared protocol)

VARIANTS = {name: CONFIGS[name] for name in ("dense", "flap-20", "flap-50")}
META_FILE = "variant.json"  # written by the build step beside export.json: widths for the FLOP count
DEFAULT_CACHE = ROOT / "bench-results" / "onnx_speed"
DEFAULT_OUT = ROOT / "bench-results" / "onnx_speed.json"
TARGET = {"variant": "flap-50", "workload": "prefill_8x128", "device": "cpu", "min_efficiency": 0.85}


# ===================================================================================== build
def model_shape(model) -> dict:
    """Everything the analytic FLOP count needs, read from the modules (pruned widths included)."""
    from compress.models.adapters import get_adapter

    adapter = get_adapter(model)
    return {
        "num_layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "head_dim": adapter.head_dim,
        "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
        "layers": [{"heads": w.heads, "kv_heads": w.kv_heads, "intermediate": w.intermediate} for w in adapter.all_widths()],
        "params": adapter.param_counts(),
    }


def build_variant(name: str, folder: Path, threads: int) -> None:
    """Load SmolLM2, prune it (unless dense) and export it to ``folder`` (written to a scratch folder
    first, renamed into place when complete)."""
    import torch

    from compress.calibration.sources import random_windows, read_text, tokenize_text
    from compress.context import PassContext
    from compress.models.loading import load_model
    from compress.registry import get_pass
    from exporters.onnx import OnnxExportOptions, export_onnx

    torch.set_num_threads(threads)
    loaded = load_model(MODEL, dtype="float32", device="cpu", progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    dense_shape = model_shape(model)

    prune_s = 0.0
    config = VARIANTS[name]
    if config is not None:
        pass_name, options = config
        spec = get_pass(pass_name)

        def calibration() -> torch.Tensor:
            ids = tokenize_text(tokenizer, read_text(CALIBRATION["source"]))
            return random_windows(ids, CALIBRATION["samples"], CALIBRATION["seqlen"], CALIBRATION["seed"])

        ctx = PassContext(model=model, tokenizer=tokenizer, calibration_loader=calibration, batch_size=16, progress=False)
        start = time.perf_counter()
        spec.cls(spec.options(**options)).run(ctx)
        prune_s = time.perf_counter() - start

    scratch = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    start = time.perf_counter()
    export = export_onnx(model, tokenizer, scratch, OnnxExportOptions(slim=True))
    export_s = time.perf_counter() - start
    meta = {
        "variant": name,
        "pass": config[0] if config else None,
        "options": config[1] if config else {},
        "model": MODEL,
        "calibration": CALIBRATION if config else None,
        "shape": model_shape(model),
        "dense_shape": dense_shape,
        "prune_s": round(prune_s, 1),
        "export_s": round(export_s, 1),
        "onnx_nodes": export.nodes,
        "onnx_bytes": export.bytes,
        "torch": torch.__version__,
    }
    (scratch / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)
    print(f"built {name}: prune {prune_s:.1f} s, export {export_s:.1f} s, {export.nodes} nodes, "
          f"{export.bytes / 2**20:.1f} MiB -> {folder}", flush=True)


def is_built(folder: Path) -> bool:
    return (folder / "export.json").is_file() and (folder / META_FILE).is_file() and (folder / "model.onnx").is_file()


# ===================================================================================== FLOPs
def analytic_flops(shape: dict, batch: int, seq: int, past: int) -> dict:
    """Forward FLOPs of one graph run over ``batch`` × ``seq`` new tokens with ``past`` cached positions.

    With T = batch·seq, ctx = past + seq, hidden H, head dim d, vocab V and layer i's widths
    (heads h_i, KV heads k_i, MLP channels m_i):

        linear    = 2·T·Σ_i [ H·h_i·d (q) + 2·H·k_i·d (k, v) + h_i·d·H (o) + 3·H·m_i (gate, up, down) ]
        attention = Σ_i 2·2·batch·seq·ctx·h_i·d        (Q·Kᵀ and P·V; the full seq × ctx block is
                                                        computed, the causal mask does not skip work)
        lm_head   = 2·T·H·V                            (the graph emits logits for every position)

    Embedding gathers, norms, RoPE, softmax, SiLU, biases and residual adds are ignored (< 1 %).
    """
    H, d, V = shape["hidden_size"], shape["head_dim"], shape["vocab_size"]
    tokens, ctx = batch * seq, past + seq
    linear = attention = 0
    for w in shape["layers"]:
        q, kv = w["heads"] * d, w["kv_heads"] * d
        linear += 2 * tokens * (H * q + 2 * H * kv + q * H + 3 * H * w["intermediate"])
        attention += 2 * 2 * batch * seq * ctx * w["heads"] * d
    lm_head = 2 * tokens * H * V
    return {"total": linear + attention + lm_head, "linear": linear, "attention": attention, "lm_head": lm_head}


# ===================================================================================== sessions
def open_decoder(folder: Path, device: str, threads: int, spinning: bool):
    from compress.onnx_runtime import CUDA_PROVIDER, OrtDecoder

    entries = {} if spinning else {"session.intra_op.allow_spinning": "0"}
    decoder = OrtDecoder(folder, device=device, optimization="all", threads=threads, require_device=True,
                         session_config=entries)
    assert not device.startswith("cuda") or decoder.provider == CUDA_PROVIDER, decoder.provider
    return decoder


def token_ids(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int64)


def feeds_for(decoder, input_ids: np.ndarray, past) -> dict:
    batch, seq = input_ids.shape
    past_len = past[0][0].shape[2]
    feeds = {
        "input_ids": input_ids,
        "attention_mask": np.ones((batch, past_len + seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy(),
    }
    for layer, (key, value) in enumerate(past):
        key_name, value_name = decoder.spec.past_names(layer)
        feeds[key_name], feeds[value_name] = key, value
    return feeds


class Runner:
    """One timed unit of work for one variant: ``run()`` is timed, ``advance()`` (untimed) prepares
    the next one (only the chained decode changes its feeds)."""

    def __init__(self, decoder, feeds: dict, device: str, iobinding: bool, chain: bool = False):
        self.decoder, self.feeds, self.chain = decoder, feeds, chain
        self.session = decoder.session
        self.outputs = None
        self.binding = None
        if device.startswith("cuda") and iobinding and not chain:
            import onnxruntime as ort

            device_id = int(device.split(":", 1)[1]) if ":" in device else 0
            self.binding = self.session.io_binding()
            self._device_inputs = []  # keep the device copies alive as long as the binding
            for name, array in feeds.items():
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", device_id)
                self._device_inputs.append(value)
                self.binding.bind_ortvalue_input(name, value)
            for name in decoder.spec.output_names:
                self.binding.bind_output(name, "cuda", device_id)

    def run(self) -> None:
        if self.binding is not None:
            self.session.run_with_iobinding(self.binding)  # the CUDA EP synchronises at the end of Run
        else:
            self.outputs = self.session.run(None, self.feeds)

    def advance(self) -> None:
        if self.chain:
            logits, present = self.outputs[0], self.outputs[1:]
            past = [(present[2 * i], present[2 * i + 1]) for i in range(self.decoder.spec.num_layers)]
            token = np.argmax(logits[:, -1], axis=-1).astype(np.int64)[:, None]
            self.feeds = feeds_for(self.decoder, token, past)
        self.outputs = None


def decode_runner(decoder, seqlen: int, device: str, iobinding: bool, chain: bool) -> Runner:
    """Batch 1, one new token, past of ``seqlen`` positions from a real prefill of ``seqlen`` tokens."""
    prompt = token_ids(decoder.spec.vocab_size, 1, seqlen, seed=1)
    logits, past = decoder(prompt)
    token = np.argmax(logits[:, -1], axis=-1).astype(np.int64)[:, None]
    return Runner(decoder, feeds_for(decoder, token, past), device, iobinding, chain=chain)


def summarize(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms)
    p10, q1, median, q3, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return {
        "median_ms": round(float(median), 3),
        "p10_ms": round(float(p10), 3),
        "p90_ms": round(float(p90), 3),
        "q1_ms": round(float(q1), 3),
        "q3_ms": round(float(q3), 3),
        "min_ms": round(float(a.min()), 3),
        "mean_ms": round(float(a.mean()), 3),
        "n": len(samples_ms),
        "samples_ms": [round(float(x), 3) for x in samples_ms],
    }


def time_round_robin(runners: dict[str, Runner], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm-up then ``repeats`` rounds; each round runs every variant once, in the given order."""
    for _ in range(warmup):
        for runner in runners.values():
            runner.run()
            runner.advance()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, runner in runners.items():
                start = time.perf_counter_ns()
                runner.run()
                samples[name].append((time.perf_counter_ns() - start) / 1e6)
                runner.advance()
    finally:
        gc.enable()
    return samples


# ===================================================================================== memory
def measure_memory(name: str, folder: Path, device: str, threads: int, spinning: bool, batch: int, seqlen: int) -> dict:
    """Peak RSS of a process that opens ``folder``'s session and runs one batch × seqlen prefill."""
    import psutil

    import compress.onnx_runtime  # noqa: F401
    import exporters.onnx  # noqa: F401  (imports torch: part of the baseline, not of the session)

    maxrss_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731 (KiB on Linux)
    baseline_mb = psutil.Process().memory_info().rss / 2**20
    baseline_peak_mb = maxrss_mb()
    start = time.perf_counter()
    decoder = open_decoder(folder, device, threads, spinning)
    open_s = time.perf_counter() - start
    after_open_mb = psutil.Process().memory_info().rss / 2**20
    decoder.session.run(None, feeds_for(decoder, token_ids(decoder.spec.vocab_size, batch, seqlen), decoder.empty_past(batch)))
    peak_mb = maxrss_mb()
    return {
        "variant": name,
        "workload": f"prefill {batch}x{seqlen}",
        "baseline_rss_mb": round(baseline_mb, 1),
        "baseline_peak_mb": round(baseline_peak_mb, 1),
        "after_open_rss_mb": round(after_open_mb, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "peak_over_baseline_mb": round(peak_mb - baseline_mb, 1),
        "session_open_s": round(open_s, 2),
    }


# ===================================================================================== report
def environment(provider: str, threads: int, device: str) -> dict:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    import onnxruntime

    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_package": "onnxruntime-gpu" if version("onnxruntime-gpu") else "onnxruntime",
        "available_providers": onnxruntime.get_available_providers(),
        "provider": provider,
        "device": device,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "torch": version("torch"),
        "onnx": version("onnx"),
        "onnxslim": version("onnxslim"),
        "transformers": version("transformers"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def print_tables(result: dict) -> None:
    variants, timings, rel = result["variants"], result["timings"], result["relative"]
    workloads = list(timings)
    names = list(variants)
    header = f"{'variant':<9} {'params':>8} {'dec.lin':>8} {'onnx MB':>8} {'peak RSS':>9}" + "".join(
        f" {w + ' ms':>22}" for w in workloads)
    print(header)
    print("-" * len(header))
    for name in names:
        v = variants[name]
        mem = v.get("memory") or {}
        peak = f"{mem['peak_rss_mb']:>8.0f}M" if "peak_rss_mb" in mem else f"{'-':>9}"
        cells = ""
        for w in workloads:
            t = timings[w][name]
            cells += f" {t['median_ms']:>9.2f} [{t['p10_ms']:>.1f}-{t['p90_ms']:>.1f}]".rjust(23)
        print(f"{name:<9} {v['params_total'] / 1e6:>7.1f}M {v['decoder_linear'] / 1e6:>7.1f}M {v['file_mb']:>8.1f} {peak}{cells}")
    print("(median [p10-p90] ms per run; decode = ms per token)")
    if not rel:
        print("\n(no dense variant in this run: no speed-ups)")
        return
    print()
    header = f"{'variant':<9} {'workload':<16} {'GFLOP':>8} {'FLOP ratio':>11} {'speed-up':>9} {'efficiency':>11}"
    print(header)
    print("-" * len(header))
    for w in workloads:
        for name in names:
            r = rel[w].get(name)
            if r is None:
                continue
            print(f"{name:<9} {w:<16} {r['gflop']:>8.2f} {r['flop_ratio']:>10.3f}x {r['speedup']:>8.3f}x {r['efficiency']:>11.3f}")
    print("(FLOP ratio and speed-up are dense / variant; efficiency = speed-up / FLOP ratio)")
    target = result.get("target")
    if target and target.get("efficiency") is not None:
        verdict = "MET" if target["met"] else "NOT met"
        print(f"\ntarget: {target['variant']} {target['workload']} on {target['device']}: efficiency "
              f"{target['efficiency']:.3f} (>= {target['min_efficiency']}) -> {verdict}")


# ===================================================================================== main
def sub(args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--cache-dir", str(args.cache_dir),
            "--threads", str(args.threads), "--device", args.device, *(["--no-spin"] if args.no_spin else []), *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] (needs onnxruntime-gpu and a GPU)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--threads", type=int, default=cores, help=f"ORT intra-op threads (default: all cores, {cores})")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per prefill workload (default 20)")
    parser.add_argument("--decode-repeats", type=int, default=64, help="timed decode tokens per variant (default 64)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before each workload (default 3)")
    parser.add_argument("--seqlen", type=int, default=128, help="prefill length and decode past length (default 128)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="prefill batch sizes (default 1 8)")
    parser.add_argument("--decode-mode", choices=("fixed", "chain"), default="fixed",
                        help="fixed: repeat one step with the same seqlen-long past; chain: feed the present back")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="exports live in CACHE_DIR/<variant>/")
    parser.add_argument("--rebuild", action="store_true", help="re-prune and re-export even when a cached export exists")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-RSS subprocesses")
    parser.add_argument("--no-iobinding", action="store_true", help="on CUDA, feed numpy arrays instead of IOBinding")
    parser.add_argument("--no-spin", action="store_true",
                        help="disable ORT intra-op thread spinning (idle threads of one session then do not "
                             "compete with the next session's run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--memory-batch", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cache_dir = args.cache_dir.resolve()

    if args.build:
        build_variant(args.build, args.cache_dir / args.build, args.threads)
        return
    if args.memory:
        row = measure_memory(args.memory, args.cache_dir / args.memory, args.device, args.threads, not args.no_spin,
                             args.memory_batch, args.seqlen)
        args.row_out.write_text(json.dumps(row))
        return

    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.device.startswith("cuda"):
        from compress.onnx_runtime import CUDA_PROVIDER, import_onnxruntime

        if CUDA_PROVIDER not in import_onnxruntime().get_available_providers():
            parser.error("--device cuda needs onnxruntime-gpu (CUDAExecutionProvider is not available)")
    folders = {name: args.cache_dir / name for name in args.variants}

    # 1. build (prune + export) in one subprocess per variant, unless cached
    for name, folder in folders.items():
        if is_built(folder) and not args.rebuild:
            print(f"reusing {folder}", flush=True)
            continue
        if (folder / "export.json").is_file() and not (folder / META_FILE).is_file():
            print(f"{folder} has no {META_FILE} (needed for the FLOP count): rebuilding", flush=True)
        print(f"building {name} -> {folder}", flush=True)
        subprocess.run(sub(args, "--build", name), check=True)

    variants: dict[str, dict] = {}
    for name, folder in folders.items():
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        params = meta["shape"]["params"]
        variants[name] = {
            "folder": os.path.relpath(folder, ROOT),
            "pass": meta["pass"],
            "options": meta["options"],
            "params_total": params["total"],
            "decoder_linear": params["decoder_linear"],
            "pruning_ratio": 1 - params["decoder_linear"] / meta["dense_shape"]["params"]["decoder_linear"],
            "widths": meta["shape"]["layers"],
            "file_mb": round(sum((folder / f).stat().st_size for f in ("model.onnx", "model.onnx.data")) / 2**20, 2),
            "build": {k: meta[k] for k in ("prune_s", "export_s", "onnx_nodes", "torch")},
            "_shape": meta["shape"],
            "_dense_shape": meta["dense_shape"],
        }

    # 2. peak RSS, one subprocess per variant (before the timing so they do not compete)
    mem_batch = max(args.batch)
    if not args.no_memory:
        for name in folders:
            row_file = args.out.with_suffix(f".mem-{name}.json")
            row_file.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(sub(args, "--memory", name, "--memory-batch", str(mem_batch), "--seqlen", str(args.seqlen),
                               "--row-out", str(row_file)), check=True)
            variants[name]["memory"] = json.loads(row_file.read_text())
            row_file.unlink()
            print(f"memory {name}: peak RSS {variants[name]['memory']['peak_rss_mb']:.0f} MB", flush=True)

    # 3. timing: every session in this process, round-robin
    load_before = os.getloadavg()
    decoders = {name: open_decoder(folder, args.device, args.threads, not args.no_spin) for name, folder in folders.items()}
    provider = next(iter(decoders.values())).provider
    iobinding = args.device.startswith("cuda") and not args.no_iobinding
    print(f"sessions open on {provider}, {args.threads} threads; timing "
          f"({args.warmup} warm-up + {args.repeats} prefill / {args.decode_repeats} decode rounds)", flush=True)

    workloads: dict[str, dict] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    for batch in args.batch:
        key = f"prefill_{batch}x{args.seqlen}"
        runners = {}
        for name, dec in decoders.items():
            ids = token_ids(dec.spec.vocab_size, batch, args.seqlen)
            runners[name] = Runner(dec, feeds_for(dec, ids, dec.empty_past(batch)), args.device, iobinding)
        workloads[key] = {"batch": batch, "seq": args.seqlen, "past": 0}
        samples[key] = time_round_robin(runners, args.warmup, args.repeats)
        del runners
        print(f"  {key}: " + ", ".join(f"{n} {np.median(s):.1f} ms" for n, s in samples[key].items()), flush=True)
    key = f"decode_past{args.seqlen}"
    runners = {name: decode_runner(dec, args.seqlen, args.device, iobinding, args.decode_mode == "chain")
               for name, dec in decoders.items()}
    workloads[key] = {"batch": 1, "seq": 1, "past": args.seqlen, "mode": args.decode_mode}
    samples[key] = time_round_robin(runners, args.warmup, args.decode_repeats)
    del runners
    print(f"  {key}: " + ", ".join(f"{n} {np.median(s):.2f} ms/token" for n, s in samples[key].items()), flush=True)
    load_after = os.getloadavg()

    # 4. FLOPs and ratios
    timings = {w: {name: summarize(s) for name, s in per.items()} for w, per in samples.items()}
    relative: dict[str, dict] = {}
    for w, spec in workloads.items():
        for name, v in variants.items():
            v.setdefault("flops", {})[w] = analytic_flops(v["_shape"], spec["batch"], spec["seq"], spec["past"])
        if "dense" not in variants:
            continue
        dense_flops = analytic_flops(variants["dense"]["_shape"], spec["batch"], spec["seq"], spec["past"])["total"]
        dense_ms = timings[w]["dense"]["median_ms"]
        relative[w] = {}
        for name, v in variants.items():
            flop_ratio = dense_flops / v["flops"][w]["total"]
            speedup = dense_ms / timings[w][name]["median_ms"]
            relative[w][name] = {
                "gflop": round(v["flops"][w]["total"] / 1e9, 4),
                "flop_ratio": round(flop_ratio, 4),
                "speedup": round(speedup, 4),
                "efficiency": round(speedup / flop_ratio, 4),
            }
    for v in variants.values():
        v.pop("_shape"), v.pop("_dense_shape")

    target_key = f"prefill_8x{args.seqlen}"
    target = dict(TARGET, workload=target_key, efficiency=None, met=None)
    if target_key == TARGET["workload"] and args.device == "cpu" and TARGET["variant"] in relative.get(target_key, {}):
        target["efficiency"] = relative[target_key][TARGET["variant"]]["efficiency"]
        target["met"] = target["efficiency"] >= TARGET["min_efficiency"]

    result = {
        "benchmark": "onnx_speed",
        "model": MODEL,
        "method": {
            "sessions": "OrtDecoder(folder, optimization='all'); all variants open in one process holding no torch model",
            "order": "warm-up rounds, then timed rounds; each round runs every variant once in order (round-robin)",
            "timed": "session.run only (feeds prepared beforehand; on CUDA with IOBinding, inputs and outputs on the GPU)",
            "prefill": "batch x seqlen random token ids (seed 0), empty past; all outputs (logits for every position, presents)",
            "decode": ("batch 1, one token, past from a real prefill of seqlen random tokens (seed 1); "
                       + ("the same step repeated with the fixed seqlen-long past" if args.decode_mode == "fixed"
                          else "each step feeds the previous present back (past grows from seqlen)")),
            "statistics": "median, p10/p90, quartiles over the timed rounds; speed-up = dense median / variant median",
            "flops": analytic_flops.__doc__.strip(),
            "memory": "peak host RSS (ru_maxrss; GPU memory not included) of a separate process that imports the runtime, opens the session and runs "
                      f"one {mem_batch}x{args.seqlen} prefill; baseline = RSS after imports (torch included)",
            "spinning": not args.no_spin,
            "calibration": CALIBRATION,
        },
        "settings": {
            "variants": args.variants, "device": args.device, "threads": args.threads, "repeats": args.repeats,
            "decode_repeats": args.decode_repeats, "warmup": args.warmup, "seqlen": args.seqlen, "batch": args.batch,
            "decode_mode": args.decode_mode, "iobinding": iobinding, "cache_dir": os.path.relpath(args.cache_dir, ROOT),
        },
        "environment": {**environment(provider, args.threads, args.device),
                        "loadavg_before": [round(x, 2) for x in load_before],
                        "loadavg_after": [round(x, 2) for x in load_after]},
        "workloads": workloads,
        "variants": variants,
        "timings": timings,
        "relative": relative,
        "target": target,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print()
    print_tables(result)
    print(f"\nload average before/after timing: {load_before[0]:.2f} / {load_after[0]:.2f}")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
