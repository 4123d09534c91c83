"""Wall time and peak memory of the main job, `compress run recipes/llama-flap-50.yaml`, per stage.

Runs the CLI as a child process ``--runs`` times into a temporary folder (the first run of a fresh
machine also measures the dense model; later runs read its figures from the cache), and records for
each run the wall time, the child's peak RSS (``wait4``), the report's stage table (wall seconds
and peak RSS per stage) and its protocol figures (each domain's PPL ratio, geometric mean, worst).
Prints a table and writes JSON (no machine paths).

    python3 benchmarks/main_job.py --runs 2 --out docs/results/main_job.json
    python3 benchmarks/main_job.py --recipe recipes/llama-flap-50-distill.yaml --runs 1 --out docs/results/distill_job.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]


def run_once(recipe: Path, out: Path) -> dict:
    """One `compress run` in a child process: wall seconds, peak RSS (MB), exit code and stages."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "compress.cli", "run", str(recipe), "-o", str(out), "-q"]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a chatty child cannot block on it
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errors)
        _pid, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "exit_code": child.returncode, "stages": report.get("stages", []),
            "passed": (report.get("validation") or {}).get("passed"),
            "quality": quality(report.get("evaluation") or {}),
            **({"stderr_tail": without_paths(stderr[-400:])} if child.returncode else {})}


def quality(evaluation: dict) -> dict:
    """The report's protocol figures: each domain's PPL ratio to dense, their geometric mean and the worst."""
    ratios = {name: d.get("ppl_ratio") for name, d in (evaluation.get("datasets") or {}).items()}
    return {"suite": evaluation.get("suite"), "max_windows": evaluation.get("max_windows"), "ppl_ratio": ratios,
            **{k: evaluation.get(k) for k in ("geomean_ppl_ratio", "worst_dataset", "worst_ppl_ratio")}}


def without_paths(text: str) -> str:
    """Error text for the JSON, with this machine's folders replaced by placeholders."""
    return text.replace(str(ROOT), "<repo>").replace(str(Path.home()), "~")


def table(runs: list[dict]) -> str:
    names = [s["name"] for s in runs[-1]["stages"]]
    head = ["stage", *[f"run {i + 1} s" for i in range(len(runs))], f"run {len(runs)} peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [name]
        for run in runs:
            stage = next((s for s in run["stages"] if s["name"] == name), None)
            cells.append(f"{stage['wall_s']:.1f}" if stage else "—")
        last = next(s for s in runs[-1]["stages"] if s["name"] == name)
        cells.append(f"{last['peak_rss_mb']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| **whole command** | " + " | ".join(f"**{r['wall_s']:.0f}**" for r in runs)
                 + f" | **{runs[-1]['peak_rss_mb']:.0f}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=Path("recipes/llama-flap-50.yaml"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "main_job.json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="main-job-") as tmp:
        for i in range(args.runs):
            runs.append(run_once(ROOT / args.recipe, Path(tmp) / "out"))
            q = runs[-1]["quality"]
            print(f"run {i + 1}: {runs[-1]['wall_s']:.0f} s, peak RSS {runs[-1]['peak_rss_mb']:.0f} MB, "
                  f"exit {runs[-1]['exit_code']}, PPL ratio geomean {q['geomean_ppl_ratio']}, worst "
                  f"{q['worst_dataset']} {q['worst_ppl_ratio']}", flush=True)
    result = {"recipe": str(args.recipe), "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "python": platform.python_version(), "runs": runs,
              "median_wall_s": median(r["wall_s"] for r in runs),
              "max_peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(runs))
    print(f"\nJSON: {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
