"""Decoders (LLaMA-family causal LMs; MoE decoders are the same stages with their own adapter).

load ► dense reference (the evaluation suite's dense figures, cached) ► calibration windows ►
passes ► safetensors export + plan ► reload check (logits of the reloaded export) ► ONNX decoder
with KV cache and its parity gates ► evaluation against the dense figures, generations ► gates.
"""

from __future__ import annotations

import torch

from compress.calibration.sources import random_windows, window_bos
from compress.calibration.token_cache import source_ids
from compress.context import PassContext
from compress.errors import CompressError
from compress.evaluation.lm_evaluator import LMEvaluator
from compress.kinds.base import ONNX_SUBDIR, ModelKind, base_header, target_ratio
from compress.models.adapters import get_adapter
from compress.models.loading import load_model, transformers_progress
from compress.registry import get_pass
from compress.replay import apply_plan
from compress.validation import quality_gates, validate_gguf, validate_onnx, validate_quantized

RELOAD_CHECK_WINDOWS = 4
GGUF_SUBDIR = "gguf"
HELDOUT_WINDOWS = 32  # held-out calibration windows (choices made on data the statistics did not see)
HELDOUT_SEED_OFFSET = 1_000_003  # their draw's seed: calibration.seed + this


# ----------------------------------------------------------------------------------- data
def calibration_loader(calibration, tokenizer):
    """``calibration.samples`` random windows of its source (None without a calibration section)."""
    if calibration is None:
        return None
    c = calibration

    def load() -> torch.Tensor:
        return random_windows(source_ids(tokenizer, c.source), c.samples, c.seqlen, c.seed, source=c.source,
                              bos=window_bos(tokenizer),
                              field="calibration")

    return load


def heldout_loader(calibration, tokenizer):
    """Held-out windows of the calibration source: ``HELDOUT_WINDOWS`` random windows drawn with
    seed ``calibration.seed + HELDOUT_SEED_OFFSET`` (a draw independent of the calibration one)."""
    if calibration is None:
        return None
    c = calibration

    def load() -> torch.Tensor:
        return random_windows(source_ids(tokenizer, c.source), HELDOUT_WINDOWS, c.seqlen,
                              (c.seed + HELDOUT_SEED_OFFSET) % (2**32), source=c.source, field="calibration",
                              bos=window_bos(tokenizer))

    return load


def lm_evaluator(evaluate, validate, tokenizer, progress: bool) -> LMEvaluator | None:
    """The ``evaluate`` section's evaluator (None when evaluation is off). KL is measured when asked
    for, or when a gate needs it."""
    if evaluate is None:
        return None
    kl = evaluate.kl or (validate is not None and validate.max_mean_kl is not None)
    return LMEvaluator(evaluate, tokenizer, kl=kl, progress=progress)


def dense_loader(source: str, dtype: str, device: str, trust_remote_code: bool = False):
    """A function that loads the dense model again (a distillation teacher, the generations section)."""
    def load():
        return load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code, progress=False).model

    return load


def widths_table(adapter, dense_widths) -> list[dict]:
    """Per layer, every width of the adapter's widths record now and dense (``dense_<name>``)."""
    from dataclasses import asdict

    rows = []
    for i, (w, d) in enumerate(zip(adapter.all_widths(), dense_widths)):
        now, dense = asdict(w), asdict(d)
        rows.append({"index": i, **now, **{f"dense_{k}": v for k, v in dense.items()}})
    return rows


def reload_max_abs_diff(model, folder, windows: torch.Tensor, device: str) -> float:
    """Reload the exported folder with ``AutoModelForCausalLM`` and compare logits with ``model``."""
    from transformers import AutoModelForCausalLM

    import compress.models  # noqa: F401  (registers the pruned-model classes)

    dtype = next(model.parameters()).dtype
    with transformers_progress(False):
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    reloaded = reloaded.to(device).eval()
    with torch.no_grad():
        batch = windows[:RELOAD_CHECK_WINDOWS].to(device)
        diff = (model(input_ids=batch).logits.float() - reloaded(input_ids=batch).logits.float()).abs().max()
    del reloaded
    return float(diff)


