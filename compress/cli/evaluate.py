"""``compress eval`` (perplexity per domain) and ``compress generate`` (greedy ONNX generation)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from compress.cli.common import DTypeChoice, DTypeOption, DeviceOption, TrustRemoteCodeOption, data_option, stdout_console, app
from compress.errors import CompressError


class Runtime(str, Enum):
    ort = "ort"
    genai = "genai"


@app.command("generate")
def generate_command(
    prompt: Annotated[str, typer.Argument(help="Text to continue.", show_default=False)],
    onnx: Annotated[
        Path,
        typer.Option(
            "--onnx",
            help="An exported ONNX decoder folder (model.onnx + export.json + tokenizer), e.g. outputs/NAME/onnx.",
            show_default=False,
        ),
    ],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate.")] = 32,
    runtime: Annotated[
        Runtime,
        typer.Option("--runtime", help="ort: compress's greedy loop over ONNX Runtime; genai: onnxruntime-genai "
                     "(reads genai_config.json beside the graph)."),
    ] = Runtime.ort,
    device: DeviceOption = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past the end-of-text token "
                                             "(genai: the end-of-text token is never chosen).")] = False,
) -> None:
    """Greedy generation with the KV cache from an exported ONNX folder (no PyTorch model needed).

    Example: [bold]compress generate --onnx outputs/llama-flap-50/onnx "It was a truth"[/bold]
    (add [bold]--runtime genai[/bold] to run it in onnxruntime-genai)
    """
    from compress.onnx_runtime import OrtDecoder, greedy_generate, load_tokenizer

    if runtime is Runtime.genai:
        from compress.genai_runtime import GenaiDecoder

        decoder = GenaiDecoder(onnx, device=device or "cpu")
        generate = decoder.greedy_generate
    else:
        decoder = OrtDecoder(onnx, device=device or "cpu", optimization="all", require_device=device is not None,
                             logits="graph")
        generate = lambda ids, n, stop_at_eos: greedy_generate(decoder, ids, n, stop_at_eos)  # noqa: E731
    from compress.calibration.sources import prompt_ids

    tokenizer = load_tokenizer(onnx)
    ids = prompt_ids(tokenizer, prompt)
    result = generate(ids, max_new_tokens, stop_at_eos=not ignore_eos)
    console = stdout_console()
    console.print(Text(prompt, style="bold") + Text(tokenizer.decode(result.tokens)), soft_wrap=True)
    console.print(f"[dim]{len(result.tokens)} tokens, {escape(decoder.provider)}[/dim]")


@app.command("eval")
def eval_command(
    model: Annotated[
        str,
        typer.Argument(
            help="Model to evaluate: smollm2-135m, a hub id (offline), a folder (e.g. a run's output) or a .gguf file.",
            show_default=False,
        ),
    ],
    suite: Annotated[
        Optional[str],
        typer.Option("--suite", help="A named evaluation suite (v2: Persuasion and the test split of every domain "
                     "of the general corpus). The default when no --data is given.", show_default=False),
    ] = None,
    data: Annotated[
        Optional[list[str]],
        typer.Option(
            "--data", "-d", callback=lambda values: data_option(values or []) or None,
            help="Text to measure on: general:<domain>, austen:<novel>, or a .txt/.jsonl file or folder. Repeat for "
            "several; added to --suite when both are given.", show_default=False,
        ),
    ] = None,
    reference: Annotated[
        Optional[str],
        typer.Option("--reference", "-r", help="The dense model to compare with (PPL ratios, their geometric mean "
                     "and worst, top-1 agreement; its figures are cached). Default: for a compress output folder, "
                     "the model its report names; 'none' for no comparison.", show_default=False),
    ] = None,
    seqlen: Annotated[int, typer.Option("--seqlen", min=2, help="Tokens per window.")] = 128,
    windows: Annotated[
        int,
        typer.Option(
            "--windows", min=1, help="Use at most this many non-overlapping windows from the start of each text."
        ),
    ] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.")] = 8,
    json_out: Annotated[
        Optional[Path], typer.Option("--json", help="Also write the figures to this JSON file.", show_default=False)
    ] = None,
    device: DeviceOption = None,
    dtype: DTypeOption = DTypeChoice.float32,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Measure perplexity and next-token accuracy per text, against a dense reference when there is one.

    Perplexity = exp(mean NLL of every predicted token) over the first non-overlapping windows.
    Example: [bold]compress eval outputs/llama-flap-50[/bold] (suite v2, compared with the model the
    run pruned).
    """
    from compress.models.loading import load_model
    from compress.kinds.decoder import lm_evaluator
    from compress.devices import resolve_device
    from compress.recipe import EvaluateSpec

    from compress.calibration.suites import EVALUATION_SUITES

    if suite is not None and suite not in EVALUATION_SUITES:
        raise CompressError(f"--suite: unknown suite '{suite}'; the suites are {', '.join(EVALUATION_SUITES)}")
    spec = EvaluateSpec(suite=suite, datasets=data, seqlen=seqlen, max_windows=windows, batch_size=batch_size,
                        continuation_tokens=0)
    device = device or resolve_device("auto")
    reference = _eval_reference(model, reference)
    loaded = load_model(model, dtype=dtype.value, device=device, trust_remote_code=trust_remote_code)
    evaluator = lm_evaluator(spec.model_copy(update={"dense": reference is not None}), None, loaded.tokenizer, True)
    if reference is not None:
        dense = load_model(reference, dtype=dtype.value, device=device, trust_remote_code=trust_remote_code).model
        evaluator.measure_dense(dense)
        del dense
    section = evaluator.evaluate(loaded.model)
    stdout_console().print(eval_table(model, reference, section))
    if json_out is not None:
        from compress.outputs import check_output_file
        from compress.report import to_jsonable

        check_output_file(json_out, is_own=lambda p: False, overwrite=True, option="--json")
        json_out.write_text(json.dumps(to_jsonable({"model": model, "reference": reference, "evaluation": section}),
                                       indent=2) + "\n", encoding="utf-8")


