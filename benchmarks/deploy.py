"""Deployment benchmark: our ONNX decoders against onnxruntime-genai's own model builder, all run
in onnxruntime-genai on the CPU (issue 22).

Variants (each an onnxruntime-genai folder):
  builder-fp32 / builder-int4   the dense SmolLM2 exported by ``python -m onnxruntime_genai.models.builder``
                                (fused GroupQueryAttention and norms); built here on first use
  dense-fp32                    the dense SmolLM2 exported by compress: the fused graph (exporters/onnx_fused.py)
  dense-traced-fp32             the same, traced by torch.onnx (exporters/onnx.py, ``graph: traced``)
  flap50-fp32 / -int8 / -int4   the output of ``compress run recipes/llama-flap-50-deploy.yaml`` (fused; int4: GPTQ)
  flap50-traced-fp32            its pruned model exported here as the traced graph
  flap50-int4-rtn / -hqq        its fp32 graph quantized here with ``int4_method: rtn`` (integer zero
                                points: ONNX Runtime's fast CPU kernel) and ``hqq`` (float zero points: a
                                slow path), both with the recipe's int8 head and float embedding
  flap50-int8-acc4              its fp32 graph quantized here to int8 with ``accuracy_level: 4`` (int8
                                activations; the recipe's int8 graph computes in float)
  flap20-fp32 / -int8 / -int4   the same recipe at FLAP ratio 0.2 (run here once, into bench-results/)
  flap50-gguf-f32 / -q8_0       its GGUF (f32, written by the run) and a q8_0 GGUF written here from
                                its safetensors, run in llama.cpp (llama-cpp-python; skipped when
                                it is not built: bash scripts/build_llama_cpp.sh)

Per variant: file size; peak RSS of a child process that loads it and generates (prefill 128, 64
tokens); time to the first token after a 128-token prompt; prefill of 8 x 128; decode ms/token
after a 128- and a 512-token past; perplexity over evaluation windows of every protocol-v2 domain
(teacher-forced, onnxruntime-genai's logits), its ratio to the fp32 graph of the same family, and
greedy agreement with that fp32 graph on the report's prompts. Timings alternate the variants
round by round (``--rounds``) and report medians, all at ``--threads`` intra-op threads.

    python benchmarks/deploy.py --out docs/results/deploy.json

writes the JSON and prints the table (``--table`` prints it from the JSON only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repo_paths import ROOT, command_line, display

sys.path.insert(0, str(ROOT))

from compress.genai_runtime import GenaiDecoder
from compress.llama_cpp_runtime import LlamaCppDecoder

WORK = ROOT / "bench-results" / "deploy"
DEPLOY = ROOT / "outputs" / "llama-flap-50-deploy"
FLAP20 = WORK / "llama-flap-20-deploy"  # the deploy recipe at ratio 0.2, ONNX only, run here on first use
FAMILY_REFERENCE = {"builder-int4": "builder-fp32", "builder-fp32": "builder-fp32", "dense-fp32": "builder-fp32",
                    "dense-traced-fp32": "builder-fp32", "flap50-traced-fp32": "flap50-fp32", "flap50-fp32": "flap50-fp32", "flap50-int8": "flap50-fp32", "flap50-int4": "flap50-fp32",
                    "flap50-int4-rtn": "flap50-fp32", "flap50-int8-acc4": "flap50-fp32", "flap50-int4-hqq": "flap50-fp32",
                    "flap50-gguf-f32": "flap50-fp32", "flap50-gguf-q8_0": "flap50-fp32",
                    "flap20-fp32": "flap20-fp32", "flap20-int8": "flap20-fp32", "flap20-int4": "flap20-fp32"}


def variant_folders(deploy: Path) -> dict[str, Path]:
    folders = {"builder-fp32": WORK / "builder-fp32", "builder-int4": WORK / "builder-int4",
               "dense-fp32": WORK / "dense-fused-fp32", "dense-traced-fp32": WORK / "dense-fp32",
               "flap50-traced-fp32": WORK / "flap50-traced-fp32", "flap50-fp32": deploy / "onnx", "flap50-int8": deploy / "onnx-int8",
               "flap50-int4": deploy / "onnx-int4", "flap50-int4-rtn": WORK / "flap50-int4-rtn",
               "flap50-int8-acc4": WORK / "flap50-int8-acc4", "flap50-int4-hqq": WORK / "flap50-int4-hqq",
               "flap20-fp32": FLAP20 / "onnx", "flap20-int8": FLAP20 / "onnx-int8", "flap20-int4": FLAP20 / "onnx-int4"}
    if importlib.util.find_spec("llama_cpp") is not None:
        folders |= {"flap50-gguf-f32": deploy / "gguf", "flap50-gguf-q8_0": WORK / "flap50-gguf-q8_0"}
    return folders


def write_q8_gguf(deploy: Path, folder: Path) -> None:
    """The q8_0 GGUF of the deploy run's pruned model (its safetensors), tokenizer from the embedded GGUF."""
    if (folder / "model.gguf").is_file():
        return
    from compress.models.loading import embedded_gguf_path, load_model
    from exporters.gguf import GgufOptions, export_gguf

    loaded = load_model(str(deploy), dtype="float32", device="cpu", progress=False)
    export_gguf(loaded.model, loaded.tokenizer, folder, GgufOptions("q8_0"), tokenizer_gguf=embedded_gguf_path())


