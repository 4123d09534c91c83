"""The run report: ``report.json`` (everything), ``report.md`` (readable tables), ``kept_widths.png``.

The report is a plain dict built by the runner (compress/run) (shape below); this module only writes it. Every
section except ``recipe``/``model`` is optional: a missing section is left out of the markdown.

    {"recipe", "model", "created", "device", "dtype", "seed",
     "params": {"dense": {"total", "decoder_linear"}, "pruned": {...}, "pruning_ratio", "total_ratio", "target_ratio"},
     "layers": [{"index", "heads", "kv_heads", "intermediate", "dense_heads", "dense_kv_heads", "dense_intermediate"}],
     "passes": [{"name", "options", "wall_s", "peak_rss_mb", "details"}],
     "stages": [{"name", "wall_s", "peak_rss_mb"}],
     "evaluation": {"suite", "seqlen", "max_windows",
                    "datasets": {name: {"source", "windows", "tokens", "dense_ppl", "pruned_ppl", "ppl_ratio",
                                        "dense_accuracy", "pruned_accuracy", "top1_agreement", "mean_kl"}},
                    "geomean_ppl_ratio", "worst_dataset", "worst_ppl_ratio", "dense_accuracy",
                    "pruned_accuracy", "top1_agreement", "mean_kl", "dense_from_cache"},
     "generations": {"max_new_tokens", "prompts": [{"prompt", "pruned_text", "pruned_repetition",
                     "dense_ppl_of_pruned", "dense_text", "dense_repetition", "dense_ppl_of_dense"}], ...},
     "validation": {"passed", "gates": [{"name", "value", "threshold", "op", "passed"}]},
     "artifacts": {"dir", "files"}}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "kept_widths.png"


def write_report(out_dir: Path, report: dict) -> None:
    """Write report.json, report.md and (when there are layers) kept_widths.png into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = to_jsonable(report)
    (out_dir / REPORT_JSON).write_text(json.dumps(plain, indent=2) + "\n", encoding="utf-8")
    plotted = plot_kept_widths(plain, out_dir / PLOT_PNG)
    markdown = render_markdown(plain, plot_file=PLOT_PNG if plotted else None)
    (out_dir / REPORT_MD).write_text(markdown, encoding="utf-8")


# ------------------------------------------------------------------------------------ json
def to_jsonable(value: Any) -> Any:
    """Strict-JSON copy of ``value``: paths and tensors/numpy scalars converted, inf/nan as strings."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = sorted(value, key=str) if isinstance(value, set) else value
        return [to_jsonable(item) for item in items]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays/scalars, torch tensors
        return to_jsonable(value.tolist())
    if hasattr(value, "model_dump"):  # pydantic models (pass options)
        return to_jsonable(value.model_dump(mode="json"))
    return str(value)


# ------------------------------------------------------------------------------------ formatting
def fmt_count(value: Any) -> str:
    """``81412352`` -> ``81,412,352``."""
    return f"{int(value):,}" if isinstance(value, (int, float)) else _dash(value)


def fmt_percent(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else _dash(value)


def fmt_number(value: Any) -> str:
    """A measurement with sensible precision: 51.72, 2.100, 1500.2, 0.0001234 -> 1.234e-04."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _dash(value)
    if isinstance(value, int):
        return str(value)
    magnitude = abs(value)
    if value != 0 and (magnitude < 1e-2 or magnitude >= 1e7):
        return f"{value:.3e}"
    if magnitude < 10:
        return f"{value:.3f}"
    return f"{value:.2f}" if magnitude < 1000 else f"{value:.1f}"


def _dash(value: Any) -> str:
    return "—" if value is None else str(value)


def _kept(kept: Any, dense: Any) -> str:
    """``6 / 9``."""
    return f"{kept} / {dense}" if dense not in (None, 0) else _dash(kept)


def _fraction(kept: Any, dense: Any) -> float | None:
    if not isinstance(kept, (int, float)) or not isinstance(dense, (int, float)) or not dense:
        return None
    return kept / dense