def _eval_reference(model: str, reference: Optional[str]) -> Optional[str]:
    """--reference as given ('none' = no comparison), else the dense model a compress output names."""
    if reference is not None:
        return None if reference.lower() == "none" else reference
    report = Path(model) / "report.json"
    try:
        named = json.loads(report.read_text(encoding="utf-8")).get("model") if report.is_file() else None
    except (OSError, ValueError, AttributeError):
        named = None
    return named if isinstance(named, str) else None


def eval_table(model: str, reference: Optional[str], section: dict) -> Table:
    """Per text: windows, PPL and accuracy (and with a reference: its PPL, the ratio and agreement)."""
    from compress.report import fmt_number, fmt_percent

    title = f"{model}" + (f" vs {reference}" if reference else "") + f" (seqlen {section['seqlen']})"
    table = Table(title=escape(title), title_justify="left")
    columns = ["data", "windows", "PPL", "accuracy"] + (["dense PPL", "ratio", "top-1 agreement"] if reference else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "data" else "right")
    for name, row in section["datasets"].items():
        cells = [escape(name), str(row["windows"]), fmt_number(row["pruned_ppl"]),
                 fmt_percent(row["pruned_accuracy"])]
        if reference:
            cells += [fmt_number(row["dense_ppl"]), fmt_number(row["ppl_ratio"]), fmt_percent(row["top1_agreement"])]
        table.add_row(*cells)
    if reference and section.get("geomean_ppl_ratio") is not None:
        table.add_row("[bold]geometric mean[/bold]", "", "", "", "", f"[bold]{fmt_number(section['geomean_ppl_ratio'])}[/bold]", "")
        table.add_row(f"worst: {escape(str(section['worst_dataset']))}", "", "", "", "",
                      fmt_number(section["worst_ppl_ratio"]), "")
    return table

