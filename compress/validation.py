"""The decoder checks behind the gates: the ONNX export against the in-memory model, and the
compressed model against the dense one (gates themselves: :mod:`compress.gates`).

A gate is a measured value, a threshold and a comparison; a failed gate is a failure of the run
(exit 3), never a warning. Three families:

* **ONNX** (when the artifact has an ``onnx/`` decoder):
  ``onnx_graph_valid`` — ``onnx.checker`` and strict shape inference pass;
  ``onnx_logits_allclose`` — ONNX Runtime vs PyTorch logits of the same compressed model over a
  fixed batch (a prefill, then tokens fed one at a time through the KV cache); the value is the
  worst element's |Δ| / (atol + rtol·|reference|), so it passes at ≤ 1;
  ``onnx_present_allclose`` — the same for the returned KV cache;
  ``onnx_generation_identical`` — share of prompts whose greedy continuation from ONNX Runtime equals
  transformers' ``generate`` token for token (must be 1);
  ``genai_generation_identical`` — the same through onnxruntime-genai and the folder's
  ``genai_config.json`` (when onnxruntime-genai is installed; the report says when it was not).
* **Quantized ONNX** (``export.onnx.quantize``), against the float graph:
  ``onnx_int{4,8}_ppl_ratio`` and ``onnx_int{4,8}_top1_agreement`` on teacher-forced windows;
  ``onnx_int8_generation_identical`` — int8 greedy continuations equal transformers' (int4: reported).
* **Quality** (compressed vs dense on the evaluation texts): ``ppl_ratio``, ``top1_agreement``,
  ``mean_kl``.
* **Reload** (each model kind's reload check): the safetensors export reloaded equals the in-memory model.

On CUDA (``onnxruntime-gpu`` and a GPU) ONNX Runtime runs with ``CUDAExecutionProvider`` and
``use_tf32=0``, PyTorch with TF32 off, and the tolerances are multiplied by ``onnx_cuda_factor``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.calibration.sources import prompt_ids
from compress.errors import CompressError
from compress.gates import Gate

__all__ = ["Closeness", "Gate", "check_graph", "generation_parity", "genai_generation_parity", "logits_parity",
           "next_token_nll", "quality_gates", "teacher_forced_agreement", "tf32_disabled", "validate_gguf",
           "validate_onnx", "validate_quantized"]


def quality_gates(evaluation: dict | None, spec) -> list[Gate]:
    """ppl_ratio (worst dataset), geomean_ppl_ratio, top1_agreement and mean_kl gates from an
    evaluation section."""
    if not evaluation:
        return []
    ratios = [d["ppl_ratio"] for d in evaluation["datasets"].values() if d.get("ppl_ratio") is not None]
    worst = f" ({evaluation['worst_dataset']})" if evaluation.get("worst_dataset") else ""
    gates = [
        Gate.check("ppl_ratio", max(ratios) if ratios else None, spec.max_ppl_ratio, "<=",
                   f"pruned / dense perplexity, worst dataset{worst}"),
        Gate.check("geomean_ppl_ratio", evaluation.get("geomean_ppl_ratio"), spec.max_geomean_ppl_ratio, "<=",
                   "geometric mean over the datasets of pruned / dense perplexity"),
        Gate.check("top1_agreement", evaluation.get("top1_agreement"), spec.min_top1_agreement, ">=", "dense vs pruned next-token argmax"),
        Gate.check("mean_kl", evaluation.get("mean_kl"), spec.max_mean_kl, "<=", "mean KL(dense || pruned) per token"),
    ]
    return [g for g in gates if g is not None]


# ------------------------------------------------------------------------------------- numerics
@contextlib.contextmanager
def tf32_disabled():
    """PyTorch matmuls and convolutions in full fp32 on CUDA (restored on exit)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@dataclass
