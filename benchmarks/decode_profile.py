"""Where a decode step's time goes: ONNX Runtime's own profiler over single-token steps of the
deploy recipe's int4 graph and of onnxruntime-genai's model builder dense int4 graph (issue 22).

Each graph runs in ONNX Runtime (CPU, ``--threads`` intra-op threads, all optimisations) with a
``--past``-token past of zeros, ``--steps`` single-token steps; the kernel times of the profile are
summed by op type (the LM head on its own) and reported per step and as shares. Profiling adds its
own overhead, so the per-step totals are above the deployment benchmark's; the shares are the point.

    python benchmarks/decode_profile.py --out docs/results/decode_profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repo_paths import ROOT, command_line, display  # noqa: E402

VARIANTS = {"flap50-int4 (deploy recipe)": ROOT / "outputs" / "llama-flap-50-deploy" / "onnx-int4",
            "builder dense int4": ROOT / "bench-results" / "deploy" / "builder-int4"}


def profile(folder: Path, steps: int, past: int, threads: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling, options.intra_op_num_threads, options.log_severity_level = True, threads, 3
    with tempfile.TemporaryDirectory() as scratch:
        options.profile_file_prefix = str(Path(scratch) / "profile")
        session = ort.InferenceSession(str(folder / "model.onnx"), options)
        feeds = {"input_ids": np.array([[5]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64)}
        for item in session.get_inputs():
            if item.name.startswith("past"):
                head_size = item.shape[3] if isinstance(item.shape[3], int) else 64
                feeds[item.name] = np.zeros((1, item.shape[1], past, head_size), np.float32)
        for _ in range(steps):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            key = "LM head" if "lm_head" in event["name"] else event["args"].get("op_name", "?")
            totals[key] += event["dur"]
    total = sum(totals.values())
    return {"ms_per_step": total / steps / 1e3,
            "by_op": {op: {"ms_per_step": us / steps / 1e3, "share": us / total} for op, us in totals.most_common()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "decode_profile.json")
    args = parser.parse_args()
    rows = {}
    for name, folder in VARIANTS.items():
        rows[name] = {"folder": display(folder), **profile(folder, args.steps, args.past, args.threads)}
        parts = ", ".join(f"{op} {v['ms_per_step']:.2f} ms ({v['share']:.0%})" for op, v in list(rows[name]["by_op"].items())[:5])
        print(f"{name}: {rows[name]['ms_per_step']:.2f} ms/step: {parts}")
    data = {"command": command_line(__file__), "steps": args.steps, "past": args.past, "threads": args.threads,
            "variants": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"JSON: {display(args.out)}")


if __name__ == "__main__":
    main()
