"""MoE expert pruning on a real (upcycled) MoE: SmolLM2-135M turned into a Mixtral-style MoE.

    python benchmarks/moe.py                     # upcycle + fine-tune (cached), then prune and measure
    python benchmarks/moe.py --steps 600         # another fine-tuning budget (a new cache entry)

No pretrained MoE ships offline, so one is built honestly from the embedded dense model:

1. **Upcycle.** Every MLP (1536 SwiGLU channels) becomes 8 experts, top-2. The 768 channels
   (`--shared`) with the largest mean contribution on calibration tokens are copied into every
   expert with their down_proj columns unscaled: renormalised routing weights sum to 1, so these add
   up exactly as in the dense MLP, whatever the routing. Without them SmolLM2 collapses: even an
   oracle that routes each token to the 2 of 8 channel clusters with the largest output gives
   perplexity ~8,400. The other 768 channels are split into 8 routed groups of 96 by balanced
   k-means on their gate_proj rows (unit-normalised, seeded); their down_proj columns are
   multiplied by top-k, so that with equal weights (1/k) the chosen groups add up as in the dense
   MLP. The router row of an expert is the centroid of its routed rows, scaled so that router
   logits have unit standard deviation on calibration tokens. Attention, norms and embeddings are
   copied unchanged.
2. **Fine-tune** the routers and experts (attention and embeddings frozen) for a fixed budget of
   AdamW steps on the Austen calibration split (4 × 128-token windows per step, seeded), then
   measure perplexity on the standard protocol. The MoE and its figures are cached under
   bench-results/moe/ and reused.
3. **Prune** 25% and 50% of the experts with each score of the `moe_experts` pass and report
   perplexity and expert-usage entropy.

Prints a table and writes JSON (default bench-results/moe.json).
"""

from __future__ import annotations

import argparse
import json
import os
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "bench-results" / "moe"
EXPERTS, TOP_K, SHARED = 8, 2, 768


# ------------------------------------------------------------------------------------ upcycling
def balanced_kmeans(features: torch.Tensor, clusters: int, seed: int, iterations: int = 30) -> torch.Tensor:
    """[n] cluster id of each row of ``features`` [n, d], every cluster exactly n / clusters rows.

    Lloyd iterations whose assignment step is capacity-limited: (row, cluster) pairs are taken in
    order of distance, each row once, each cluster until full."""
    n = features.shape[0]
    capacity = n // clusters
    if capacity * clusters != n:
        raise ValueError(f"{n} channels do not split into {clusters} equal experts")
    generator = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(n, generator=generator)[:clusters]].clone()
    assign = torch.empty(n, dtype=torch.long)
    for _ in range(iterations):
        distance = torch.cdist(features, centroids)  # [n, clusters]
        order = distance.flatten().argsort()
        assign.fill_(-1)
        room = torch.full((clusters,), capacity)
        for flat in order.tolist():
            row, cluster = divmod(flat, clusters)
            if assign[row] < 0 and room[cluster] > 0:
                assign[row] = cluster
                room[cluster] -= 1
        new = torch.stack([features[assign == c].mean(0) for c in range(clusters)])
        if torch.allclose(new, centroids):
            break
        centroids = new
    return assign


