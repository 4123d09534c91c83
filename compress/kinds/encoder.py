"""Encoders (BERT / MiniLM, ViT, DeiT, DINOv2, CLIP towers).

The decoder's stages with the encoder's data and figures: calibration batches of sentences or
images; instead of perplexity, the agreement of pruned and dense embeddings on held-out inputs
(mean cosine, Spearman rank agreement of pairwise similarities) and, for images, linear-probe
accuracy. The dense figures are measured before the passes run, so no copy of the dense model is
kept. The report counts encoder linears and attention heads, and a heads pass's ratio is of heads.
"""

from __future__ import annotations

import torch

from compress.calibration.encoder_data import calibration_batches, evaluation_sets, image_size
from compress.context import PassContext
from compress.evaluation.embeddings import embedding_agreement, encoder_embeddings
from compress.evaluation.probe import fit_logistic_probe
from compress.gates import Gate
from compress.kinds.base import ONNX_SUBDIR, ModelKind, base_header, target_ratio
from compress.models.encoder import EncoderAdapter
from compress.models.loading import transformers_progress
from compress.registry import get_pass
from compress.replay import apply_plan

ENCODER_DEFAULT_DATASETS = ["austen:persuasion", "austen:northangerabbey"]  # held-out sentences when unset


class DenseReference:
    """What the dense model produced on the evaluation sets, measured before pruning: pooled
    embeddings per set and, for images, a probe fitted on the dense train features."""

    def __init__(self, adapter, sets, device):
        self.sets = sets
        self.embeddings = {s.name: encoder_embeddings(adapter, s.batches, normalize=False, device=device) for s in sets}
        self.probes = {}
        for s in sets:
            if s.labels is not None:
                train = encoder_embeddings(adapter, s.train_batches, normalize=False, device=device)
                probe = fit_logistic_probe(train, s.train_labels)
                self.probes[s.name] = (probe, probe.accuracy(self.embeddings[s.name], s.labels))

    def compare(self, adapter, evaluate, device) -> dict:
        """The report's ``evaluation`` section for the pruned model of ``adapter``."""
        section = {"kind": "embeddings", "pairs": evaluate.pairs, "datasets": {}}
        for s in self.sets:
            pruned = encoder_embeddings(adapter, s.batches, normalize=False, device=device)
            result = embedding_agreement(self.embeddings[s.name], pruned, pairs=evaluate.pairs).to_dict()
            if s.name in self.probes:
                probe, dense_accuracy = self.probes[s.name]
                train = encoder_embeddings(adapter, s.train_batches, normalize=False, device=device)
                result.update(probe_dense_accuracy=dense_accuracy, probe_accuracy=probe.accuracy(pruned, s.labels),
                              probe_retrained_accuracy=fit_logistic_probe(train, s.train_labels).accuracy(pruned, s.labels))
            section["datasets"][s.name] = result
        cosines = [d["mean_cosine"] for d in section["datasets"].values()]
        section["mean_cosine"] = min(cosines) if cosines else None
        return section


def reload_max_abs_diff(model, folder, inputs: dict, device) -> float:
    """Reload the export with ``AutoModel`` and compare ``last_hidden_state`` with ``model``."""
    from transformers import AutoModel

    import compress.models  # noqa: F401  (registers the pruned encoder classes)

    dtype = next(model.parameters()).dtype
    with transformers_progress(False):
        reloaded = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    reloaded = reloaded.to(device).eval()
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        diff = (model(**inputs).last_hidden_state.float() - reloaded(**inputs).last_hidden_state.float()).abs().max()
    return float(diff)