def _inline(value: Any, limit: int = 160) -> str:
    """A short one-line rendering of an option or detail value."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 1] + "…"


class MarkdownTable:
    """A GitHub-flavoured markdown table built row by row; cells are escaped."""

    def __init__(self, headers: Iterable[str], right_aligned: Iterable[int] = ()):
        self.headers = list(headers)
        self.right_aligned = set(right_aligned)
        self.rows: list[list[str]] = []

    def add_row(self, *cells: Any) -> None:
        self.rows.append([str(cell) for cell in cells])

    @staticmethod
    def _escape(cell: str) -> str:
        return cell.replace("|", "\\|").replace("\n", " ")

    def render(self) -> list[str]:
        rule = ["---:" if i in self.right_aligned else "---" for i in range(len(self.headers))]
        lines = ["| " + " | ".join(self.headers) + " |", "| " + " | ".join(rule) + " |"]
        lines += ["| " + " | ".join(self._escape(c) for c in row) + " |" for row in self.rows]
        return lines


# ------------------------------------------------------------------------------------ markdown
def render_markdown(report: dict, plot_file: str | None = None) -> str:
    """The whole report.md text."""
    sections = [
        _header_section(report),
        _params_section(report.get("params")),
        _evaluation_section(report.get("evaluation")),
        _generations_section(report.get("generations")),
        _validation_section(report.get("validation")),
        _onnx_section(report.get("onnx")),
        _quantized_section(report.get("onnx_quantized"), report.get("onnx")),
        _gguf_section(report.get("gguf")),
        _layers_section(report.get("layers"), plot_file),
        _passes_section(report.get("passes")),
        _stages_section(report.get("stages")),
        _artifacts_section(report.get("artifacts")),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _header_section(report: dict) -> list[str]:
    lines = [f"# Compression report: {report.get('recipe', 'recipe')}", ""]
    fields = (("Model", "model"), ("Created", "created"), ("Device", "device"), ("Dtype", "dtype"), ("Seed", "seed"))
    for label, key in fields:
        if report.get(key) is not None:
            lines.append(f"- **{label}:** {report[key]}")
    return lines


PRUNABLE_PARTS = (("decoder_linear", "Decoder linears"), ("encoder_linear", "Encoder linears"))


def prunable_part(params: dict) -> tuple[str | None, str]:
    """(key, label) of the prunable part the report counts: decoder or encoder linears (None: only totals)."""
    dense = params.get("dense") or {}
    return next(((key, label) for key, label in PRUNABLE_PARTS if key in dense), (None, "parameters"))


def _params_section(params: dict | None) -> list[str]:
    if not params:
        return []
    dense, pruned = params.get("dense") or {}, params.get("pruned") or {}
    key, label = prunable_part(params)
    table = MarkdownTable(["Parameters", "Dense", "Pruned", "Kept"], right_aligned=(1, 2, 3))
    for row_label, row_key in ([(label, key)] if key else []) + [("Total", "total")]:
        kept = _fraction(pruned.get(row_key), dense.get(row_key))
        table.add_row(row_label, fmt_count(dense.get(row_key)), fmt_count(pruned.get(row_key)), fmt_percent(kept))
    heads = params.get("heads")
    if heads:
        table.add_row("Attention heads", fmt_count(heads.get("dense")), fmt_count(heads.get("pruned")),
                      fmt_percent(_fraction(heads.get("pruned"), heads.get("dense"))))
    lines = ["## Parameters", "", *table.render(), ""]
    if key:
        lines.append(f"- **Pruning ratio** ({label.lower()} removed): {fmt_percent(params.get('pruning_ratio'))}")
    lines.append(f"- **Total-parameter ratio** (all parameters removed): {fmt_percent(params.get('total_ratio'))}")
    if heads and heads.get("target_ratio") is not None:
        lines.append(f"- **Heads removed:** {fmt_percent(heads.get('ratio'))} (target {fmt_percent(heads['target_ratio'])})")
    if params.get("target_ratio") is not None:
        lines.append(f"- **Target ratio:** {fmt_percent(params['target_ratio'])}")
    return lines


def _embedding_section(evaluation: dict) -> list[str]:
    """Encoders: agreement of pruned and dense embeddings (and probe accuracy for images)."""
    lines = ["## Evaluation", "",
             f"Pruned vs dense embeddings of the same held-out inputs; Spearman over {evaluation.get('pairs')} "
             "seeded pairs' similarities.", ""]
    table = MarkdownTable(["Dataset", "Inputs", "Mean cosine", "Min cosine", "Spearman", "Probe acc. dense / pruned / retrained"],
                          right_aligned=(1, 2, 3, 4))
    for name, result in (evaluation.get("datasets") or {}).items():
        probe = "—"
        if result.get("probe_accuracy") is not None:
            probe = " / ".join(fmt_number(result.get(k)) for k in ("probe_dense_accuracy", "probe_accuracy",
                                                                 "probe_retrained_accuracy"))
        table.add_row(name, result.get("items"), fmt_number(result.get("mean_cosine")), fmt_number(result.get("min_cosine")),
                      fmt_number(result.get("spearman")), probe)
    return lines + table.render()


def _evaluation_section(evaluation: dict | None) -> list[str]:
    if not evaluation:
        return []
    if evaluation.get("kind") == "embeddings":
        return _embedding_section(evaluation)
    lines = ["## Evaluation", ""]
    setup = [f"{key} {evaluation[key]}" for key in ("seqlen", "max_windows") if evaluation.get(key) is not None]
    suite = f"suite {evaluation['suite']}: " if evaluation.get("suite") else ""
    if setup:
        lines += [f"{suite}perplexity over the first non-overlapping windows of each text ({', '.join(setup)}); "
                  "accuracy = share of next tokens predicted exactly.", ""]
    datasets = evaluation.get("datasets") or {}
    if datasets:
        table = MarkdownTable(["Dataset", "Dense PPL", "Pruned PPL", "Pruned / dense", "Dense acc.", "Pruned acc.",
                               "Top-1 agreement"], right_aligned=(1, 2, 3, 4, 5, 6))
        for name, result in datasets.items():
            table.add_row(name, fmt_number(result.get("dense_ppl")), fmt_number(result.get("pruned_ppl")),
                          fmt_number(result.get("ppl_ratio")), fmt_percent(result.get("dense_accuracy")),
                          fmt_percent(result.get("pruned_accuracy")), fmt_percent(result.get("top1_agreement")))
        lines += [*table.render(), ""]
    if evaluation.get("geomean_ppl_ratio") is not None:
        lines.append(f"- **PPL ratio, geometric mean over the datasets:** {fmt_number(evaluation['geomean_ppl_ratio'])}"
                     f"; **worst:** {evaluation.get('worst_dataset')} {fmt_number(evaluation.get('worst_ppl_ratio'))}")
    if evaluation.get("dense_from_cache") is not None:
        lines.append("- **Dense figures:** " + ("from the cache (same model weights and windows)"
                                                if evaluation["dense_from_cache"] else "measured in this run"))
    if evaluation.get("top1_agreement") is not None:
        lines.append(f"- **Top-1 agreement** (dense vs pruned): {fmt_percent(evaluation['top1_agreement'])}")
    if evaluation.get("mean_kl") is not None:
        lines.append(f"- **Mean KL** (dense ‖ pruned, per token): {fmt_number(evaluation['mean_kl'])}")
    return lines[:-1] if lines[-1] == "" else lines


def _generations_section(generations: dict | None) -> list[str]:
    """What a user sees: greedy continuations, their repeated 4-grams and the dense model's PPL of them."""
    if not generations or not generations.get("prompts"):
        return []
    lines = ["## Generations", "", f"Greedy continuations ({generations.get('max_new_tokens')} tokens at most). "
             "Repetition = share of 4-grams that repeat an earlier one; dense PPL = the dense model's perplexity "
             "of the continuation (lower reads more like the dense model's text).", ""]
    table = MarkdownTable(["Prompt", "Pruned continuation", "Repetition", "Dense PPL of it", "Dense continuation",
                           "Dense repetition", "Dense PPL of it"], right_aligned=(2, 3, 5, 6))
    for row in generations["prompts"]:
        table.add_row(_inline(row.get("prompt") or "", 60), _inline(row.get("pruned_text") or "", 200),
                      fmt_percent(row.get("pruned_repetition")), fmt_number(row.get("dense_ppl_of_pruned")),
                      _inline(row.get("dense_text") or "", 200), fmt_percent(row.get("dense_repetition")),
                      fmt_number(row.get("dense_ppl_of_dense")))
    return lines + table.render()


