"""Recipes whose model is an encoder (BERT / MiniLM, ViT, DeiT, DINOv2, CLIP towers).

The same stages as the decoder pipeline — load ► passes ► plan ► export ► reload check ► ONNX
parity ► evaluate ► gates ► report, written to a staging folder renamed into place at the end —
with the encoder's own data and figures: calibration batches of sentences or images, and, instead
of perplexity, the agreement of pruned and dense embeddings on held-out inputs (mean cosine,
Spearman rank agreement of pairwise similarities) and, for images, linear-probe accuracy. The
dense figures are measured before the passes run, so no copy of the dense model is kept.
"""

from __future__ import annotations

from pathlib import Path

import torch

RELOAD_BATCHES = 1
ENCODER_DEFAULT_DATASETS = ["austen:persuasion", "austen:northangerabbey"]  # held-out sentences when evaluate.datasets is unset


# ------------------------------------------------------------------------------------ evaluation
class DenseReference:
    """What the dense model produced on the evaluation sets, measured before pruning: pooled
    embeddings per set and, for images, a probe fitted on the dense train features."""

    def __init__(self, model, adapter, sets, device):
        from compress.evaluation.embeddings import encoder_embeddings
        from compress.evaluation.probe import fit_logistic_probe

        self.sets = sets
        self.embeddings = {s.name: encoder_embeddings(adapter, s.batches, normalize=False, device=device) for s in sets}
        self.probes = {}
        for s in sets:
            if s.labels is not None:
                train = encoder_embeddings(adapter, s.train_batches, normalize=False, device=device)
                probe = fit_logistic_probe(train, s.train_labels)
                self.probes[s.name] = (probe, probe.accuracy(self.embeddings[s.name], s.labels))

    def compare(self, model, adapter, evaluate, device) -> dict:
        """The report's ``evaluation`` section for the pruned ``model``."""
        from compress.evaluation.embeddings import embedding_agreement, encoder_embeddings
        from compress.evaluation.probe import fit_logistic_probe

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


def embedding_gates(evaluation: dict | None, spec) -> list:
    from compress.validation import Gate

    if not evaluation:
        return []
    gate = Gate.check("embedding_cosine", evaluation.get("mean_cosine"), spec.min_embedding_cosine, ">=",
                      "mean cosine of dense and pruned embeddings, worst dataset")
    return [gate] if gate is not None else []


# ------------------------------------------------------------------------------------ checks
def reload_max_abs_diff(model, folder: Path, inputs: dict, device) -> float:
    """Reload the export with ``AutoModel`` and compare ``last_hidden_state`` with ``model``."""
    from transformers import AutoModel

    import compress.models  # noqa: F401  (registers the pruned encoder classes)

    dtype = next(model.parameters()).dtype
    reloaded = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        diff = (model(**inputs).last_hidden_state.float() - reloaded(**inputs).last_hidden_state.float()).abs().max()
    return float(diff)


def check_inputs(model, sets, ctx) -> dict:
    """A small fixed batch for the reload and ONNX checks: the first evaluation or calibration
    batch (cut to 4 inputs), else synthetic inputs."""
    from compress.calibration.encoder_data import image_size
    from compress.models.encoder import EncoderAdapter
    from exporters.encoder import sample_encoder_inputs

    for batches in ([s.batches for s in sets][:1] + ([ctx._batches] if ctx is not None and ctx._batches else [])):
        if len(batches):
            return {k: v[:4] for k, v in batches[0].items()}
    adapter = EncoderAdapter(model)
    return sample_encoder_inputs(model, image_size=image_size(adapter) if adapter.modality == "image" else None)


