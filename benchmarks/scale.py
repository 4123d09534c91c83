"""Scale benchmark (issue 10): out-of-core pruning under a memory cap, and batch executors.

    python benchmarks/scale.py                          # all three parts
    python benchmarks/scale.py --parts big smollm2      # some of them
    python benchmarks/scale.py --out bench-results/scale.json

Parts (each run is its own child process, so its peak RSS is its own: ``os.wait4``'s ru_maxrss):

* ``big``: a random-weight LLaMA-architecture model of ~1.2B parameters (hidden 2048, 22 layers,
  MLP 5632, 32 heads / 4 KV heads, SmolLM2's 49152-token vocabulary so its tokenizer applies; fp32
  weights 4.68 GB, written once to bench-results/scale/llama-1b as 25 shards and reused) pruned by
  FLAP 20 % out of core with ``--max-memory`` = a quarter of its fp32 weight bytes; peak RSS of the
  process against the cap, and the time per block of each sweep.
* ``smollm2``: SmolLM2-135M pruned in memory and out of core by the same pass (flap, wanda_sp,
  magnitude_sp), every output tensor compared bit for bit.
* ``batch``: 8 SmolLM2 jobs (magnitude_sp / wanda_sp × 4 ratios, short evaluation, no ONNX) on the
  local process pool (2 workers) and on Ray tasks (1 CPU each) on a local cluster: wall time and
  per-job table, in ``--batch-rounds`` rounds that alternate which executor goes first.

Prints tables and writes JSON (default bench-results/scale.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = ROOT / "bench-results" / "scale"
BIG_CONFIG = dict(
    vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)
BIG_SEED = 0
INIT_STD = 0.02
CALIBRATION = {"source": "austen", "samples": 64, "seqlen": 128, "seed": 0, "batch_size": 8}
SMOL_CALIBRATION = {"source": "austen", "samples": 128, "seqlen": 128, "seed": 0, "batch_size": 16}
SMOL_PASSES = {"flap-20": {"flap": {"ratio": 0.2}}, "wanda_sp-20": {"wanda_sp": {"ratio": 0.2}},
               "magnitude_sp-20": {"magnitude_sp": {"ratio": 0.2}}}
SMOL_CAP = "1GiB"
BATCH_PASSES, BATCH_RATIOS = ["magnitude_sp", "wanda_sp"], [0.1, 0.2, 0.3, 0.5]


# --------------------------------------------------------------------------------- child processes
def run_child(arguments: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``python -m compress.cli ARGS`` niced; its exit code, wall seconds and peak RSS (ru_maxrss)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    command = ["nice", "-n", "5", sys.executable, "-m", "compress.cli", *arguments]
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env={**os.environ, **(env or {})})
        _pid, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"command": ("compress " + " ".join(arguments)).replace(f"{ROOT}/", ""), "exit_code": child.returncode,
            "wall_s": round(time.perf_counter() - start, 1), "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "log": str(log.relative_to(ROOT))}


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------- the 1B model
def big_model_folder() -> Path:
    """The random-weight model (written once; a marker file says the folder is complete)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from compress.checkpoint import ShardedWriter, StreamedTensor
    from compress.models.loading import embedded_model_folder

    folder = WORK / "llama-1b"
    marker = {"config": BIG_CONFIG, "seed": BIG_SEED, "std": INIT_STD}
    try:
        if json.loads((folder / "scale-marker.json").read_text()) == marker:
            return folder
    except (OSError, ValueError):
        pass
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"writing the random-weight model into {folder} (once)...", flush=True)
    config = LlamaConfig(**BIG_CONFIG)
    h, d = config.hidden_size, config.hidden_size // config.num_attention_heads
    kv, inter = config.num_key_value_heads * d, config.intermediate_size
    generator = torch.Generator().manual_seed(BIG_SEED)

    def normal(*shape):
        return torch.empty(shape).normal_(0.0, INIT_STD, generator=generator)

    def rows(n_rows: int):
        def chunks():
            for start in range(0, n_rows, 4096):
                yield normal(min(4096, n_rows - start), h)
        return chunks

    writer = ShardedWriter(staging)
    writer.add({"model.embed_tokens.weight": StreamedTensor(torch.float32, (config.vocab_size, h), rows(config.vocab_size))})
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        writer.add({f"{p}.self_attn.q_proj.weight": normal(h, h), f"{p}.self_attn.k_proj.weight": normal(kv, h),
                    f"{p}.self_attn.v_proj.weight": normal(kv, h), f"{p}.self_attn.o_proj.weight": normal(h, h),
                    f"{p}.mlp.gate_proj.weight": normal(inter, h), f"{p}.mlp.up_proj.weight": normal(inter, h),
                    f"{p}.mlp.down_proj.weight": normal(h, inter), f"{p}.input_layernorm.weight": torch.ones(h),
                    f"{p}.post_attention_layernorm.weight": torch.ones(h)})
    writer.add({"model.norm.weight": torch.ones(h),
                "lm_head.weight": StreamedTensor(torch.float32, (config.vocab_size, h), rows(config.vocab_size))})
    writer.finish()
    config.save_pretrained(staging)
    AutoTokenizer.from_pretrained(embedded_model_folder(progress=False)).save_pretrained(staging)
    (staging / "scale-marker.json").write_text(json.dumps(marker, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def weight_bytes(folder: Path) -> int:
    return json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def part_big(results: dict, offload: bool) -> None:
    folder = big_model_folder()
    fp32 = weight_bytes(folder)
    cap = fp32 // 4
    recipe = write_yaml(WORK / "big-flap-20.yaml", {
        "name": "llama-1b-flap-20", "model": str(folder), "device": "cpu", "calibration": CALIBRATION,
        "passes": [{"flap": {"ratio": 0.2}}], "evaluate": False})
    rows = []
    for mode in (["ram", "disk"] if offload else ["ram"]):
        out = WORK / f"big-out-{mode}"
        extra = ["--offload-dir", str(WORK / "offload")] if mode == "disk" else []
        child = run_child(["run", str(recipe), "-o", str(out), "--max-memory", str(cap), "-q", *extra],
                          WORK / f"big-{mode}.log")
        row = {"mode": mode, **child}
        report_path = out / "report.json"
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            section = report["out_of_core"]
            seconds = {}
            for record in section["block_seconds"]:
                seconds.setdefault(record["sweep"], []).append(record["seconds"])
            row.update(
                passed=report["validation"]["passed"], activations=section["activations"],
                sampled_peak_rss_mb=section["peak_rss_mb"], budget=section["budget"],
                seconds_per_block={k: {"mean": round(sum(v) / len(v), 2), "min": min(v), "max": max(v)}
                                   for k, v in seconds.items()},
                stages=[{k: s[k] for k in ("name", "wall_s", "peak_rss_mb")} for s in report["stages"]],
                pruning_ratio=report["params"]["pruning_ratio"], params=report["params"],
                output_bytes=sum(p.stat().st_size for p in out.glob("*.safetensors")))
            shutil.rmtree(out, ignore_errors=True)  # 3.8 GB; the report is kept in the JSON
        row["under_cap"] = row["max_rss_mb"] * 2**20 <= cap
        rows.append(row)
    results["big"] = {"model": str(folder.relative_to(ROOT)), "config": BIG_CONFIG, "fp32_weight_bytes": fp32,
                      "parameters": fp32 // 4, "max_memory_bytes": cap, "max_memory_mb": round(cap / 2**20, 1),
                      "calibration": CALIBRATION, "pass": {"flap": {"ratio": 0.2}}, "runs": rows}


# --------------------------------------------------------------------------------- SmolLM2 identity
def same_tensors(a: Path, b: Path) -> dict:
    import torch

    from compress.checkpoint import CheckpointReader

    first, second = CheckpointReader(a), CheckpointReader(b)
    names = sorted(set(first.names()) | set(second.names()))
    differ, max_abs = [], 0.0
    for name in names:
        if name not in first or name not in second:
            differ.append(name)
            continue
        x, y = first.read([name])[name], second.read([name])[name]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
            differ.append(name)
            if x.shape == y.shape:
                max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
    return {"tensors": len(names), "differ": len(differ), "first_differing": differ[:5], "max_abs_diff": max_abs,
            "identical": not differ}


def part_smollm2(results: dict) -> None:
    rows = []
    for label, pass_entry in SMOL_PASSES.items():
        data = {"name": f"smollm2-{label}", "model": "smollm2-135m", "device": "cpu",
                "calibration": SMOL_CALIBRATION if "magnitude" not in label else None,
                "passes": [pass_entry], "evaluate": False}
        recipe = write_yaml(WORK / f"smollm2-{label}.yaml", data)
        runs = {}
        for mode, extra in (("in_memory", []), ("out_of_core", ["--max-memory", SMOL_CAP])):
            out = WORK / f"smollm2-{label}-{mode}"
            runs[mode] = run_child(["run", str(recipe), "-o", str(out), "-q", *extra],
                                   WORK / f"smollm2-{label}-{mode}.log")
            report = json.loads((out / "report.json").read_text())
            runs[mode]["pass_s"] = next(s["wall_s"] for s in report["stages"] if s["name"].startswith("pass:"))
            if "out_of_core" in report:
                runs[mode]["seconds_per_block"] = report["out_of_core"]["seconds_per_block"]
        identity = same_tensors(WORK / f"smollm2-{label}-in_memory", WORK / f"smollm2-{label}-out_of_core")
        rows.append({"pass": label, "cap": SMOL_CAP, **{f"{m}": r for m, r in runs.items()}, "identity": identity})
        for mode in runs:
            shutil.rmtree(WORK / f"smollm2-{label}-{mode}", ignore_errors=True)
    results["smollm2"] = {"calibration": SMOL_CALIBRATION, "runs": rows}


# --------------------------------------------------------------------------------- batch executors
def part_batch(results: dict, rounds: int) -> None:
    """The 8-job grid on each executor; with ``rounds`` > 1 the order alternates (local, ray, then
    ray, local, ...) so that a load change on the shared machine does not favour one executor."""
    base = write_yaml(WORK / "batch-base.yaml", {
        "name": "batch-base", "model": "smollm2-135m", "device": "cpu",
        "calibration": {"source": "austen", "samples": 64, "seqlen": 128, "seed": 0, "batch_size": 16},
        "passes": [{"magnitude_sp": {"ratio": 0.2}}],
        "evaluate": {"datasets": ["austen:persuasion"], "seqlen": 128, "max_windows": 16, "batch_size": 8},
        "validate": {"reload_max_abs_diff": 1.0e-4}})
    runs = []
    for round_index in range(rounds):
        order = ("local", "ray") if round_index % 2 == 0 else ("ray", "local")
        for executor in order:
            root = WORK / f"batch-{executor}"
            shutil.rmtree(root, ignore_errors=True)  # measure every job (a finished job would be skipped)
            batch = write_yaml(WORK / f"batch-{executor}.yaml", {
                "output": str(root), "executor": executor, "workers": 2, "retries": 0,
                "resources": {"cpus": 1},
                "grid": {"base": base.name, "passes": BATCH_PASSES, "ratios": BATCH_RATIOS}})
            child = run_child(["batch", str(batch), "-q"], WORK / f"batch-{executor}-{round_index}.log")
            table = json.loads((root / "results.json").read_text())
            jobs = [{"name": j["name"], "status": j["status"], "seconds": j["seconds"],
                     "ppl_ratio": (j.get("figures") or {}).get("eval.persuasion.ppl_ratio"),
                     "pruning_ratio": (j.get("figures") or {}).get("params.pruning_ratio")} for j in table["jobs"]]
            runs.append({"executor": executor, "round": round_index, **child, "counts": table.get("counts"),
                         "jobs": jobs, "job_seconds_sum": round(sum(j["seconds"] or 0 for j in jobs), 1)})
    results["batch"] = {"jobs": len(BATCH_PASSES) * len(BATCH_RATIOS), "workers": 2, "cpus_per_ray_task": 1,
                        "grid": {"passes": BATCH_PASSES, "ratios": BATCH_RATIOS}, "base": "bench-results/scale/batch-base.yaml",
                        "runs": runs}


# --------------------------------------------------------------------------------- tables
def print_tables(results: dict) -> None:
    big = results.get("big")
    if big:
        print(f"\n## out of core, {big['parameters'] / 1e9:.2f}B-parameter random LLaMA "
              f"(fp32 weights {big['fp32_weight_bytes'] / 2**30:.2f} GiB), cap {big['max_memory_mb']:.0f} MiB")
        print("| activations | peak RSS (MiB) | under cap | s/block score | s/block slice | wall (s) | passed |")
        print("|---|---|---|---|---|---|---|")
        for r in big["runs"]:
            spb = r.get("seconds_per_block", {})
            print(f"| {r.get('activations', r['mode'])} | {r['max_rss_mb']:.0f} | {'yes' if r['under_cap'] else 'NO'} | "
                  f"{spb.get('score', {}).get('mean', '-')} | {spb.get('slice', {}).get('mean', '-')} | "
                  f"{r['wall_s']:.0f} | {r.get('passed')} |")
    smol = results.get("smollm2")
    if smol:
        print("\n## SmolLM2-135M: in memory vs out of core")
        print("| pass | in-memory peak RSS (MiB) | out-of-core peak RSS (MiB) | in-memory pass (s) | out-of-core pass (s) "
              "| tensors | identical |")
        print("|---|---|---|---|---|---|---|")
        for r in smol["runs"]:
            m, o, ident = r["in_memory"], r["out_of_core"], r["identity"]
            print(f"| {r['pass']} | {m['max_rss_mb']:.0f} | {o['max_rss_mb']:.0f} | {m['pass_s']:.1f} | "
                  f"{o['pass_s']:.1f} | {ident['tensors']} | {'yes' if ident['identical'] else 'NO'} |")
    batch = results.get("batch")
    if batch:
        print(f"\n## batch: {batch['jobs']} SmolLM2 jobs, 2 at a time (seconds per job)")
        runs = batch["runs"]
        print("| job | " + " | ".join(f"{r['executor']} (round {r['round'] + 1})" for r in runs) + " |")
        print("|---|" + "---|" * len(runs))
        for name in [j["name"] for j in runs[0]["jobs"]]:
            cells = []
            for r in runs:
                job = next((j for j in r["jobs"] if j["name"] == name), {})
                cells.append(f"{job.get('seconds') or 0:.0f} ({job.get('status')})")
            print(f"| {name} | " + " | ".join(cells) + " |")
        print("| **batch wall time** | " + " | ".join(f"**{r['wall_s']:.0f}**" for r in runs) + " |")
        print("| sum of job times | " + " | ".join(f"{r['job_seconds_sum']:.0f}" for r in runs) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["big", "smollm2", "batch"], choices=["big", "smollm2", "batch"])
    parser.add_argument("--offload", action="store_true", help="big: also a run with --offload-dir")
    parser.add_argument("--batch-rounds", type=int, default=2, help="batch: rounds, alternating the executor order")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "scale.json")
    args = parser.parse_args()
    results: dict = {}
    if args.out.is_file():  # keep parts measured earlier
        results = json.loads(args.out.read_text())
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    for part in args.parts:
        {"big": lambda r: part_big(r, args.offload), "smollm2": part_smollm2,
         "batch": lambda r: part_batch(r, args.batch_rounds)}[part](results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print_tables(results)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