def _validation_section(validation: dict | None) -> list[str]:
    if not validation:
        return []
    verdict = "PASSED" if validation.get("passed") else "FAILED"
    where = f" (on {validation['device']})" if validation.get("device") else ""
    lines = ["## Validation", "", f"**{verdict}**{where}"]
    gates = validation.get("gates") or []
    if gates:
        table = MarkdownTable(["Gate", "Value", "Threshold", "Result", "What was measured"], right_aligned=(1, 2))
        for gate in gates:
            threshold = f"{gate.get('op', '')} {fmt_number(gate.get('threshold'))}".strip()
            verdict = "pass" if gate.get("passed") else "**FAIL**"
            table.add_row(gate.get("name"), fmt_number(gate.get("value")), threshold, verdict, gate.get("detail") or "")
        lines += ["", *table.render()]
    return lines


def _onnx_section(onnx: dict | None) -> list[str]:
    if not onnx:
        return []
    lines = ["## ONNX", ""]
    graph = f"- **Graph:** `{onnx.get('dir', 'onnx')}/model.onnx`, opset {onnx.get('opset')}, {onnx.get('dtype')}"
    if isinstance(onnx.get("bytes"), (int, float)):
        graph += f", {fmt_count(onnx.get('nodes'))} nodes, {onnx['bytes'] / 1e6:.1f} MB with weights"
    if onnx.get("graph") == "fused":
        graph += (", fused (GroupQueryAttention, SkipSimplifiedLayerNormalization)"
                  + ("; logits of the last position" if onnx.get("logits") == "last" else ""))
    elif onnx.get("graph"):
        graph += f", {onnx['graph']}"
    lines.append(graph)
    if onnx.get("kv_heads"):
        lines.append(f"- **KV heads per layer:** {_inline(onnx['kv_heads'])}")
    validation = onnx.get("validation") or {}
    if validation.get("output_cosine_to_dense") is not None:
        lines.append(f"- **First output vs the dense graph** on synthetic inputs: cosine "
                     f"{validation['output_cosine_to_dense']:.4f}")
    if validation.get("dense_ms") is not None:
        lines.append(f"- **ONNX Runtime (CPU, median of 5):** dense {validation['dense_ms']:.1f} ms, pruned "
                     f"{validation['pruned_ms']:.1f} ms")
    if validation.get("provider"):
        lines.append(f"- **Validated with:** ONNX Runtime {validation['provider']}")
    parity = validation.get("parity") or {}
    parts = [name for name in ("prefill", "decode", "present") if name in parity]
    if parts:
        lines += ["", f"ONNX Runtime vs PyTorch on {parity.get('windows')} windows of {parity.get('tokens')} tokens "
                  f"({parity.get('prefill_tokens')} prefilled, {parity.get('decode_steps')} decoded through the cache); "
                  f"atol {parity.get('atol')}, rtol {parity.get('rtol')}:", ""]
        table = MarkdownTable(["Output", "Max abs", "Max rel", "Cosine", "Tolerance used"], right_aligned=(1, 2, 3, 4))
        labels = {"prefill": "logits (prefill)", "decode": "logits (cached decode)", "present": "present key/value (worst layer)"}
        for name in parts:
            stats = parity[name]
            table.add_row(labels[name], fmt_number(stats.get("max_abs")), fmt_number(stats.get("max_rel")),
                          f"{stats.get('cosine', 0):.8f}", fmt_percent(stats.get("tolerance_used")))
        lines += table.render()
    generation = validation.get("generation") or {}
    if generation.get("prompts"):
        lines += ["", f"Greedy generation, {generation.get('max_new_tokens')} new tokens:", ""]
        table = MarkdownTable(["Prompt", "Identical", "ONNX Runtime continuation"])
        for item in generation["prompts"]:
            same = "yes" if item.get("identical") else f"**no** (from token {item.get('first_mismatch')})"
            table.add_row(item.get("prompt"), same, _inline(item.get("onnx_text") or "", 200))
        lines += table.render()
    genai = validation.get("genai") or {}
    if genai.get("skipped"):
        lines += ["", f"- **onnxruntime-genai:** not checked: {genai['skipped']}"]
    elif genai.get("prompts"):
        same = sum(bool(p.get("identical")) for p in genai["prompts"])
        lines += ["", f"- **onnxruntime-genai** ({genai.get('provider')}, `genai_config.json` as written): greedy "
                  f"continuations equal to transformers on {same} of {len(genai['prompts'])} prompts"]
    return lines