# ----------------------------------------------------------------------------------- the kind
class DecoderKind(ModelKind):
    name = "decoder"
    words = "decoder"
    evaluates_on_apply = True  # the suite on its first APPLY_EVAL_WINDOWS windows per domain
    quantizes_onnx = True
    writes_gguf = True

    @classmethod
    def describe_evaluation(cls, e) -> str:
        suite = e.suite_name()
        what = f"suite {suite} ({', '.join(e.sources())})" if suite else ", ".join(e.sources())
        return (f"{what} at seqlen {e.seqlen}, first {e.max_windows} windows: PPL ratio per domain, geometric "
                "mean, worst, next-token accuracy" + ("" if e.dense else " (no dense figures)")
                + ("; KL" if e.kl else ""))

    @classmethod
    def describe_gates(cls, v, export) -> list[str]:
        gates = [f"reload max|Δ| ≤ {v.reload_max_abs_diff}"]
        gates += [f"{n} {op} {t}" for n, op, t in (
            ("ppl ratio (worst)", "≤", v.max_ppl_ratio), ("ppl ratio (geometric mean)", "≤", v.max_geomean_ppl_ratio),
            ("top-1 agreement", "≥", v.min_top1_agreement), ("mean KL", "≤", v.max_mean_kl)) if t is not None]
        if "onnx" in export.formats:
            gates.append(f"ONNX vs PyTorch atol {v.onnx_atol:g} rtol {v.onnx_rtol:g}")
            if v.generation_tokens and v.generation_prompts:
                gates.append(f"{v.generation_tokens} greedy tokens identical on {len(v.generation_prompts)} prompts "
                             "(ONNX Runtime, and onnxruntime-genai when installed)")
            quantize = export.onnx.quantize
            if quantize:
                gates.append(f"quantized ({', '.join(quantize)}) vs float ONNX: ppl ratio ≤ {v.quant_max_ppl_ratio:g}, "
                             f"top-1 agreement ≥ {v.quant_min_top1_agreement:g}"
                             + ("; int8 greedy tokens identical" if "int8" in quantize and v.generation_tokens else ""))
        if "gguf" in export.formats:
            gates.append(f"GGUF in llama.cpp (when llama-cpp-python is installed): {export.gguf.dtype} logits and greedy "
                         + (f"tokens vs PyTorch, max|Δ| ≤ {v.gguf_atol:g}" if export.gguf.dtype == "f32" else "tokens reported"))
        return gates

    def __init__(self, state):
        super().__init__(state)
        self.adapter = None
        self.dense_counts: dict = {}
        self.dense_widths: list = []
        self.evaluator: LMEvaluator | None = None

    # -------------------------------------------------------------------------- before passes
    def load(self) -> None:
        self.load_pretrained()
        self.adapter = get_adapter(self.state.model)

    def reference(self) -> None:
        s = self.state
        self.dense_counts, self.dense_widths = self.adapter.param_counts(), self.adapter.all_widths()
        self.evaluator = lm_evaluator(s.evaluate, s.validate, s.tokenizer, s.progress)
        if self.evaluator is not None:
            with s.stage("dense reference"):
                self.evaluator.measure_dense(s.model)

    def load_dense(self):
        return dense_loader(self.state.source, self.state.dtype, self.state.device, self.state.trust_remote_code)()

    def pass_context(self) -> PassContext:
        s = self.state
        calibration = s.recipe.calibration if s.recipe is not None else None
        ctx = PassContext(model=s.model, tokenizer=s.tokenizer, calibration_loader=calibration_loader(calibration, s.tokenizer),
                          batch_size=calibration.batch_size if calibration else 16, progress=s.progress,
                          dense_loader=self.load_dense, heldout_loader=heldout_loader(calibration, s.tokenizer))
        if calibration is not None and any(get_pass(e.name).needs_calibration for e in s.recipe.passes):
            with s.stage("calibration data"):
                ctx.calibration_ids()
        return ctx

    def plan_header(self) -> dict:
        return {"source": self.state.source, "architecture": type(self.state.model).__name__,
                "num_layers": self.adapter.num_layers, "dense_widths": [w.__dict__ for w in self.dense_widths]}

    def step_details(self, step) -> dict:
        return {
            "layers_with_heads_removed": sum(p.keep_heads is not None for p in step.layers),
            "layers_with_kv_heads_removed": sum(p.keep_kv_heads is not None for p in step.layers),
            "layers_with_channels_removed": sum(p.keep_channels is not None for p in step.layers),
            "compensation_biases": sum((p.o_proj_bias is not None) + (p.down_proj_bias is not None) for p in step.layers),
            **step.details,
        }

    def replay(self, plan) -> None:
        apply_plan(self.state.model, plan)

    # -------------------------------------------------------------------------- after passes
    def report_header(self) -> dict:
        self.adapter = get_adapter(self.state.model)
        pruned = self.adapter.param_counts()
        dense = self.dense_counts
        return {
            **base_header(self.state),
            "params": {
                "dense": {"total": dense["total"], "decoder_linear": dense["decoder_linear"]},
                "pruned": {"total": pruned["total"], "decoder_linear": pruned["decoder_linear"]},
                "pruning_ratio": 1.0 - pruned["decoder_linear"] / dense["decoder_linear"],
                "total_ratio": 1.0 - pruned["total"] / dense["total"],
                "target_ratio": target_ratio(self.state),
            },
            "layers": widths_table(self.adapter, self.dense_widths),
        }

    def export(self) -> None:
        s = self.state
        with s.stage("export"):
            exported = self.write_weights()
            plan_files = s.plan.save(s.folder / "plan.json")
        s.files += sorted(exported.get("files", [])) + plan_files

    def write_weights(self) -> dict:
        """Write the model's safetensors, config and tokenizer into the output; ``{"files": [...]}``."""
        from exporters.safetensors import export_safetensors

        s = self.state
        return export_safetensors(s.model, s.tokenizer, s.folder)

    def check_windows(self) -> torch.Tensor:
        if self.evaluator is not None:
            return self.evaluator.first_windows()
        vocab = self.state.model.config.vocab_size
        return torch.randint(0, vocab, (RELOAD_CHECK_WINDOWS, 32), generator=torch.Generator().manual_seed(0))

    def reload_check(self) -> None:
        s = self.state
        self.gate_reload(lambda: reload_max_abs_diff(s.model, s.folder, self.check_windows(), s.device),
                         "in-memory model vs the safetensors export reloaded with from_pretrained")

    def onnx(self) -> None:
        s = self.state
        if s.export is None or "onnx" not in s.export.formats:
            return
        from exporters.onnx import OnnxExportOptions, export_onnx

        onnx_dir = s.folder / ONNX_SUBDIR
        o = s.export.onnx
        options = OnnxExportOptions(opset=o.opset, fp16=o.fp16, slim=o.slim, optimize=o.optimize, graph=o.graph,
                                    last_logits=o.last_logits)
        with s.stage("export onnx"):
            exported = export_onnx(s.model, s.tokenizer, onnx_dir, options)
        with s.stage("validate onnx"):
            section, gates = validate_onnx(s.model, s.tokenizer, onnx_dir, s.validate, self.check_windows(), s.device)
        s.report["onnx"] = {"dir": ONNX_SUBDIR, "graph": exported.spec.graph, "logits": exported.spec.logits,
                            "opset": options.opset, "dtype": exported.spec.dtype,
                            "slim": options.slim, "nodes": exported.nodes, "bytes": exported.bytes,
                            "kv_heads": exported.spec.kv_heads, "validation": section}
        s.files += [f"{ONNX_SUBDIR}/{name}" for name in exported.files]
        s.gate(*gates)
        generations = (section.get("generation") or {}).get("prompts")
        for kind in s.export.onnx.quantize:
            self.quantized_onnx(kind, onnx_dir, generations)

    def quantized_onnx(self, kind: str, float_dir, generations: list | None) -> None:
        """Quantize the float graph in ``float_dir`` (``kind``: int8 or int4) into ``onnx-<kind>/`` and
        validate it against the float graph."""
        from exporters.onnx_quant import QuantOptions, quantize_onnx

        s = self.state
        o = s.export.onnx
        options = QuantOptions(bits=int(kind[3:]), block_size=o.block_size, symmetric=o.symmetric, method=o.int4_method,
                               head_bits=o.head_bits, embeddings=o.quantize_embeddings,
                               accuracy_level=o.accuracy_level)
        subdir = f"{ONNX_SUBDIR}-{kind}"
        with s.stage(f"quantize onnx {kind}"):
            hessians = self.linear_hessians(o.gptq_windows) if options.bits == 4 and options.method == "gptq" else None
            exported = quantize_onnx(float_dir, s.folder / subdir, options, hessians)
        with s.stage(f"validate onnx {kind}"):
            section, gates = validate_quantized(float_dir, s.folder / subdir, s.validate,
                                                self.quant_windows(s.validate.quant_windows), generations, s.device)
        s.report.setdefault("onnx_quantized", []).append(
            {"dir": subdir, "quantization": exported.spec.quantization, "nodes": exported.nodes,
             "bytes": exported.bytes, "validation": section})
        s.files += [f"{subdir}/{name}" for name in exported.files]
        s.gate(*gates)

    def linear_hessians(self, count: int) -> dict:
        """Input second moments of every decoder linear of the compressed model on the first ``count``
        calibration windows (int4_method gptq)."""
        from exporters.onnx_gptq import linear_hessians

        s = self.state
        load = calibration_loader(s.recipe.calibration if s.recipe is not None else None, s.tokenizer)
        if load is None:
            raise CompressError("export.onnx.int4_method: gptq reads calibration windows; the recipe has no calibration "
                                "section")
        return linear_hessians(s.model, load()[:count])

    def gguf(self) -> None:
        s = self.state
        if s.export is None or "gguf" not in s.export.formats:
            return
        from compress.models.loading import probe_source
        from exporters.gguf import GgufOptions, export_gguf

        info = probe_source(s.source)
        tokenizer_gguf = info.path if info.kind in ("embedded", "gguf") else None  # its tokenizer metadata, verbatim
        options = GgufOptions(dtype=s.export.gguf.dtype)
        with s.stage("export gguf"):
            exported = export_gguf(s.model, s.tokenizer, s.folder / GGUF_SUBDIR, options, tokenizer_gguf)
        with s.stage("validate gguf"):
            section, gates = validate_gguf(s.model, s.tokenizer, exported.folder / exported.files[0], s.validate,
                                           self.check_windows(), options.dtype)
        s.report["gguf"] = {"dir": GGUF_SUBDIR, "architecture": exported.architecture, "dtype": options.dtype,
                            "tensor_types": exported.tensor_types, "bytes": exported.bytes, "validation": section}
        s.files += [f"{GGUF_SUBDIR}/{name}" for name in exported.files]
        s.gate(*gates)

    def quant_windows(self, count: int) -> torch.Tensor:
        """``count`` evaluation windows from every domain in turn (random ids without an evaluation)."""
        return self.evaluator.spread_windows(count) if self.evaluator is not None else self.check_windows()[:count]

    def evaluate(self) -> None:
        s = self.state
        if self.evaluator is None:
            return
        with s.stage("evaluate"):
            s.report["evaluation"] = self.evaluator.evaluate(s.model)
        s.gate(*quality_gates(s.report["evaluation"], s.validate))
        with s.stage("generations"):
            generations = self.evaluator.generations(s.model, s.tokenizer, list(s.validate.generation_prompts),
                                                     self.load_dense)
        if generations is not None:
            s.report["generations"] = generations

    def plan_summary(self) -> dict:
        dense = self.dense_counts["decoder_linear"]
        pruned = get_adapter(self.state.model).param_counts()["decoder_linear"]
        return {
            "decoder_linear": {"dense": dense, "pruned": pruned},
            "pruning_ratio": 1.0 - pruned / dense if dense else 0.0,
            "steps": [{"pass": step.pass_name,
                       "layers_changed": sum(any(v is not None for k, v in vars(p).items() if k != "index")
                                             for p in step.layers)} for step in self.state.plan.steps],
        }


class MoeDecoderKind(DecoderKind):
    """Mixture-of-experts decoders: the decoder's stages; the adapter knows the experts, and the
    export writes expert banks (a stock config, or per-layer expert counts)."""

    name = "moe"
    words = "mixture-of-experts decoder"
    writes_gguf = False

    def write_weights(self) -> dict:
        from exporters.moe import export_moe_safetensors

        s = self.state
        return export_moe_safetensors(s.model, s.tokenizer, s.folder)