class EncoderKind(ModelKind):
    name = "encoder"
    words = "encoder"
    plan_format = "encoder"
    calibration_unit = "sentences or images"

    @classmethod
    def describe_evaluation(cls, e) -> str:
        items = f"first {e.items}" if e.items else "held-out"
        return (f"{items} inputs of {', '.join(e.sources(default=ENCODER_DEFAULT_DATASETS))}: cosine of dense and "
                f"pruned embeddings, Spearman over {e.pairs} pairs (images: probe accuracy)")

    @classmethod
    def describe_gates(cls, v, export) -> list[str]:
        gates = [f"reload max|Δ| ≤ {v.reload_max_abs_diff} (last hidden state)"]
        if v.min_embedding_cosine is not None:
            gates.append(f"embedding cosine ≥ {v.min_embedding_cosine} (worst dataset)")
        if "onnx" in export.formats:
            gates.append(f"ONNX vs PyTorch max|Δ| ≤ {v.onnx_atol:g}; kept-token sets identical")
        return gates

    def __init__(self, state):
        super().__init__(state)
        self.adapter: EncoderAdapter | None = None
        self.dense_counts: dict = {}
        self.dense_widths: list = []
        self.sets: list = []
        self.dense: DenseReference | None = None

    def load(self) -> None:
        self.load_pretrained()
        self.adapter = EncoderAdapter(self.state.model)

    def reference(self) -> None:
        s, e = self.state, self.state.evaluate
        self.dense_counts, self.dense_widths = self.adapter.param_counts(), self.adapter.all_widths()
        if e is not None:
            with s.stage("dense evaluation"):
                self.sets = evaluation_sets(self.adapter, s.tokenizer, e.sources(default=ENCODER_DEFAULT_DATASETS),
                                            e.items, e.seqlen, e.batch_size)
                self.dense = DenseReference(self.adapter, self.sets, s.device)

    def pass_context(self) -> PassContext:
        s = self.state
        c = s.recipe.calibration if s.recipe is not None else None

        def load_batches():
            batches = calibration_batches(self.adapter, s.tokenizer, c.source, c.samples, c.seqlen, c.seed, c.batch_size)
            return [{k: v.to(s.device) for k, v in b.items()} for b in batches]

        return PassContext(model=s.model, tokenizer=s.tokenizer, batches_loader=load_batches if c is not None else None,
                           batch_size=c.batch_size if c else 16, progress=s.progress)

    def plan_header(self) -> dict:
        return {"source": self.state.source, "architecture": type(self.state.model).__name__, "format": "encoder",
                "num_layers": self.adapter.num_layers, "dense_widths": [w.__dict__ for w in self.dense_widths]}

    def step_details(self, step) -> dict:
        return {
            "layers_with_heads_removed": sum(p.keep_heads is not None for p in step.layers),
            "layers_with_channels_removed": sum(p.keep_channels is not None for p in step.layers),
            "compensation_biases": sum(p.o_proj_bias is not None for p in step.layers),
            **step.details,
        }

    def replay(self, plan) -> None:
        apply_plan(self.state.model, plan)

    # -------------------------------------------------------------------------- after passes
    def report_header(self) -> dict:
        from compress.kinds.decoder import widths_table

        self.adapter = EncoderAdapter(self.state.model)
        pruned, dense = self.adapter.param_counts(), self.dense_counts
        dense_heads = sum(w.heads for w in self.dense_widths)
        heads = sum(w.heads for w in self.adapter.all_widths())
        return {
            **base_header(self.state),
            "params": {
                "dense": {"total": dense["total"], "encoder_linear": dense["encoder_linear"]},
                "pruned": {"total": pruned["total"], "encoder_linear": pruned["encoder_linear"]},
                "pruning_ratio": 1.0 - pruned["encoder_linear"] / dense["encoder_linear"],
                "total_ratio": 1.0 - pruned["total"] / dense["total"],
                "heads": {"dense": dense_heads, "pruned": heads, "ratio": 1.0 - heads / dense_heads if dense_heads else 0.0,
                          "target_ratio": self.head_target()},
                "target_ratio": None if self.head_target() is not None else target_ratio(self.state),
            },
            "layers": widths_table(self.adapter, self.dense_widths),
        }

    def head_target(self) -> float | None:
        """The share of heads a heads pass was asked to remove (a heads pass's ratio is of heads)."""
        if self.state.recipe is None:
            return None
        return next((e.options.ratio for e in reversed(self.state.recipe.passes)
                     if get_pass(e.name).ratio_of == "heads" and getattr(e.options, "ratio", None) is not None), None)

    def check_inputs(self) -> dict:
        """A small fixed batch for the reload and ONNX checks: the first evaluation or calibration
        batch (cut to 4 inputs), else synthetic inputs."""
        from exporters.encoder import sample_encoder_inputs

        ctx = self.state.ctx
        for batches in [s.batches for s in self.sets][:1] + ([ctx._batches] if ctx is not None and ctx._batches else []):
            if len(batches):
                return {k: v[:4] for k, v in batches[0].items()}
        adapter = EncoderAdapter(self.state.model)
        size = image_size(adapter) if adapter.modality == "image" else None
        return sample_encoder_inputs(self.state.model, image_size=size)

    def export(self) -> None:
        from compress.models.loading import probe_source
        from exporters.encoder import copy_sentence_transformers_modules, export_encoder_safetensors

        s = self.state
        with s.stage("export"):
            exported = export_encoder_safetensors(s.model, s.tokenizer, s.folder)
            source = probe_source(s.source)
            modules = (copy_sentence_transformers_modules(source.path, s.folder)
                       if source.path is not None and source.path.is_dir() else [])
            s.files += sorted(exported.get("files", []) + modules) + s.plan.save(s.folder / "plan.json")

    def reload_check(self) -> None:
        s = self.state
        self.gate_reload(lambda: reload_max_abs_diff(s.model, s.folder, self.check_inputs(), s.device),
                         "in-memory encoder vs the safetensors export reloaded with AutoModel (last_hidden_state)")

    def onnx(self) -> None:
        s = self.state
        if s.export is None or "onnx" not in s.export.formats:
            return
        from exporters.encoder import encoder_onnx_parity, export_encoder_onnx

        with s.stage("export onnx"):
            adapter = EncoderAdapter(s.model)
            size = image_size(adapter) if adapter.modality == "image" else None
            exported = export_encoder_onnx(s.model, s.folder / ONNX_SUBDIR, opset=s.export.onnx.opset, image_size=size)
        with s.stage("validate onnx"):
            parity = encoder_onnx_parity(s.model, s.folder / ONNX_SUBDIR / "model.onnx", self.check_inputs())
        s.report["onnx"] = {"dir": ONNX_SUBDIR, "opset": s.export.onnx.opset, "bytes": exported.get("bytes"),
                            "nodes": exported.get("nodes"), "validation": {"parity": {"last_hidden_state": {
                                "max_abs": parity["max_abs_diff"]}}}}
        s.files += [f"{ONNX_SUBDIR}/{name}" for name in exported.get("files", [])]
        s.gate(Gate.check("onnx_max_abs_diff", parity["max_abs_diff"], s.validate.onnx_atol, "<=",
                          "ONNX Runtime vs PyTorch last_hidden_state"))
        if "kept_index_mismatches" in parity:
            s.report["onnx"]["validation"]["kept_index_sets"] = {
                "inputs": parity["kept_index_rows"], "mismatches": parity["kept_index_mismatches"]}
            s.gate(Gate.check("onnx_kept_index_mismatches", parity["kept_index_mismatches"], 0, "<=",
                              "inputs whose kept token indices differ between ONNX Runtime and PyTorch"))

    def evaluate(self) -> None:
        s = self.state
        if self.dense is None:
            return
        with s.stage("evaluate"):
            s.report["evaluation"] = self.dense.compare(EncoderAdapter(s.model), s.evaluate, s.device)
        s.gate(Gate.check("embedding_cosine", s.report["evaluation"].get("mean_cosine"), s.validate.min_embedding_cosine,
                          ">=", "mean cosine of dense and pruned embeddings, worst dataset"))

    def plan_summary(self) -> dict:
        heads = self.report_header()["params"]["heads"]
        return {"heads": heads, "steps": [{"pass": step.pass_name, "layers_changed": sum(
            p.keep_heads is not None or p.keep_channels is not None for p in step.layers)}
            for step in self.state.plan.steps]}