def _quantized_section(variants: list | None, onnx: dict | None) -> list[str]:
    """The deploy table: each weight-only quantized graph against the float one."""
    if not variants:
        return []
    lines = ["## Quantized ONNX (weight-only)", ""]
    table = MarkdownTable(["Graph", "Weights", "Size MB", "PPL vs float", "Top-1 vs float", "Greedy = float"],
                          right_aligned=(2, 3, 4, 5))
    if onnx and isinstance(onnx.get("bytes"), (int, float)):
        table.add_row(f"`{onnx.get('dir', 'onnx')}/`", onnx.get("dtype") or "float32", f"{onnx['bytes'] / 1e6:.1f}",
                      "1.0000", "100.0%", "yes")
    for v in variants:
        check = v.get("validation") or {}
        q = v.get("quantization") or {}
        bits = q.get("bits")
        head = q.get("head_bits") if bits == 4 else None
        weights = (f"linears int{bits} ({'hqq' if bits == 4 and q.get('method') == 'hqq' else 'rtn'}), block "
                   f"{q.get('block_size')}; head {'int' + str(head) if head else 'float'}; embedding "
                   f"{'int4' if bits == 4 and q.get('embeddings') else 'float'}")
        identical = (check.get("generation") or {}).get("identical")
        table.add_row(f"`{v.get('dir')}/`", weights, f"{v['bytes'] / 1e6:.1f}" if v.get("bytes") else "",
                      f"{check['ppl_ratio']:.4f}" if check.get("ppl_ratio") is not None else "",
                      fmt_percent(check.get("top1_agreement")), "" if identical is None else f"{identical:.0%}")
    lines += table.render()
    lines += ["", "Perplexity ratio and next-token agreement are against the float graph on the same evaluation "
              "windows (teacher-forced); greedy continuations are compared with transformers' on the report's prompts."]
    return lines