# ------------------------------------------------------------------------------------ run
def run_encoder_recipe(recipe, loaded, staging, monitor, device: str, progress: bool):
    """Run ``recipe`` on an already loaded encoder; see the module docstring."""
    from compress.calibration.encoder_data import calibration_batches, evaluation_sets
    from compress.context import PassContext
    from compress.models.encoder import EncoderAdapter
    from compress.pipeline import _base_report, _save_recipe_copy, run_passes
    from compress.plan import Plan

    model, preprocessor = loaded.model, loaded.tokenizer
    adapter = EncoderAdapter(model)
    dense_counts, dense_widths = adapter.param_counts(), adapter.all_widths()
    c, e = recipe.calibration, recipe.evaluate
    sets, reference = [], None
    if e is not None:
        with monitor.stage("dense evaluation"):
            sets = evaluation_sets(adapter, preprocessor, e.sources(default=ENCODER_DEFAULT_DATASETS), e.items,
                                   e.seqlen, e.batch_size)
            reference = DenseReference(model, adapter, sets, device)

    def load_batches():
        batches = calibration_batches(adapter, preprocessor, c.source, c.samples, c.seqlen, c.seed, c.batch_size)
        return [{k: v.to(device) for k, v in b.items()} for b in batches]

    ctx = PassContext(model=model, tokenizer=preprocessor, batches_loader=load_batches if c is not None else None,
                      batch_size=c.batch_size if c else 16, progress=progress)
    plan = Plan(model={"source": recipe.model.source, "architecture": type(model).__name__, "format": "encoder",
                       "num_layers": adapter.num_layers, "dense_widths": [w.__dict__ for w in dense_widths]})
    pass_reports = run_passes(recipe, ctx, plan, monitor)
    adapter = EncoderAdapter(model)
    target = next((entry.options.ratio for entry in reversed(recipe.passes) if hasattr(entry.options, "ratio")), None)
    report = _base_report(recipe.name, recipe.model.source, device, recipe.model.dtype, recipe.seed,
                          dense_counts, adapter, dense_widths, target)
    report["passes"] = pass_reports
    _save_recipe_copy(recipe, staging.path)
    return finish_encoder(report, model, preprocessor, plan, staging, monitor, sets, reference, e, recipe.validate,
                          device, recipe.export, ctx)


def finish_encoder(report, model, preprocessor, plan, staging, monitor, sets, reference, evaluate, validate,
                   device, export, ctx=None):
    """Export, reload check, ONNX parity, evaluation, gates, report, rename into place."""
    from compress.calibration.encoder_data import image_size
    from compress.models.encoder import EncoderAdapter
    from compress.pipeline import ONNX_SUBDIR, conclude
    from compress.validation import Gate
    from exporters.encoder import encoder_onnx_parity, export_encoder_onnx, export_encoder_safetensors

    with monitor.stage("export"):
        exported = export_encoder_safetensors(model, preprocessor, staging.path)
        files = sorted(exported.get("files", [])) + plan.save(staging.path / "plan.json")
    inputs = check_inputs(model, sets, ctx)
    gates: list[Gate] = []
    with monitor.stage("reload check"):
        diff = reload_max_abs_diff(model, staging.path, inputs, device)
    gates.append(Gate.check("reload_max_abs_diff", diff, validate.reload_max_abs_diff, "<=",
                            "in-memory encoder vs the safetensors export reloaded with AutoModel (last_hidden_state)"))
    if export is not None and "onnx" in export.formats:
        with monitor.stage("export onnx"):
            size = image_size(EncoderAdapter(model)) if EncoderAdapter(model).modality == "image" else None
            onnx_export = export_encoder_onnx(model, staging.path / ONNX_SUBDIR, opset=export.onnx.opset, image_size=size)
        with monitor.stage("validate onnx"):
            parity = encoder_onnx_parity(model, staging.path / ONNX_SUBDIR / "model.onnx", inputs)
        report["onnx"] = {"dir": ONNX_SUBDIR, "opset": export.onnx.opset, "bytes": onnx_export.get("bytes"),
                          "nodes": onnx_export.get("nodes"), "validation": {"parity": {"last_hidden_state": {
                              "max_abs": parity["max_abs_diff"]}}}}
        files += [f"{ONNX_SUBDIR}/{name}" for name in onnx_export.get("files", [])]
        gates.append(Gate.check("onnx_max_abs_diff", parity["max_abs_diff"], validate.onnx_atol, "<=",
                                "ONNX Runtime vs PyTorch last_hidden_state"))
        if "kept_index_mismatches" in parity:
            report["onnx"]["validation"]["kept_index_sets"] = {
                "inputs": parity["kept_index_rows"], "mismatches": parity["kept_index_mismatches"]}
            gates.append(Gate.check("onnx_kept_index_mismatches", parity["kept_index_mismatches"], 0, "<=",
                                    "inputs whose kept token indices differ between ONNX Runtime and PyTorch"))
    if reference is not None:
        with monitor.stage("evaluate"):
            report["evaluation"] = reference.compare(model, EncoderAdapter(model), evaluate, device)
        gates += embedding_gates(report["evaluation"], validate)
    return conclude(report, gates, files, staging, monitor, device)