# ----------------------------------------------------------------------------------- building
def run_flap20(out: Path) -> None:
    """``recipes/llama-flap-50-deploy.yaml`` at FLAP ratio 0.2 into ``out`` (fp32, int8 and int4 ONNX,
    each gated as in the recipe; no GGUF; a short evaluation, whose windows the quantized gates read)."""
    from compress.recipe import load_recipe, parse_recipe
    from compress.run import run_recipe

    recipe = ROOT / "recipes" / "llama-flap-50-deploy.yaml"
    data = load_recipe(recipe).to_dict()
    data["name"] = "llama-flap-20-deploy"
    data["passes"][0]["flap"]["ratio"] = 0.2
    data["export"].update(output=str(out), formats=["safetensors", "onnx"])
    data["evaluate"].update(max_windows=4, continuation_tokens=0)  # the quantized gates read evaluation windows
    data["validate"].update(max_geomean_ppl_ratio=None, max_ppl_ratio=None)
    result = run_recipe(parse_recipe(data, str(recipe)), progress=False)
    if not result.passed:  # the folders are written (and marked FAILED): measured all the same
        print(f"the FLAP-20 deploy run failed gates: {result.failures}", flush=True)


def gate_failures(folder: Path) -> list[str]:
    """The failed gates of the run that wrote ``folder`` (its FAILED marker), else []."""
    marker = folder / "FAILED"
    return marker.read_text().splitlines()[1:] if marker.is_file() else []


def build_missing(folders: dict[str, Path]) -> None:
    from compress.models.loading import embedded_model_folder

    source = embedded_model_folder(progress=False)
    for precision in ("fp32", "int4"):
        folder = folders[f"builder-{precision}"]
        if not (folder / "genai_config.json").is_file():
            print(f"building {folder.name} with onnxruntime-genai's model builder", flush=True)
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o",
                            str(folder), "-p", precision, "-e", "cpu", "-c", str(WORK / "cache_dir")],
                           check=True, stdout=subprocess.DEVNULL)
    if not (folders["flap20-fp32"] / "genai_config.json").is_file():
        print("running the deploy recipe at FLAP 20%", flush=True)
        run_flap20(FLAP20)
    from compress.models.loading import load_model
    from exporters.onnx import OnnxExportOptions, export_onnx

    for name, source, graph in (("dense-fp32", "smollm2-135m", "fused"), ("dense-traced-fp32", "smollm2-135m", "traced"),
                                ("flap50-traced-fp32", str(DEPLOY), "traced")):
        if not (folders[name] / "genai_config.json").is_file():
            print(f"exporting {name} with compress", flush=True)
            loaded = load_model(source, dtype="float32", device="cpu", progress=False)
            export_onnx(loaded.model, loaded.tokenizer, folders[name], OnnxExportOptions(graph=graph, optimize=False))
    from exporters.onnx_quant import QuantOptions, quantize_onnx

    for name, options in (("flap50-int4-rtn", QuantOptions(bits=4, method="rtn", embeddings=False)),
                          ("flap50-int4-hqq", QuantOptions(bits=4, method="hqq", embeddings=False)),
                          ("flap50-int8-acc4", QuantOptions(bits=8, accuracy_level=4))):
        if not (folders[name] / "genai_config.json").is_file() and (folders["flap50-fp32"] / "genai_config.json").is_file():
            quantize_onnx(folders["flap50-fp32"], folders[name], options)
    missing = [name for name, folder in folders.items() if not (folder / "genai_config.json").is_file()
               and not name.startswith("flap50-gguf")]
    if missing:
        raise SystemExit(f"missing {missing}: run `compress run recipes/llama-flap-50-deploy.yaml` first")


# ----------------------------------------------------------------------------------- measuring
def open_variant(folder: Path, threads: int):
    """The variant in its runtime: llama.cpp for the GGUFs, onnxruntime-genai otherwise. Both offer
    prefill(ids), step() -> token and logits(ids) -> [T, vocab]."""
    if (folder / "model.gguf").is_file():
        return LlamaCppDecoder(folder / "model.gguf", n_ctx=1024, threads=threads)
    return GenaiDecoder(folder, threads=threads)