def _gguf_section(gguf: dict | None) -> list[str]:
    if not gguf:
        return []
    types = ", ".join(f"{count} {kind}" for kind, count in sorted((gguf.get("tensor_types") or {}).items()))
    lines = ["## GGUF (llama.cpp)", "",
             f"- **File:** `{gguf.get('dir', 'gguf')}/model.gguf`, architecture `{gguf.get('architecture')}`, "
             f"{gguf.get('dtype')}, {gguf['bytes'] / 1e6:.1f} MB ({types} tensors)" if gguf.get("bytes") else ""]
    check = gguf.get("validation") or {}
    if check.get("skipped"):
        lines.append(f"- **llama.cpp:** not checked: {check['skipped']}")
    elif check.get("logits"):
        logits = check["logits"]
        lines.append(f"- **llama.cpp vs PyTorch** on {check.get('windows')} windows: max |Δ| logits "
                     f"{fmt_number(logits.get('max_abs'))}, cosine {logits.get('cosine', 0):.6f}, top-1 agreement "
                     f"{fmt_percent(check.get('top1_agreement'))}")
        generation = check.get("generation") or {}
        if generation.get("prompts"):
            same = sum(bool(p.get("identical")) for p in generation["prompts"])
            lines.append(f"- **Greedy continuations** equal to transformers on {same} of {len(generation['prompts'])} prompts")
    return lines


def _layers_section(layers: list | None, plot_file: str | None) -> list[str]:
    if not layers:
        return []
    table = MarkdownTable(
        ["Layer", "Query heads", "KV heads", "MLP channels", "Heads kept", "Channels kept"],
        right_aligned=(0, 1, 2, 3, 4, 5),
    )
    for layer in layers:
        table.add_row(
            layer.get("index"),
            _kept(layer.get("heads"), layer.get("dense_heads")),
            _kept(layer.get("kv_heads"), layer.get("dense_kv_heads")),
            _kept(layer.get("intermediate"), layer.get("dense_intermediate")),
            fmt_percent(_fraction(layer.get("heads"), layer.get("dense_heads"))),
            fmt_percent(_fraction(layer.get("intermediate"), layer.get("dense_intermediate"))),
        )
    lines = ["## Kept width per layer", ""]
    if plot_file:
        lines += [f"![kept width per layer]({plot_file})", ""]
    return lines + table.render()