class Closeness:
    """How far ``candidate`` is from ``reference`` (same shape), all in float64.

    ``tolerance_used``: max over elements of |Δ| / (atol + rtol·|reference|); ≤ 1 means allclose.
    ``max_rel``: max |Δ| / |reference| over elements with |reference| > 1e-6. ``cosine``: of the flattened tensors."""

    max_abs: float
    max_rel: float
    cosine: float
    tolerance_used: float

    CHUNK = 1 << 20  # elements compared at a time: float64 temporaries stay at a few MB

    @classmethod
    def measure(cls, reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float) -> "Closeness":
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape:
            raise ValueError(f"shapes differ: {reference.shape} vs {candidate.shape}")
        ref_flat, cand_flat = reference.reshape(-1), candidate.reshape(-1)
        max_abs = max_rel = used = 0.0
        dot = ref_sq = cand_sq = 0.0
        for start in range(0, ref_flat.size, cls.CHUNK):
            ref = ref_flat[start:start + cls.CHUNK].astype(np.float64)
            cand = cand_flat[start:start + cls.CHUNK].astype(np.float64)
            diff = np.abs(cand - ref)
            magnitude = np.abs(ref)
            significant = magnitude > 1e-6
            if significant.any():
                max_rel = max(max_rel, float((diff[significant] / magnitude[significant]).max()))
            if atol > 0 or rtol > 0:
                used = max(used, float((diff / (atol + rtol * magnitude)).max()))
            elif diff.max() > 0:
                used = math.inf
            max_abs = max(max_abs, float(diff.max()))
            dot += float(ref @ cand)
            ref_sq += float(ref @ ref)
            cand_sq += float(cand @ cand)
        norms = math.sqrt(ref_sq) * math.sqrt(cand_sq)
        cosine = dot / norms if norms > 0 else 1.0
        return cls(max_abs, max_rel, cosine, used)

    @classmethod
    def worst(cls, items: list["Closeness"]) -> "Closeness":
        return cls(
            max(c.max_abs for c in items),
            max(c.max_rel for c in items),
            min(c.cosine for c in items),
            max(c.tolerance_used for c in items),
        )


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def logits_parity(model, decoder, windows: torch.Tensor, decode_steps: int, atol: float, rtol: float) -> dict:
    """ONNX Runtime vs PyTorch on ``windows`` [n, T]: prefill of T - decode_steps tokens, then the rest
    one token per step through the cache. PyTorch runs the whole window at once (no cache), so this
    also checks that the graph's cache handling matches a full forward. One window at a time, so
    memory holds one window's logits from each side.

    Returns {"prefill", "decode", "logits", "present"}: Closeness dicts, the worst over windows
    (present = every layer's key/value after the last step, worst layer), plus the shapes used.
    """
    windows = windows.to(torch.long)
    n, total = windows.shape
    prefill = total - decode_steps
    if prefill < 1:
        raise CompressError(f"parity windows of {total} tokens cannot hold {decode_steps} decode steps")
    measured: dict[str, list[Closeness]] = {"prefill": [], "decode": [], "present": []}
    for window in windows.split(1):
        for name, closeness in window_parity(model, decoder, window, prefill, atol, rtol).items():
            measured[name].append(closeness)
    sections = {"prefill": Closeness.worst(measured["prefill"])}
    if decode_steps:
        sections["decode"] = Closeness.worst(measured["decode"])
    sections["logits"] = Closeness.worst(list(sections.values()))
    sections["present"] = Closeness.worst(measured["present"])
    result = {name: asdict(value) for name, value in sections.items()}
    result.update(windows=n, tokens=total, prefill_tokens=prefill, decode_steps=decode_steps, atol=atol, rtol=rtol)
    return result


def window_parity(model, decoder, window: torch.Tensor, prefill: int, atol: float, rtol: float) -> dict:
    """One window [1, T]: {"prefill", "decode" (when T > prefill), "present" (worst layer)} Closeness."""
    total = window.shape[1]
    with torch.no_grad():
        out = model(input_ids=window.to(_model_device(model)), use_cache=True)
    reference_logits = out.logits.float().cpu().numpy()
    reference_cache = [(layer.keys.float().cpu().numpy(), layer.values.float().cpu().numpy()) for layer in out.cache.layers]
    del out

    ids = window.numpy()
    logits, past = decoder(ids[:, :prefill])
    result = {"prefill": Closeness.measure(reference_logits[:, :prefill], logits, atol, rtol)}
    del logits
    steps = []
    for position in range(prefill, total):
        step_logits, past = decoder(ids[:, position:position + 1], past=past)
        steps.append(step_logits)
    if steps:
        result["decode"] = Closeness.measure(reference_logits[:, prefill:], np.concatenate(steps, axis=1), atol, rtol)
    # A sliding-window layer's torch cache keeps only its last positions; the graph keeps the whole
    # past (its window is in the mask): compare the positions torch kept.
    result["present"] = Closeness.worst([
        Closeness.measure(ref, cand[:, :, cand.shape[2] - ref.shape[2]:], atol, rtol)
        for (ref_k, ref_v), (k, v) in zip(reference_cache, past)
        for ref, cand in ((ref_k, k), (ref_v, v))
    ])
    return result


