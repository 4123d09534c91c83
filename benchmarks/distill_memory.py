"""Peak memory and time of distillation steps: the chunked KL of compress.training against the plain
autograd KL it replaced.

Each run is a child process (its peak RSS is its own, from ``wait4``): it loads the model twice
(teacher and student, float32), then takes ``--steps`` AdamW steps of ``step_loss`` on random
windows (batch 8 × 128, bf16 autocast, ``balance`` on, as the distill recipe) training every
parameter of the decoder blocks, and reports its peak RSS and the seconds per step. ``--kl
autograd`` patches in the formula the project used before: both models' log-softmax over all
positions, ``kl_div``, and autograd through it (which keeps float32 log-probabilities of both
models for the backward pass). Variants alternate run by run; the table shows medians. Writes
JSON (no machine paths).

    python3 benchmarks/distill_memory.py --runs 2 --out docs/results/distill_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VARIANTS = ("chunked", "autograd")


def autograd_terms(logits, teacher_logits, temperature=1.0, batch=None):
    """The KL as it was computed before the chunked function: autograd through both log-softmaxes."""
    import torch

    from compress.training import excess_nll

    vocab = logits.shape[-1]
    logp = torch.log_softmax(logits.reshape(-1, vocab).float() / temperature, dim=-1)
    target = torch.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    loss = torch.nn.functional.kl_div(logp, target, log_target=True, reduction="sum") * temperature**2 / logp.shape[0]
    return loss, (excess_nll(logits, teacher_logits, batch) if batch is not None else None)


def child(variant: str, model_name: str, steps: int, threads: int) -> dict:
    """One measurement in this process (run by the parent with ``--child``)."""
    import torch

    import compress.training as training
    from compress.models.loading import load_model

    torch.set_num_threads(threads)
    if variant == "autograd":
        training.distillation_terms = autograd_terms
    teacher = load_model(model_name, dtype="float32", device="cpu", progress=False).model.eval()
    student = load_model(model_name, dtype="float32", device="cpu", progress=False).model.train()
    params = []
    for name, p in student.named_parameters():
        p.requires_grad_(".layers." in name)
        if p.requires_grad:
            params.append(p)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    spec = training.TrainSpec(loss="kl", bf16=True, balance=2.0, batch_size=8, seqlen=128)
    vocab = student.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        batch = torch.randint(0, vocab, (8, 128), generator=generator)
        start = time.perf_counter()
        loss, _excess = training.step_loss(student, batch, spec, teacher)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"step_s": [round(t, 2) for t in times]}


def run_variant(variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--steps", str(args.steps),
           "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{variant}: the child failed")
    result = json.loads(out.strip().splitlines()[-1])
    return {"variant": variant, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="runs per variant (alternating)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.steps, args.threads)))
        return
    runs = [run_variant(variant, args) for _ in range(args.runs) for variant in VARIANTS]
    print("| KL | peak RSS (MB, median) | seconds per step (median, after the first) |\n|---|---|---|")
    summary = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        peak = median(r["peak_rss_mb"] for r in mine)
        step = median(s for r in mine for s in r["step_s"][1:]) if args.steps > 1 else None
        summary[variant] = {"peak_rss_mb": peak, "step_s": step}
        print(f"| {variant} | {peak:,.0f} | {step if step is None else round(step, 2)} |")
    ratio = summary["chunked"]["peak_rss_mb"] / summary["autograd"]["peak_rss_mb"]
    print(f"\npeak RSS chunked / autograd: {ratio:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "benchmark": "distill_memory", "model": args.model, "steps": args.steps, "threads": args.threads,
            "batch": [8, 128], "bf16": True, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "runs": runs, "summary": summary, "peak_ratio_chunked_to_autograd": round(ratio, 3)}, indent=1))


if __name__ == "__main__":
    main()