def _passes_section(passes: list | None) -> list[str]:
    if not passes:
        return []
    table = MarkdownTable(["Pass", "Options", "Wall (s)", "Peak RSS (MB)"], right_aligned=(2, 3))
    for item in passes:
        options = ", ".join(f"{k}={_inline(v, 40)}" for k, v in (item.get("options") or {}).items())
        wall, rss = fmt_number(item.get("wall_s")), fmt_number(item.get("peak_rss_mb"))
        table.add_row(item.get("name"), options or "—", wall, rss)
    lines = ["## Passes", "", *table.render()]
    for item in passes:
        details = item.get("details") or {}
        if details:
            lines += ["", f"Details of `{item.get('name')}`:", ""]
            lines += [f"- {key}: {_inline(value)}" for key, value in details.items()]
    return lines


def _stages_section(stages: list | None) -> list[str]:
    if not stages:
        return []
    table = MarkdownTable(["Stage", "Wall (s)", "Peak RSS (MB)"], right_aligned=(1, 2))
    for stage in stages:
        table.add_row(stage.get("name"), fmt_number(stage.get("wall_s")), fmt_number(stage.get("peak_rss_mb")))
    walls = [s.get("wall_s") for s in stages if isinstance(s.get("wall_s"), (int, float))]
    if walls:
        table.add_row("**total**", fmt_number(float(sum(walls))), "")
    return ["## Stages", "", *table.render()]


def _artifacts_section(artifacts: dict | None) -> list[str]:
    if not artifacts:
        return []
    lines = ["## Artifacts", ""]
    if artifacts.get("dir"):
        lines += [f"Output folder: `{artifacts['dir']}`", ""]
    lines += [f"- `{name}`" for name in artifacts.get("files") or []]
    return lines[:-1] if lines[-1] == "" else lines


# ------------------------------------------------------------------------------------ plot
def plot_kept_widths(report: dict, path: Path) -> bool:
    """Draw kept query heads, KV heads (top) and MLP channels (bottom) per layer as a fraction of
    the dense width. Returns False (and writes nothing) when the report has no layers."""
    layers = report.get("layers") or []
    if not layers:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    index = [layer.get("index", i) for i, layer in enumerate(layers)]
    heads = [_fraction(l.get("heads"), l.get("dense_heads")) or 0.0 for l in layers]
    kv_heads = [_fraction(l.get("kv_heads"), l.get("dense_kv_heads")) or 0.0 for l in layers]
    channels = [_fraction(l.get("intermediate"), l.get("dense_intermediate")) or 0.0 for l in layers]

    figure = Figure(figsize=(max(6.0, 0.28 * len(layers) + 2.0), 5.5), dpi=110)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    width = 0.4
    top.bar([i - width / 2 for i in index], heads, width, label="query heads", color="#4c72b0")
    top.bar([i + width / 2 for i in index], kv_heads, width, label="KV heads", color="#dd8452")
    top.set_ylabel("kept heads")
    top.legend(loc="upper right", ncol=2, fontsize="small", frameon=False)
    bottom.bar(index, channels, 0.8, label="MLP channels", color="#55a868")
    bottom.set_ylabel("kept MLP channels")
    bottom.set_xlabel("layer")
    top.set_ylim(0, 1.22)  # headroom for the legend above the 100% line
    bottom.set_ylim(0, 1.05)
    for axis in (top, bottom):
        axis.axhline(1.0, color="grey", linewidth=0.6, linestyle="--")
        axis.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
        axis.yaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    ratio = (report.get("params") or {}).get("pruning_ratio")
    suffix = f" (pruning ratio {ratio:.1%})" if isinstance(ratio, (int, float)) else ""
    figure.suptitle(f"{report.get('recipe', 'recipe')}: kept width per layer{suffix}")
    figure.tight_layout()
    figure.savefig(path)
    return True


__all__ = ["write_report", "render_markdown", "plot_kept_widths", "to_jsonable", "REPORT_JSON", "REPORT_MD", "PLOT_PNG"]