def generation_parity(model, tokenizer, decoder, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy continuations of each prompt from ONNX Runtime and from transformers' ``generate``."""
    from compress.onnx_runtime import greedy_generate, torch_greedy_generate

    results = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        reference = torch_greedy_generate(model, ids, max_new_tokens).tokens
        candidate = greedy_generate(decoder, ids, max_new_tokens).tokens
        mismatch = next((i for i, (a, b) in enumerate(zip(reference, candidate)) if a != b), None)
        if mismatch is None and len(reference) != len(candidate):
            mismatch = min(len(reference), len(candidate))
        results.append({
            "prompt": prompt,
            "prompt_ids": list(ids),
            "identical": mismatch is None,
            "first_mismatch": mismatch,
            "torch_tokens": reference,
            "onnx_tokens": candidate,
            "torch_text": tokenizer.decode(reference),
            "onnx_text": tokenizer.decode(candidate),
        })
    return results


def check_graph(folder: Path) -> dict:
    """``onnx.checker`` (full) and strict shape inference on the exported graph."""
    import onnx

    from exporters.onnx import ONNX_FILE

    path = Path(folder) / ONNX_FILE
    result = {"checker": "passed", "shape_inference": "passed", "error": None}
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # noqa: BLE001 - any checker failure is a failed gate, with its message
        result.update(checker="failed", error=f"onnx.checker: {error}")
        return result
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as error:  # noqa: BLE001
        result.update(shape_inference="failed", error=f"shape inference: {error}")
    return result


def validate_onnx(model, tokenizer, folder: Path, spec, windows: torch.Tensor, device: str) -> tuple[dict, list[Gate]]:
    """Every ONNX gate for the decoder in ``folder`` against ``model`` (the compressed PyTorch model).

    ``windows`` [n, T]: token windows for the logits check (the first ``spec.onnx_windows`` are used).
    Returns (the report's ``onnx`` validation section, the gates).
    """
    from compress.onnx_runtime import CUDA_PROVIDER, OrtDecoder

    graph = check_graph(folder)
    gates = [Gate.check("onnx_graph_valid", graph["error"] is None, True, "==", graph["error"] or "onnx.checker and shape inference")]
    decoder = OrtDecoder(folder, device=device, optimization="basic")
    fp16 = decoder.spec.dtype == "float16"
    atol, rtol = (spec.onnx_fp16_atol, spec.onnx_fp16_rtol) if fp16 else (spec.onnx_atol, spec.onnx_rtol)
    on_cuda = decoder.provider == CUDA_PROVIDER
    if on_cuda:
        atol, rtol = atol * spec.onnx_cuda_factor, rtol * spec.onnx_cuda_factor
    section: dict[str, Any] = {
        "provider": decoder.provider,
        "graph_dtype": decoder.spec.dtype,
        "graph": graph,
        "graph_kind": decoder.spec.graph,
        "kv_heads": decoder.spec.kv_heads,
    }
    with tf32_disabled():
        parity = logits_parity(model, decoder, windows[: spec.onnx_windows], min(spec.onnx_decode_steps, windows.shape[1] - 1), atol, rtol)
        section["parity"] = parity
        for output in ("logits", "present"):
            stats = parity[output]
            gates.append(Gate.check(
                f"onnx_{output}_allclose", stats["tolerance_used"], 1.0, "<=",
                f"ONNX Runtime ({decoder.provider}) vs PyTorch {output}: max |Δ| {stats['max_abs']:.3g}, "
                f"max rel {stats['max_rel']:.3g}, cosine {stats['cosine']:.8f}; atol {atol:g}, rtol {rtol:g}",
            ))
        if spec.generation_tokens and spec.generation_prompts:
            if decoder.spec.logits == "last":  # the greedy gate runs the graph as it is deployed
                del decoder
                decoder = OrtDecoder(folder, device=device, optimization="basic", logits="graph")
            generations = generation_parity(model, tokenizer, decoder, spec.generation_prompts, spec.generation_tokens)
            section["generation"] = {"max_new_tokens": spec.generation_tokens, "prompts": generations}
            identical, differing = identical_share(generations)
            detail = (f"greedy {spec.generation_tokens}-token continuations equal for {identical:.0%} of prompts"
                      f"{differing}")
            gates.append(Gate.check("onnx_generation_identical", identical, 1.0, ">=", detail))
    del decoder  # its session's weights, before onnxruntime-genai loads its own copy
    if "generation" in section:
        section["genai"], gate = genai_generation_parity(folder, section["generation"]["prompts"],
                                                         spec.generation_tokens, device)
        gates.append(gate)
    return section, [g for g in gates if g is not None]


def identical_share(prompts: list[dict]) -> tuple[float, str]:
    """The share of ``prompts`` (dicts with "prompt" and "identical") whose continuation is identical,
    and "; differ for: 'a'; 'b'" naming the others ("" when there are none)."""
    differing = [p["prompt"] for p in prompts if not p["identical"]]
    share = sum(bool(p["identical"]) for p in prompts) / len(prompts)
    return share, ("; differ for: " + "; ".join(repr(p) for p in differing)) if differing else ""


def genai_generation_parity(folder: Path, generations: list[dict], max_new_tokens: int,
                            device: str) -> tuple[dict, Gate | None]:
    """onnxruntime-genai's greedy continuation of each prompt of ``generations`` (the output of
    :func:`generation_parity`) against transformers' tokens. Without onnxruntime-genai: a section
    that says so and no gate. On CUDA, genai runs on the GPU when its CUDA build is installed,
    else on the CPU."""
    from compress.genai_runtime import GenaiDecoder, genai_available

    if not genai_available():
        return {"skipped": "onnxruntime-genai is not installed (pip install 'compress[cpu]')"}, None
    try:
        decoder = GenaiDecoder(folder, device=device)
    except CompressError:
        if not device.startswith("cuda"):
            raise
        decoder = GenaiDecoder(folder, device="cpu")
    prompts = []
    for generation in generations:
        ids = decoder.greedy_generate(generation["prompt_ids"], max_new_tokens).tokens
        prompts.append({"prompt": generation["prompt"], "identical": ids == generation["torch_tokens"], "tokens": ids})
    identical, differing = identical_share(prompts)
    detail = (f"onnxruntime-genai ({decoder.provider}): greedy continuations equal to transformers for "
              f"{identical:.0%} of prompts{differing}")
    section = {"provider": decoder.provider, "max_new_tokens": max_new_tokens, "prompts": prompts}
    return section, Gate.check("genai_generation_identical", identical, 1.0, ">=", detail)


def validate_quantized(float_folder: Path, folder: Path, spec, windows: torch.Tensor, generations: list[dict] | None,
                       device: str) -> tuple[dict, list[Gate]]:
    """The gates of a weight-only quantized decoder in ``folder`` against the float graph in
    ``float_folder`` (itself validated against PyTorch).

    ``windows`` [n, T]: perplexity ratio (quantized / float, over every predicted token) and top-1
    agreement of the teacher-forced logits. ``generations`` (the float section's, with
    transformers' tokens): greedy continuations through ONNX Runtime; identical for 8 bits is a gate,
    for 4 bits a reported share.
    Returns (the report's section, the gates)."""
    from compress.onnx_runtime import OrtDecoder, greedy_generate

    quantized = OrtDecoder(folder, device=device, optimization="basic")
    reference = OrtDecoder(float_folder, device=device, optimization="basic")
    bits = int((quantized.spec.quantization or {}).get("bits", 0))
    stats = teacher_forced_agreement(reference, quantized, windows)
    section: dict[str, Any] = {"provider": quantized.provider, "quantization": quantized.spec.quantization, **stats}
    gates = [
        Gate.check(f"onnx_int{bits}_ppl_ratio", stats["ppl_ratio"], spec.quant_max_ppl_ratio, "<=",
                   f"int{bits} / float ONNX perplexity on {stats['windows']} windows ({stats['ppl']:.2f} vs "
                   f"{stats['reference_ppl']:.2f})"),
        Gate.check(f"onnx_int{bits}_top1_agreement", stats["top1_agreement"], spec.quant_min_top1_agreement, ">=",
                   f"int{bits} vs float ONNX next-token argmax on {stats['tokens']} tokens"),
    ]
    if generations:
        prompts = []
        for generation in generations:
            tokens = greedy_generate(quantized, generation["prompt_ids"], len(generation["torch_tokens"]) or 1).tokens
            prompts.append({"prompt": generation["prompt"], "identical": tokens == generation["torch_tokens"],
                            "tokens": tokens})
        identical = identical_share(prompts)[0]
        section["generation"] = {"identical": identical, "prompts": prompts}
        if bits == 8:
            gates.append(Gate.check("onnx_int8_generation_identical", identical, 1.0, ">=",
                                    f"int8 greedy continuations equal to transformers for {identical:.0%} of prompts"))
    return section, [g for g in gates if g is not None]


def next_token_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over positions of -log softmax(logits[t])[targets[t]], in float64. logits [T, vocab], targets [T]."""
    logits = np.asarray(logits, dtype=np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return float((log_norm - logits[np.arange(len(targets)), targets]).sum())


def teacher_forced_agreement(reference, candidate, windows: torch.Tensor) -> dict:
    """Two ONNX decoders on the same windows [n, T] (one prefill each): perplexity of each over every
    predicted token (float64 sums), their ratio candidate / reference, and the share of positions
    where their argmax agrees."""
    nll = {"reference": 0.0, "candidate": 0.0}
    agree = tokens = 0
    for window in windows.to(torch.long).split(1):
        ids = window.numpy()
        targets = ids[0, 1:]
        argmax = {}
        for name, decoder in (("reference", reference), ("candidate", candidate)):
            logits = decoder(ids)[0][0, :-1]
            nll[name] += next_token_nll(logits, targets)
            argmax[name] = logits.argmax(axis=-1)
        agree += int((argmax["reference"] == argmax["candidate"]).sum())
        tokens += len(targets)
    ppl, reference_ppl = math.exp(nll["candidate"] / tokens), math.exp(nll["reference"] / tokens)
    return {"windows": int(windows.shape[0]), "tokens": tokens, "ppl": ppl, "reference_ppl": reference_ppl,
            "ppl_ratio": ppl / reference_ppl, "top1_agreement": agree / tokens}


def validate_gguf(model, tokenizer, path: Path, spec, windows: torch.Tensor, dtype: str) -> tuple[dict, list[Gate]]:
    """llama.cpp (through llama-cpp-python) on the written GGUF against the PyTorch model: logits on
    ``windows[:spec.onnx_windows]`` and greedy continuations of the generation prompts. For an f32 file
    both are gates (``gguf_logits_allclose``: max |Δ| ≤ ``gguf_atol``; ``gguf_generation_identical``);
    for f16 and the quantized types they are reported. Without llama-cpp-python: a section that says
    so and no gate."""
    from compress.llama_cpp_runtime import LlamaCppDecoder, llama_cpp_available
    from compress.onnx_runtime import torch_greedy_generate
    from exporters.onnx import eos_token_ids

    if not llama_cpp_available():
        return {"skipped": "llama-cpp-python is not installed (bash scripts/build_llama_cpp.sh)"}, []
    windows = windows[: spec.onnx_windows].to(torch.long)
    decoder = LlamaCppDecoder(path, n_ctx=max(512, windows.shape[1] + spec.generation_tokens + 64))
    measured, agree, count = [], 0, 0
    for window in windows.split(1):
        with torch.no_grad():
            reference = model(input_ids=window.to(_model_device(model))).logits[0].float().cpu().numpy()
        candidate = decoder.logits(window[0].tolist())
        measured.append(Closeness.measure(reference, candidate, spec.gguf_atol, 0.0))
        agree += int((reference.argmax(-1) == candidate.argmax(-1)).sum())
        count += reference.shape[0]
    logits = Closeness.worst(measured)
    section: dict[str, Any] = {"runtime": "llama.cpp (llama-cpp-python)", "dtype": dtype, "logits": asdict(logits),
                               "windows": int(windows.shape[0]), "top1_agreement": agree / count}
    exact = dtype == "f32"
    gates = [Gate.check("gguf_logits_allclose", logits.max_abs, spec.gguf_atol, "<=",
                        f"llama.cpp vs PyTorch logits on {windows.shape[0]} windows: max |Δ| {logits.max_abs:.3g}, "
                        f"cosine {logits.cosine:.8f}")] if exact else []
    if spec.generation_tokens and spec.generation_prompts:
        eos = set(eos_token_ids(model))
        prompts = []
        for prompt in spec.generation_prompts:
            ids = prompt_ids(tokenizer, prompt)
            reference = torch_greedy_generate(model, ids, spec.generation_tokens).tokens
            tokens = decoder.greedy(ids, spec.generation_tokens, eos)
            prompts.append({"prompt": prompt, "identical": tokens == reference, "tokens": tokens,
                            "text": tokenizer.decode(tokens)})
        identical = identical_share(prompts)[0]
        section["generation"] = {"identical": identical, "prompts": prompts}
        if exact:
            gates.append(Gate.check("gguf_generation_identical", identical, 1.0, ">=",
                                    f"llama.cpp greedy continuations equal to transformers for {identical:.0%} of prompts"))
    return section, gates