def prefill(model, ids: list[int], room: int) -> None:
    """``ids`` from an empty cache with ``room`` tokens to decode after them (onnxruntime-genai sizes
    its buffers by the total; llama.cpp's context is fixed when it opens)."""
    model.prefill(ids) if isinstance(model, LlamaCppDecoder) else model.prefill(ids, room)


def time_variant(model, prompt: list[int], long_prompt: list[int], new_tokens: int) -> dict:
    """One round: first token after ``prompt``; decode ms/token after it and after ``long_prompt``;
    prefill of 8 copies of ``prompt`` (onnxruntime-genai only: llama-cpp-python runs one sequence)."""
    def decode_ms(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            model.step()
        return (time.perf_counter() - start) / steps * 1e3

    start = time.perf_counter()
    prefill(model, prompt, new_tokens + 1)
    model.step()
    first = (time.perf_counter() - start) * 1e3
    decode_128 = decode_ms(new_tokens)
    prefill(model, long_prompt, new_tokens // 2 + 1)
    model.step()
    decode_512 = decode_ms(new_tokens // 2)
    prefill_8 = None
    if not isinstance(model, LlamaCppDecoder):
        start = time.perf_counter()
        model.prefill_batch(prompt, 8)
        prefill_8 = (time.perf_counter() - start) * 1e3
    return {"first_token_ms": first, "decode_ms_128": decode_128, "decode_ms_512": decode_512,
            "prefill_8x128_ms": prefill_8}


class FullLogits:
    """A last-position graph of ours (exporters/onnx_fused.py) read at every position: ONNX Runtime
    on the same folder and weights without the final slice (onnxruntime-genai returns only the last
    position of such a graph)."""

    def __init__(self, folder: Path, threads: int):
        from compress.onnx_runtime import OrtDecoder

        self.decoder = OrtDecoder(folder, optimization="all", threads=threads, logits="all")

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.decoder(np.asarray([ids], dtype=np.int64))[0][0]


def logits_source(model, folder: Path, threads: int):
    """What reads ``folder``'s teacher-forced logits: the variant itself, or FullLogits for a
    last-position graph."""
    spec = folder / "export.json"
    if spec.is_file() and json.loads(spec.read_text()).get("logits") == "last":
        return FullLogits(folder, threads)
    return model


def perplexity(model, windows) -> tuple[float, list]:
    """PPL over every predicted token of ``windows`` [n, T] (float64 sums) and each window's argmax."""
    from compress.validation import (
        next_token_nll,  # imports torch: not at the top, the RSS probe imports this module
    )

    nll, count, argmaxes = 0.0, 0, []
    for window in windows.tolist():
        logits = model.logits(window)[:-1]
        nll += next_token_nll(logits, np.asarray(window[1:]))
        count += len(window) - 1
        argmaxes.append(logits.argmax(axis=-1))
    return math.exp(nll / count), argmaxes


def greedy(model, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    out = []
    for prompt in prompts:
        prefill(model, prompt, tokens)
        out.append([model.step() for _ in range(tokens)])
    return out


def peak_rss_mb(folder: Path, threads: int) -> float:
    """Peak RSS of a child that loads ``folder`` and generates 64 tokens after a 128-token prompt."""
    here = str(Path(__file__).resolve().parent)
    # VmHWM, not ru_maxrss: a child forked from this (large) process inherits its ru_maxrss
    code = (f"import sys; sys.path.insert(0, {here!r}); import deploy\n"
            f"m = deploy.open_variant(__import__('pathlib').Path({str(folder)!r}), {threads})\n"
            "deploy.greedy(m, [list(range(100, 228))], 65)\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data", ".gguf")) / 1e6


# ----------------------------------------------------------------------------------- table
COLUMNS = [("variant", "variant"), ("size MB", "size_mb"), ("peak RSS MB", "peak_rss_mb"),
           ("first token ms", "first_token_ms"), ("prefill 8x128 ms", "prefill_8x128_ms"),
           ("decode ms/tok @128", "decode_ms_128"), ("decode ms/tok @512", "decode_ms_512"),
           ("decode vs builder int4", "decode_speedup_vs_builder_int4"),
           ("decode vs builder fp32", "decode_speedup_vs_builder_fp32"), ("PPL", "ppl"),
           ("PPL / fp32", "ppl_ratio_to_fp32"), ("top-1 = fp32", "top1_agreement_to_fp32"),
           ("greedy = fp32", "greedy_identical_to_fp32")]


def table(rows: list[dict]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(key, "")) for _, key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deploy", type=Path, default=DEPLOY, help="output of recipes/llama-flap-50-deploy.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows per protocol domain")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "deploy.json")
    parser.add_argument("--table", action="store_true", help="only print the table of --out")
    parser.add_argument("--rss-only", action="store_true", help="only measure peak RSS again, into the rows of --out")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())["rows"]))
        return
    if args.rss_only:
        data = json.loads(args.out.read_text())
        folders = variant_folders(args.deploy)
        for row in data["rows"]:
            row["peak_rss_mb"] = peak_rss_mb(folders[row["variant"]], args.threads)
        data["rss_command"] = command_line(__file__)
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        print(table(data["rows"]))
        return

    from compress.evaluation.lm_evaluator import LMEvaluator
    from compress.onnx_runtime import load_tokenizer
    from compress.recipe import EvaluateSpec
    from compress.recipe.fields import DEFAULT_GENERATION_PROMPTS

    folders = variant_folders(args.deploy)
    WORK.mkdir(parents=True, exist_ok=True)
    build_missing(folders)
    tokenizer = load_tokenizer(folders["flap50-fp32"])
    evaluator = LMEvaluator(EvaluateSpec(suite="v2", seqlen=128, max_windows=args.windows), tokenizer, progress=False)
    windows = evaluator.spread_windows(args.windows * len(evaluator.windows))
    stream = [int(t) for row in windows.tolist() for t in row]
    prompt, long_prompt = stream[:128], stream[:512]
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in DEFAULT_GENERATION_PROMPTS]

    if "flap50-gguf-q8_0" in folders:
        write_q8_gguf(args.deploy, folders["flap50-gguf-q8_0"])
    models = {name: open_variant(folder, args.threads) for name, folder in folders.items()}
    rows = {name: {"variant": name, "folder": display(folder), "size_mb": size_mb(folder)}
            for name, folder in folders.items()}
    quality: dict[str, tuple] = {}
    for name, model in models.items():
        print(f"quality {name}", flush=True)
        ppl, argmaxes = perplexity(logits_source(model, folders[name], args.threads), windows)
        quality[name] = (ppl, argmaxes, greedy(model, prompts, 32))
        rows[name]["ppl"] = ppl
    for name, row in rows.items():
        ref = FAMILY_REFERENCE[name]
        ppl, argmaxes, tokens = quality[name]
        ref_ppl, ref_argmaxes, ref_tokens = quality[ref]
        row["reference"] = ref
        row["ppl_ratio_to_fp32"] = ppl / ref_ppl
        agree = sum(int((a == b).sum()) for a, b in zip(argmaxes, ref_argmaxes))
        row["top1_agreement_to_fp32"] = agree / sum(len(a) for a in argmaxes)
        row["greedy_identical_to_fp32"] = f"{sum(a == b for a, b in zip(tokens, ref_tokens))}/{len(tokens)}"
    timings: dict[str, list[dict]] = {name: [] for name in models}
    for round_index in range(args.rounds + 1):  # round 0 warms every session up and is dropped
        for name, model in models.items():
            measured = time_variant(model, prompt, long_prompt, args.new_tokens)
            if round_index:
                timings[name].append(measured)
        print(f"round {round_index} done", flush=True)
    for name, row in rows.items():
        for key in timings[name][0]:
            values = [t[key] for t in timings[name] if t[key] is not None]
            row[key] = statistics.median(values) if values else None
            row[key + "_spread"] = [min(values), max(values)] if values else None
    for name, row in rows.items():
        row["decode_speedup_vs_builder_int4"] = rows["builder-int4"]["decode_ms_128"] / row["decode_ms_128"]
        row["decode_speedup_vs_builder_fp32"] = rows["builder-fp32"]["decode_ms_128"] / row["decode_ms_128"]
    del models
    for name, folder in folders.items():
        rows[name]["peak_rss_mb"] = peak_rss_mb(folder, args.threads)
    import onnxruntime
    import onnxruntime_genai

    llama_cpp_version = None
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp

        llama_cpp_version = llama_cpp.__version__

    data = {
        "command": command_line(__file__),
        "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                    "onnxruntime": onnxruntime.__version__, "onnxruntime_genai": onnxruntime_genai.__version__,
                    "llama_cpp_python": llama_cpp_version},
        "protocol": {"threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
                     "prompt_tokens": 128, "long_prompt_tokens": 512, "ppl_windows": int(windows.shape[0]),
                     "ppl_seqlen": 128, "greedy_prompts": len(prompts), "greedy_tokens": 32,
                     "runtime": "onnxruntime-genai, CPU (flap50-gguf-*: llama.cpp through llama-cpp-python, "
                                "KV cache f32)",
                     "ppl_logits": "onnxruntime-genai's logits; for our last-position (fused) graphs, ONNX Runtime "
                                   "on the same folder without the final slice"},
        "rows": list(rows.values()),
        "flap20_run_failed_gates": gate_failures(FLAP20),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data["rows"]))
    print(f"\nJSON: {display(args.out)}")


if __name__ == "__main__":
    main()