def upcycle(dense, calibration: torch.Tensor, experts: int = EXPERTS, top_k: int = TOP_K, shared: int = 0,
            seed: int = 0):
    """A MixtralForCausalLM built from a LLaMA-family ``dense`` model (see the module docstring).
    ``calibration`` [n, seq] token ids scale the router logits and rank the channels: the
    ``shared`` channels with the largest mean contribution ‖x_c · down[:, c]‖ are copied into every
    expert unscaled (renormalised weights sum to 1, so they add up exactly as in the dense MLP
    whatever the routing); the other channels are clustered into the experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    routed = (c.intermediate_size - shared) // experts
    config = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=routed + shared,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=getattr(c, "rope_parameters", None), tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=top_k, router_aux_loss_coef=0.0,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )
    moe = MixtralForCausalLM(config).to(torch.float32).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing = set(moe.load_state_dict(state, strict=False).missing_keys)
    inputs = mlp_inputs(dense, calibration)
    for index, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        with torch.no_grad():
            hidden = mlp.act_fn(inputs[index] @ gate.T) * (inputs[index] @ up.T)  # [tokens, C]
            contribution = hidden.abs().double().mean(0) * down.double().norm(dim=0)  # [C]
        hot = contribution.argsort(descending=True)[:shared].sort().values
        rest = torch.tensor([i for i in range(gate.shape[0]) if i not in set(hot.tolist())], dtype=torch.long)
        assign = balanced_kmeans(torch.nn.functional.normalize(gate[rest].double(), dim=1), experts, seed + index)
        block = moe.model.layers[index].mlp
        channels = [rest[assign == e] for e in range(experts)]
        with torch.no_grad():
            block.experts.gate_up_proj.copy_(torch.stack(
                [torch.cat([gate[ch], gate[hot], up[ch], up[hot]]) for ch in channels]))
            block.experts.down_proj.copy_(torch.stack([torch.cat([down[:, ch] * top_k, down[:, hot]], 1)
                                                       for ch in channels]))
            centroids = torch.stack([gate[ch].double().mean(0) for ch in channels]).float()  # [E, h]
            logits = inputs[index] @ centroids.T
            block.gate.weight.copy_(centroids / logits.std().clamp_min(1e-6))
        missing -= {f"model.layers.{index}.mlp.{n}" for n in ("gate.weight", "experts.gate_up_proj",
                                                               "experts.down_proj")}
    if missing - {"lm_head.weight"}:
        raise RuntimeError(f"upcycle left weights unset: {sorted(missing)[:5]}")
    return moe


def mlp_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, [tokens, h] inputs of the MLP (after post_attention_layernorm) on ``ids``."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = [layer.mlp.register_forward_pre_hook(
        lambda module, args, index=index: captured.setdefault(index, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for index, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for batch in ids.split(8):
                model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(captured[i]) for i in range(len(model.model.layers))]


# ------------------------------------------------------------------------------------ fine-tuning
def fine_tune(moe, ids: torch.Tensor, steps: int, lr: float, batch_size: int, seqlen: int, seed: int) -> list[float]:
    """AdamW on routers and experts only, ``steps`` steps of ``batch_size`` random windows; losses."""
    from compress.training import WindowSampler

    for name, parameter in moe.named_parameters():
        parameter.requires_grad_(".mlp." in name)
    trainable = [p for p in moe.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * max(
        0.0, 0.5 * (1 + math.cos(math.pi * s / steps))))
    sampler = WindowSampler(ids, batch_size, seqlen, seed)
    torch.manual_seed(seed)
    moe.train()
    losses = []
    for step in range(steps):
        batch = sampler.next()
        loss = moe(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 10 == 0:
            print(f"  step {step + 1}/{steps}: loss {sum(losses[-10:]) / 10:.4f}", flush=True)
    moe.eval()
    for parameter in moe.parameters():
        parameter.requires_grad_(True)
    return losses


def eval_windows(tokenizer) -> dict[str, torch.Tensor]:
    from compress.calibration.sources import read_text, sequential_windows, tokenize_text

    return {d: sequential_windows(tokenize_text(tokenizer, read_text(f"austen:{d}")), 128, 256)
            for d in ("persuasion", "northangerabbey")}


def perplexities(model, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    from compress.evaluation.perplexity import perplexity

    return {d: perplexity(model, w, batch_size=16, progress=False).ppl for d, w in windows.items()}


def trained_moe(steps: int, lr: float, shared: int = SHARED, seed: int = 0) -> tuple[Path, dict]:
    """The cached upcycled + fine-tuned MoE folder and its record (built on first use)."""
    from compress.calibration.sources import read_text, tokenize_text
    from compress.models.loading import load_model

    folder = CACHE / f"smollm2-moe{EXPERTS}x{TOP_K}-shared{shared}-steps{steps}-lr{lr:g}-seed{seed}"
    record_file = folder / "upcycle.json"
    if record_file.is_file():
        return folder, json.loads(record_file.read_text())
    loaded = load_model("smollm2-135m", progress=False)
    dense = loaded.model.eval()
    train_ids = tokenize_text(loaded.tokenizer, read_text("austen"))
    from compress.calibration.sources import random_windows

    calibration = random_windows(train_ids, 32, 128, seed)
    windows = eval_windows(loaded.tokenizer)
    start = time.perf_counter()
    dense_file = CACHE / "dense_ppl.json"  # the same for every build
    if not dense_file.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        dense_file.write_text(json.dumps(perplexities(dense, windows)))
    record = {"experts": EXPERTS, "top_k": TOP_K, "shared_channels": shared, "steps": steps, "lr": lr, "seed": seed,
              "dense_ppl": json.loads(dense_file.read_text())}
    print(f"dense: {record['dense_ppl']}", flush=True)
    moe = upcycle(dense, calibration, shared=shared, seed=seed)
    del dense
    record["upcycled_ppl"] = perplexities(moe, windows)
    print(f"upcycled, before fine-tuning: {record['upcycled_ppl']}", flush=True)
    losses = fine_tune(moe, train_ids, steps, lr, batch_size=4, seqlen=128, seed=seed)
    record["train_loss_last10"] = sum(losses[-10:]) / min(10, len(losses))
    record["moe_ppl"] = perplexities(moe, windows)
    record["within_10pct"] = record["moe_ppl"]["persuasion"] <= 1.1 * record["dense_ppl"]["persuasion"]
    record["build_s"] = round(time.perf_counter() - start, 1)
    print(f"fine-tuned MoE: {record['moe_ppl']}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    record_file.write_text(json.dumps(record, indent=2))
    return folder, record


# ------------------------------------------------------------------------------------ pruning
SCORES = ("easy_ep", "reap", "frequency")
KEEPS = {0.25: 6, 0.5: 4}  # share of experts removed -> experts kept per layer (of 8)


def usage_entropy(folder: Path, tokenizer, windows: torch.Tensor) -> float:
    """Mean over MoE layers of the entropy (bits) of the share of routed tokens per expert, on
    ``windows``: log2(E) when every expert gets the same share."""
    from compress.models.loading import load_model
    from compress.models.adapters import get_adapter
    from compress.pruning.experts import collect_expert_stats

    model = load_model(str(folder), progress=False).model.eval()
    stats = collect_expert_stats(get_adapter(model), windows, batch_size=8)
    entropies = []
    for layer in stats.values():
        share = layer.counts.double() / layer.counts.sum()
        entropies.append(float(-(share[share > 0] * share[share > 0].log2()).sum()))
    return sum(entropies) / len(entropies)


def prune_rows(folder: Path, record: dict, scores, ratios) -> list[dict]:
    """Prune the cached MoE with each score at each ratio through a recipe; one row each."""
    from compress.run import run_recipe
    from compress.recipe import parse_recipe
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    entropy_windows = eval_windows(tokenizer)["persuasion"][:32]
    rows = [{"config": "moe (dense)", "experts_kept": EXPERTS, **{f"ppl_{d}": v for d, v in record["moe_ppl"].items()},
             "usage_entropy_bits": usage_entropy(folder, tokenizer, entropy_windows)}]
    print_row(rows[-1])
    for ratio in ratios:
        for score in scores:
            out = CACHE / "pruned" / f"{folder.name}-{score}-{ratio}"
            recipe = parse_recipe({
                "name": out.name, "model": str(folder), "dtype": "float32", "seed": 0,
                "calibration": {"source": "austen", "samples": 64, "seqlen": 128, "seed": 0},
                "passes": [{"moe_experts": {"keep": KEEPS[ratio], "score": score}}],
                "export": {"output": str(out), "formats": ["safetensors"]},
                "evaluate": {"datasets": ["austen:persuasion", "austen:northangerabbey"], "seqlen": 128,
                             "max_windows": 256, "batch_size": 16, "dense": False, "agreement": False},
            }, "moe.py")
            start = time.perf_counter()
            result = run_recipe(recipe, progress=False)
            if not result.passed:
                raise SystemExit(f"{out.name}: {result.failures}")
            evaluation = result.report["evaluation"]["datasets"]
            details = result.report["passes"][0]["details"]
            rows.append({
                "config": f"{score}-{ratio}", "score": score, "experts_removed": ratio, "experts_kept": KEEPS[ratio],
                **{f"ppl_{name.split(':')[-1]}": v["pruned_ppl"] for name, v in evaluation.items()},
                "usage_entropy_bits": usage_entropy(out, tokenizer, entropy_windows),
                "params_total": result.report["params"]["pruned"]["total"],
                "kept_original": [layer["kept_original"] for layer in details["moe_layers"]],
                "router_exact": details["router_exact"], "wall_s": round(time.perf_counter() - start, 1),
            })
            print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                        if k not in ("config", "kept_original"))
    print(f"{row['config']:<18} {figures}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps of the upcycled MoE")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--shared", type=int, default=SHARED, help="channels copied into every expert")
    parser.add_argument("--scores", nargs="+", choices=SCORES, default=list(SCORES))
    parser.add_argument("--ratios", nargs="+", type=float, choices=list(KEEPS), default=list(KEEPS),
                        help="shares of experts removed")
    parser.add_argument("--build-only", action="store_true", help="only upcycle and fine-tune (cached)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "moe.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    folder, record = trained_moe(args.steps, args.lr, args.shared)
    print(json.dumps(record, indent=2))
    rows = [] if args.build_only else prune_rows(folder, record, args.scores, args.ratios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"moe": {"folder": os.path.relpath(folder, ROOT), **record}, "rows": rows}, indent=2))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
