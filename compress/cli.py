"""The ``compress`` command line: run recipes, list passes, inspect and evaluate models, replay plans.

Heavy modules (torch, transformers, the runner) are imported inside each command, so
``compress --help`` stays quick. Every :class:`~compress.errors.CompressError` raised by a command
is caught in one place (:class:`CompressGroup`) and printed as ``error: <message>`` on stderr with
the error's exit code (2 for bad input, 3 for a failed gate) — never a traceback.
"""

from __future__ import annotations

import json
import re
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, Union

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from compress.errors import CompressError, PlanError

EXIT_GATE_FAILED = 3
EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------------------------ errors
def print_error(message: str) -> None:
    """``error: <message>`` in red on stderr; continuation lines are indented under the message."""
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    first, *rest = message.splitlines() or [""]
    text = Text("error: ", style="bold red")
    text.append(first, style="red")
    for line in rest:
        text.append("\n       " + line, style="red")
    console.print(text)


class CompressGroup(TyperGroup):
    """The command group; turns user errors from any command into a message and an exit code."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CompressError as error:
            print_error(str(error))
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None


app = typer.Typer(
    name="compress",
    cls=CompressGroup,
    help=(
        "Ahead-of-time structured compression of Hugging Face models.\n\n"
        "Write a recipe (model, calibration text, passes, export, gates) and run it with "
        "[bold]compress run recipe.yaml[/bold]. See docs/recipes.md for every recipe field."
    ),
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class DTypeChoice(str, Enum):
    """Weight dtypes a model can be loaded in."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def _stdout() -> Console:
    return Console(highlight=False)


# ------------------------------------------------------------------------------------ option checks
def _device_option(value: Optional[str]) -> Optional[str]:
    """Validate ``--device`` (auto, cpu, cuda, cuda:N), resolve ``auto``, and refuse CUDA without a GPU."""
    if value is None:
        return None
    from compress.devices import resolve_device

    try:
        return resolve_device(value)
    except CompressError as error:
        raise typer.BadParameter(str(error)) from None


def _data_option(values: list[str]) -> list[str]:
    """Validate every ``--data`` source before a model is loaded."""
    from compress.recipe import check_text_source

    for value in values:
        try:
            check_text_source(value)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None
    return values


def _version_option(value: bool) -> None:
    if value:
        from compress import __version__

        typer.echo(f"compress {__version__}")
        raise typer.Exit()


DeviceOption = Annotated[
    Optional[str],
    typer.Option(
        "--device",
        help="Device to run on: auto (a GPU when one is visible, else the CPU), cpu, cuda or cuda:N.",
        callback=_device_option,
        show_default=False,
    ),
]
DTypeOption = Annotated[DTypeChoice, typer.Option("--dtype", help="Dtype to load the weights in.")]
TrustRemoteCodeOption = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Allow a model folder's own Python code to run while loading it."),
]
OverwriteOption = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing output that compress did not write. Without it, such an output is refused "
        "and left as it is; an output compress wrote itself (it carries a .compress-output marker) is always "
        "replaced. A file, a link, /, your home folder and the working directory are never replaced.",
    ),
]
QuietOption = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="Print only errors, gate failures and the output folder; no summary or progress bars."
    ),
]


def _size_option(value: Optional[str]) -> Optional[int]:
    """``--max-memory``: bytes from ``8GiB``, ``512MiB``, ``2GB`` or a number of bytes."""
    if value is None:
        return None
    from compress.memory import parse_size

    try:
        return parse_size(value, "--max-memory")
    except CompressError as error:
        raise typer.BadParameter(str(error)) from None


MaxMemoryOption = Annotated[
    Optional[str],
    typer.Option(
        "--max-memory",
        help="Prune out of core under this much resident memory (e.g. 8GiB): blocks are read from the "
        "checkpoint one at a time, pruned, written and freed; replaces the recipe's max_memory (docs/scale.md).",
        show_default=False,
    ),
]
OffloadDirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--offload-dir",
        help="Out of core: keep the calibration activations in this folder on disk (one file per batch); "
        "replaces the recipe's offload_dir.",
        show_default=False,
    ),
]


def _memory_overrides(recipe: Any, max_memory: Optional[str], offload_dir: Optional[Path]) -> Any:
    """The recipe with ``--max-memory`` / ``--offload-dir`` applied and checked."""
    size = _size_option(max_memory)
    if offload_dir is not None and size is None and recipe.max_memory is None:
        raise CompressError("--offload-dir is only used out of core: add --max-memory (or max_memory in the recipe)")
    recipe = recipe.with_overrides(max_memory=size, offload_dir=offload_dir)
    if recipe.max_memory is not None:
        from compress.kinds.decoder_streamed import check_out_of_core

        check_out_of_core(recipe)
    return recipe


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the compress version and exit.", callback=_version_option, is_eager=True),
    ] = False,
) -> None:
    """Ahead-of-time structured compression of Hugging Face models."""


# ------------------------------------------------------------------------------------ run
@app.command("run")
def run_command(
    recipe: Annotated[
        Path, typer.Argument(help="The recipe YAML file to run (fields: docs/recipes.md).", show_default=False)
    ],
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Output folder; replaces the recipe's export.output.", show_default=False),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate the recipe and print what would run, without loading a model.")
    ] = False,
    device: DeviceOption = None,
    max_memory: MaxMemoryOption = None,
    offload_dir: OffloadDirOption = None,
    overwrite: OverwriteOption = False,
    quiet: QuietOption = False,
) -> None:
    """Run a recipe: load the model, run its passes in order, export, evaluate and check the gates.

    The output folder gets the model files, [bold]plan.json[/bold], [bold]report.json[/bold],
    [bold]report.md[/bold] and [bold]kept_widths.png[/bold]. Exits with 2 on a bad recipe and 3 when a
    validation gate fails. With [bold]--max-memory[/bold] the model is pruned out of core (one block
    in memory; no evaluation), for models larger than memory.
    """
    from compress.recipe import load_recipe

    parsed = _memory_overrides(load_recipe(recipe), max_memory, offload_dir)
    if dry_run:
        from compress.run.describe import dry_run_lines

        console = _stdout()
        for line in dry_run_lines(parsed.with_overrides(device=device), output=output, overwrite=overwrite):
            console.print(line, markup=False, soft_wrap=True)
        return
    if not quiet:
        where = escape(parsed.source_name)
        _stdout().print(f"running [bold]{escape(parsed.name)}[/bold] ({where}): {_recipe_outline(parsed)}")
        if parsed.max_memory is not None and parsed.evaluate is not None:
            _stdout().print("[yellow]out of core: the evaluation and its gates are skipped (they need the whole "
                            "model); run compress eval on the output where it fits[/yellow]")
    from compress.run import run_recipe

    result = run_recipe(parsed, output=output, dry_run=False, device=device, progress=not quiet, overwrite=overwrite)
    _finish(result, quiet)


# ------------------------------------------------------------------------------------ plan
@app.command("plan")
def plan_command(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file whose passes make the plan.", show_default=False)],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="The plan file (x.json) or a folder to write plan.json into.",
                     show_default=False),
    ],
    device: DeviceOption = None,
    max_memory: MaxMemoryOption = None,
    offload_dir: OffloadDirOption = None,
    overwrite: OverwriteOption = False,
    quiet: QuietOption = False,
) -> None:
    """Score and allocate: run the recipe's passes and write the plan, without exporting or evaluating.

    Data-free passes (magnitude_sp; spa with magnitude importance) read no calibration text.
    Replay the plan with [bold]compress apply PLAN --model M -o DIR[/bold].
    """
    from compress.recipe import load_recipe
    from compress.run.planfile import write_plan

    parsed = _memory_overrides(load_recipe(recipe), max_memory, offload_dir)
    if not quiet:
        where = escape(parsed.source_name)
        _stdout().print(f"planning [bold]{escape(parsed.name)}[/bold] ({where}): {_recipe_outline(parsed)}")
    result = write_plan(parsed, output, device=device, progress=not quiet, overwrite=overwrite)
    if not quiet:
        _stdout().print(plan_summary_table(result.summary))
    _stdout().print(f"plan: [bold]{escape(str(result.path))}[/bold]")


def plan_summary_table(summary: dict) -> Table:
    """What a plan changes: per step the layers (or ONNX groups) cut, and the decoder-linear ratio."""
    from compress.report import fmt_count, fmt_percent

    table = Table(title="plan", title_justify="left")
    table.add_column("step")
    table.add_column("changes", justify="right")
    for index, step in enumerate(summary.get("steps") or []):
        if "layers_changed" in step:
            change = f"{step['layers_changed']} layers"
        else:
            change = f"{step.get('groups_pruned')} groups"
        table.add_row(escape(f"{index}: {step['pass']}"), change)
    linear = summary.get("decoder_linear")
    if linear:
        table.add_row("decoder-linear params", f"{fmt_count(linear['dense'])} → {fmt_count(linear['pruned'])} "
                      f"({fmt_percent(summary['pruning_ratio'])} removed)")
    return table


def _recipe_outline(recipe: Any) -> str:
    passes = " → ".join(entry.name for entry in recipe.passes) or "no passes"
    return escape(f"{recipe.model_source}, {passes}")


# ------------------------------------------------------------------------------------ batch
class ExecutorChoice(str, Enum):
    """Where a batch's jobs run."""

    local = "local"
    ray = "ray"


@app.command("batch")
def batch_command(
    batch_file: Annotated[
        Path, typer.Argument(help="The batch YAML file: jobs and/or a grid (fields: docs/batch.md).", show_default=False)
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate the batch file and list its jobs, without running any.")
    ] = False,
    workers: Annotated[
        Optional[int],
        typer.Option("--workers", "-w", min=1, help="local executor: jobs at once; replaces the file's workers.",
                     show_default=False),
    ] = None,
    executor: Annotated[
        Optional[ExecutorChoice],
        typer.Option("--executor", help="Replaces the file's executor: local (worker processes) or ray (Ray tasks).",
                     show_default=False),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Run many recipes: a list of recipe jobs and/or a grid of models × passes × ratios from a base recipe.

    Each job writes its own folder under the batch's output root; finished jobs are skipped, jobs
    that raise are retried, and [bold]results.json[/bold], [bold]results.csv[/bold] and
    [bold]results.md[/bold] are written into the root. Exits with 2 on a bad batch file and 3 when
    any job failed or failed a gate.
    """
    from compress.batch import load_batch, run_batch

    batch = load_batch(batch_file).with_settings(workers=workers, executor=executor.value if executor else None)
    if dry_run:
        _stdout().print(batch_jobs_table(batch))
        return
    if not quiet:
        _stdout().print(f"running [bold]{len(batch.jobs)}[/bold] jobs from {escape(str(batch.source))} "
                        f"({escape(_batch_executor(batch))}) "
                        f"into [bold]{escape(str(batch.output_root))}[/bold]")
    outcome = run_batch(batch, progress=not quiet)
    results_md = next(path for path in outcome.files if path.suffix == ".md")
    _stdout().print(f"results: [bold]{escape(str(results_md))}[/bold]")
    bad = [result for result in outcome.results if not result.ok]
    for result in bad:
        print_error(f"{result.name}: {result.status}: {result.note()}")
    if bad:
        raise typer.Exit(EXIT_GATE_FAILED)


def _batch_executor(batch: Any) -> str:
    """``local, 2 workers`` or ``ray``."""
    if batch.executor != "local":
        return batch.executor
    return f"local, {batch.workers} worker" + ("s" if batch.workers != 1 else "")


def batch_jobs_table(batch: Any) -> Table:
    """The expanded jobs of a batch: name, model and passes, output folder, and whether it would run."""
    from compress.batch import finished_report

    table = Table(title=escape(f"{batch.source}: {len(batch.jobs)} jobs ({_batch_executor(batch)}, "
                               f"retries {batch.retries})"),
                  title_justify="left")
    for column in ("job", "model: passes", "output", "state"):
        table.add_column(column)
    for job in batch.jobs:
        state = "skip (done)" if finished_report(job) is not None else "run"
        table.add_row(escape(job.name), escape(job.outline()), escape(str(job.output_dir)), state)
    return table


# ------------------------------------------------------------------------------------ apply
@app.command("apply")
def apply_command(
    plan: Annotated[Path, typer.Argument(help="A plan.json written by an earlier run.", show_default=False)],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="The dense model the plan was made for: smollm2-135m, a hub id, a folder, a .gguf file, or the "
            ".onnx file of a plan made on an ONNX model.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Folder to write the pruned model and its report to.", show_default=False),
    ],
    device: DeviceOption = None,
    dtype: DTypeOption = DTypeChoice.float32,
    no_eval: Annotated[
        bool, typer.Option("--no-eval", help="Skip the perplexity evaluation; only rebuild, export and reload-check.")
    ] = False,
    max_memory: MaxMemoryOption = None,
    overwrite: OverwriteOption = False,
    quiet: QuietOption = False,
) -> None:
    """Replay a plan on a model without calibration data: the same kept heads and channels, the same biases.

    Example: [bold]compress apply outputs/llama-flap-50/plan.json --model smollm2-135m -o out2[/bold].
    With [bold]--max-memory[/bold] the plan is replayed out of core, one block at a time (no evaluation).
    """
    if not plan.is_file():
        raise PlanError(f"plan file not found: {plan}")
    from compress.run import apply_plan_file

    result = apply_plan_file(plan, model, output, device=device, dtype=dtype.value, progress=not quiet,
                             evaluate=not no_eval, overwrite=overwrite, max_memory=_size_option(max_memory))
    _finish(result, quiet)


# ------------------------------------------------------------------------------------ validate
@app.command("validate")
def validate_command(
    target: Annotated[
        Path,
        typer.Argument(
            help="A recipe (its output folder is checked with its gates) or an artifact folder written by run.",
            metavar="RECIPE|DIR",
            show_default=False,
        ),
    ],
    device: DeviceOption = None,
    quiet: QuietOption = False,
) -> None:
    """Re-check a finished artifact: ONNX vs PyTorch parity, greedy generation, and quality vs the dense model.

    Gates come from the recipe (given, or the copy a run saves in its folder), else the defaults.
    The folder's report is updated; a failing folder gets a [bold]FAILED[/bold] file and the command exits 3.
    """
    from compress.run.validate import validate_artifact

    result = validate_artifact(target, device=device, progress=not quiet)
    _finish(result, quiet)


# ------------------------------------------------------------------------------------ generate
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
    device: DeviceOption = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past the end-of-text token.")] = False,
) -> None:
    """Greedy generation with ONNX Runtime and the KV cache (no PyTorch model needed).

    Example: [bold]compress generate --onnx outputs/llama-flap-50/onnx "It was a truth"[/bold]
    """
    from compress.onnx_runtime import OrtDecoder, greedy_generate, load_tokenizer

    decoder = OrtDecoder(onnx, device=device or "cpu", optimization="all", require_device=device is not None)
    tokenizer = load_tokenizer(onnx)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    result = greedy_generate(decoder, ids, max_new_tokens, stop_at_eos=not ignore_eos)
    console = _stdout()
    console.print(Text(prompt, style="bold") + Text(tokenizer.decode(result.tokens)), soft_wrap=True)
    console.print(f"[dim]{len(result.tokens)} tokens, {escape(decoder.provider)}[/dim]")


# ------------------------------------------------------------------------------------ run/apply summary
def _finish(result: Any, quiet: bool) -> None:
    """Print the summary (unless quiet) and the output folder; exit 3 with each failure if gates failed."""
    if not quiet:
        _stdout().print(summary_table(result.report))
    _stdout().print(f"output: [bold]{escape(str(result.output_dir))}[/bold]")
    if not result.passed:
        for failure in result.failures or ["validation failed"]:
            print_error(f"gate failed: {failure}")
        raise typer.Exit(EXIT_GATE_FAILED)


def summary_table(report: dict) -> Table:
    """Dense vs pruned: parameter counts, perplexities, agreement, ratios and the gate verdict."""
    from compress.report import fmt_count, fmt_number, fmt_percent

    table = Table(title=f"{escape(str(report.get('recipe', 'run')))}", title_justify="left")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("pruned", justify="right")
    table.add_column("pruned / dense", justify="right")
    from compress.report import prunable_part

    params = report.get("params") or {}
    dense, pruned = params.get("dense") or {}, params.get("pruned") or {}
    part_key, part_label = prunable_part(params)
    for label, key in (([(f"{part_label.lower()} params", part_key)] if part_key else []) + [("total params", "total")]):
        if key in dense or key in pruned:
            share = pruned[key] / dense[key] if dense.get(key) and key in pruned else None
            table.add_row(label, fmt_count(dense.get(key)), fmt_count(pruned.get(key)), fmt_percent(share))
    heads = params.get("heads")
    if heads:
        target = f" (target {fmt_percent(heads['target_ratio'])})" if heads.get("target_ratio") is not None else ""
        table.add_row("attention heads", fmt_count(heads.get("dense")), fmt_count(heads.get("pruned")),
                      f"{fmt_percent(1 - heads['ratio'])} kept{target}")
    evaluation = report.get("evaluation") or {}
    if evaluation.get("kind") == "embeddings":  # encoders: agreement of the embeddings, per dataset
        for name, result in (evaluation.get("datasets") or {}).items():
            table.add_row(f"embedding cosine {escape(str(name))} (mean / min)", "",
                          f"{fmt_number(result.get('mean_cosine'))} / {fmt_number(result.get('min_cosine'))}",
                          f"Spearman {fmt_number(result.get('spearman'))}")
            if result.get("probe_accuracy") is not None:
                table.add_row(f"probe accuracy {escape(str(name))}", fmt_percent(result.get("probe_dense_accuracy")),
                              fmt_percent(result.get("probe_accuracy")),
                              f"refitted {fmt_percent(result.get('probe_retrained_accuracy'))}")
    for name, result in (evaluation.get("datasets") or {}).items() if evaluation.get("kind") is None else ():
        table.add_row(
            f"PPL {escape(str(name))}", fmt_number(result.get("dense_ppl")), fmt_number(result.get("pruned_ppl")),
            fmt_number(result.get("ppl_ratio")),
        )
    if evaluation.get("geomean_ppl_ratio") is not None:
        table.add_row("PPL ratio: geometric mean", "", "", f"[bold]{fmt_number(evaluation['geomean_ppl_ratio'])}[/bold]")
        table.add_row(f"PPL ratio: worst ({escape(str(evaluation.get('worst_dataset')))})", "", "",
                      fmt_number(evaluation.get("worst_ppl_ratio")))
    if evaluation.get("pruned_accuracy") is not None:
        table.add_row("next-token accuracy (mean)", fmt_percent(evaluation.get("dense_accuracy")),
                      fmt_percent(evaluation["pruned_accuracy"]), "")
    generations = report.get("generations") or {}
    if generations.get("mean_pruned_repetition") is not None:
        table.add_row("repeated 4-grams in greedy text", fmt_percent(generations.get("mean_dense_repetition")),
                      fmt_percent(generations["mean_pruned_repetition"]), "")
    if evaluation.get("top1_agreement") is not None:
        table.add_row("top-1 agreement", "", fmt_percent(evaluation["top1_agreement"]), "")
    if evaluation.get("mean_kl") is not None:
        table.add_row("mean KL", "", fmt_number(evaluation["mean_kl"]), "")
    parity = ((report.get("onnx") or {}).get("validation") or {}).get("parity") or {}
    if "logits" in parity:
        table.add_row("ONNX vs PyTorch max |Δ| logits", "", fmt_number(parity["logits"].get("max_abs")), "")
    generation = ((report.get("onnx") or {}).get("validation") or {}).get("generation") or {}
    if generation.get("prompts"):
        same = sum(bool(p.get("identical")) for p in generation["prompts"])
        table.add_row("ONNX greedy generations identical", "", f"{same} / {len(generation['prompts'])}", "")
    if "pruning_ratio" in params and part_key:
        target = params.get("target_ratio")
        note = f" (target {fmt_percent(target)})" if target is not None else ""
        table.add_row(f"pruning ratio ({part_label.lower()})", "", fmt_percent(params["pruning_ratio"]) + note, "")
    if "total_ratio" in params:
        table.add_row("total-parameter ratio", "", fmt_percent(params["total_ratio"]), "")
    streamed = report.get("out_of_core")
    if streamed:
        table.add_row("peak RSS (out of core)", "", f"{streamed['peak_rss_mb']:.0f} MiB",
                      f"cap {streamed['max_memory_mb']:.0f} MiB")
        for sweep, seconds in (streamed.get("seconds_per_block") or {}).items():
            table.add_row(escape(f"seconds per block ({sweep})"), "", f"{seconds:.2f}", "")
    validation = report.get("validation")
    if validation:
        verdict = "[green]passed[/green]" if validation.get("passed") else "[red]FAILED[/red]"
        table.add_row("validation", "", verdict, "")
    return table


# ------------------------------------------------------------------------------------ passes
@app.command("passes")
def passes_command() -> None:
    """List the registered passes, what each does, and its options (the keys a recipe may set)."""
    from compress.registry import available_passes

    console = _stdout()
    specs = available_passes()
    if not specs:
        console.print("no passes are registered")
        return
    for spec in specs.values():
        console.print(pass_options_table(spec))


def pass_options_table(spec: Any) -> Table:
    """One pass as a table: option, type (with bounds), default, description."""
    from compress.recipe import describe_bounds

    title = f"[bold]{escape(spec.name)}[/bold]" + (f" — {escape(spec.summary)}" if spec.summary else "")
    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("option", style="cyan", no_wrap=True)
    table.add_column("type")
    table.add_column("default")
    table.add_column("description")
    for name, field in spec.options.model_fields.items():
        bounds = describe_bounds(field)
        kind = type_label(field.annotation) + (f" ({bounds})" if bounds else "")
        cells = (field.alias or name, kind, default_label(field), field.description or "")
        table.add_row(*(escape(cell) for cell in cells))
    if not spec.options.model_fields:
        table.add_row("—", "", "", "this pass has no options")
    return table


def type_label(annotation: Any) -> str:
    """A readable type: ``float``, ``wifv | ifv | wifn``, ``int | null``, ``list[int]``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return type_label(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(type_label(arg) for arg in args)
    if origin is typing.Literal:
        return " | ".join(str(arg) for arg in args)
    if annotation is type(None):
        return "null"
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_label(a) for a in args)}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def default_label(field: Any) -> str:
    """A field's default in YAML-ish form, or ``required``."""
    if field.is_required():
        return "required"
    try:
        value = field.get_default(call_default_factory=True, validated_data={})
    except TypeError:
        value = field.get_default(call_default_factory=True)
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, Enum):
        value = value.value
    try:
        return json.dumps(value) if not isinstance(value, str) else value
    except TypeError:
        return str(value)


# ------------------------------------------------------------------------------------ inspect
@app.command("inspect")
def inspect_command(
    model: Annotated[
        str,
        typer.Argument(
            help="Model to describe: smollm2-135m, a hub id (offline), a local folder, a .gguf file, an "
            ".onnx file (its coupled-channel groups, as SPA finds them on the graph), or package.module:factory "
            "(a callable returning a torch nn.Module; with --input-shape: its torch-pruning groups). Note: "
            "package.module:factory IMPORTS AND RUNS that Python module, looked up in the current folder first, "
            "so use it only on code you trust.",
            show_default=False,
        ),
    ],
    device: DeviceOption = None,
    dtype: DTypeOption = DTypeChoice.float32,
    trust_remote_code: TrustRemoteCodeOption = False,
    all_groups: Annotated[
        bool,
        typer.Option("--all", help="ONNX or torch factory: list every group (default: a summary of the frozen ones)."),
    ] = False,
    input_shape: Annotated[
        Optional[str],
        typer.Option(
            "--input-shape",
            help="For package.module:factory (required there): the example input's shape, e.g. 1,3,32,32 "
            "(a float32 random tensor, seed 0, traced once in eval mode).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Show a model's architecture, parameter counts by part, prunable groups and per-layer widths.

    For an .onnx file: every group of coupled channels found on the graph (what must be removed
    together), its size and parameters per unit, and why the others are frozen. For
    [bold]package.module:factory[/bold] (any nn.Module, no adapter needed): the same table for the
    groups torch-pruning's dependency graph finds on one forward pass of a random --input-shape input.
    That form imports and runs the named module (the current folder is searched first): it runs
    code, so give it only code you trust.
    """
    if is_torch_factory(model):
        if input_shape is None:
            raise CompressError(f"{model}: a package.module:factory model needs --input-shape "
                                "(e.g. --input-shape 1,3,32,32)")
        shape = parse_input_shape(input_shape)
        TorchGroupsView(model, load_torch_factory(model), shape, all_groups, device=device or "cpu").print(_stdout())
        return
    if input_shape is not None:
        raise CompressError(f"--input-shape applies only to a MODEL of the form package.module:factory, not {model!r}")
    if model.endswith(".onnx"):
        OnnxGroupsView(model, all_groups).print(_stdout())
        return

    from compress.models.adapters import get_adapter
    from compress.models.loading import load_model

    loaded = load_model(model, dtype=dtype.value, device=device or "cpu", trust_remote_code=trust_remote_code)
    summary = get_adapter(loaded.model).summary()
    ModelSummaryView(summary, title=model).print(_stdout())


_FACTORY_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def is_torch_factory(model: str) -> bool:
    """``package.module:factory`` (and not an existing file or folder of that name)."""
    return bool(_FACTORY_SPEC.match(model)) and not Path(model).exists()


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``1,3,32,32`` -> (1, 3, 32, 32); anything but comma-separated positive integers is a CompressError."""
    parts = [part.strip() for part in text.split(",")]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise CompressError(f"--input-shape: expected comma-separated positive integers such as 1,3,32,32, "
                            f"got {text!r}")
    return tuple(int(part) for part in parts)


def load_torch_factory(spec: str) -> Any:
    """Import ``package.module``, call its ``factory()`` and check it returns an ``nn.Module``.

    The current directory is searched first (as ``python -m`` would), so a module next to the user's
    working directory is found by the installed ``compress`` command too. Every failure is a CompressError.
    """
    import importlib
    import os
    import sys

    from torch import nn

    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CompressError(f"{spec}: cannot import module '{module_name}' ({error})") from None
    except Exception as error:  # the module's own code failed while importing
        raise CompressError(f"{spec}: importing module '{module_name}' failed "
                            f"({type(error).__name__}: {error})") from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    factory = getattr(module, attr, None)
    if factory is None:
        raise CompressError(f"{spec}: module '{module_name}' has no attribute '{attr}'")
    if not callable(factory):
        raise CompressError(f"{spec}: '{attr}' is a {type(factory).__name__}, "
                            "not a callable that returns an nn.Module")
    try:
        built = factory()
    except Exception as error:
        raise CompressError(f"{spec}: calling {attr}() failed ({type(error).__name__}: {error})") from None
    if not isinstance(built, nn.Module):
        raise CompressError(f"{spec}: {attr}() returned a {type(built).__name__}, not a torch nn.Module")
    return built


class GroupsView:
    """Coupled-channel groups (``compress.pruning.groups.describe`` rows) as a table; the frozen ones
    are summarised by reason unless ``show_all``. Subclasses fill ``rows`` and ``notes``."""

    LABEL_COLUMN = "group"

    def __init__(self, source: str, rows: list[dict], show_all: bool, notes: Optional[list[str]] = None):
        self.source = source
        self.rows = rows
        self.show_all = show_all
        self.notes = notes or []

    def print(self, console: Console) -> None:
        prunable = [r for r in self.rows if r["status"] == "prunable"]
        frozen = [r for r in self.rows if r["status"] != "prunable"]
        table = Table(title=escape(f"{self.source}: {len(prunable)} prunable groups, {len(frozen)} frozen"))
        for column in ("id", "units", "block", "params/unit", "members"):
            table.add_column(column, justify="right")
        table.add_column(self.LABEL_COLUMN)
        table.add_column("status")
        for r in self.rows if self.show_all else prunable:
            table.add_row(str(r["id"]), str(r["units"]), str(r["block"]), str(r["unit_cost"] or "-"), str(r["members"]),
                          escape(r["label"]), escape(r["status"]))
        console.print(table)
        if frozen and not self.show_all:
            reasons: dict[str, int] = {}
            for r in frozen:
                reasons[r["status"]] = reasons.get(r["status"], 0) + 1
            why = Table(title="frozen groups by reason (--all lists them)")
            why.add_column("groups", justify="right")
            why.add_column("reason")
            for reason, n in sorted(reasons.items(), key=lambda item: -item[1]):
                why.add_row(str(n), escape(reason))
            console.print(why)
        for note in self.notes:
            console.print(escape(note))


class OnnxGroupsView(GroupsView):
    """``compress inspect model.onnx``: SPA's coupled-channel groups as a table."""

    LABEL_COLUMN = "producers → consumers"

    def __init__(self, path: str, show_all: bool):
        from compress.pruning.groups import describe
        from compress.models.onnx_graph.grouping import find_groups, load_onnx

        groups, graph = find_groups(load_onnx(path))
        self.path = path
        self.unknown_ops = graph.unknown_ops
        notes = []
        if graph.unknown_ops:
            notes.append("ops without a grouping rule (their groups are frozen): "
                         + ", ".join(f"{op} ×{n}" for op, n in sorted(graph.unknown_ops.items())))
        super().__init__(path, describe(groups, graph.initializer_shapes), show_all, notes)


class TorchGroupsView(GroupsView):
    """``compress inspect package.module:factory --input-shape ...``: the torch-pruning twin's groups."""

    LABEL_COLUMN = "root.out (+coupled layers)"
    SEED = 0

    def __init__(self, source: str, module: Any, input_shape: tuple[int, ...], show_all: bool, device: str = "cpu"):
        import torch

        from compress.pruning.groups import describe
        from compress.pruning.torch_groups import tensor_shapes, torch_groups

        module = module.to(device).eval()
        generator = torch.Generator().manual_seed(self.SEED)
        example = torch.randn(input_shape, generator=generator, dtype=torch.float32).to(device)
        try:  # a model that cannot run on this input is the user's input, not a grouping bug
            with torch.no_grad():
                module(example)
        except Exception as error:
            raise CompressError(f"{source}: a forward pass on an input of shape {list(input_shape)} failed "
                                f"({type(error).__name__}: {error}); check --input-shape") from None
        groups = torch_groups(module, example)
        super().__init__(f"{source} on input {list(input_shape)}", describe(groups, tensor_shapes(module)), show_all)


class ModelSummaryView:
    """Renders an adapter's ``summary()`` dict as rich tables."""

    PARTS = (
        ("embedding", "embedding"),
        ("attention (q, k, v, o)", "attention"),
        ("MLP (gate, up, down)", "mlp"),
        ("norms", "norms"),
        ("lm_head", "lm_head"),
    )

    def __init__(self, summary: dict, title: str):
        self.summary = summary
        self.title = title

    def print(self, console: Console) -> None:
        console.print(self.overview())
        console.print(self.params())
        if self.summary.get("groups"):
            console.print(self.groups())
        widths = self.summary.get("layer_widths") or []
        if widths:
            console.print(self.widths(widths))

    def overview(self) -> Table:
        table = Table(title=escape(self.title), title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for label, key in (("architecture", "architecture"), ("family", "family"), ("layers", "layers"),
                           ("hidden size", "hidden_size"), ("head dim", "head_dim")):
            if key in self.summary:
                table.add_row(label, escape(str(self.summary[key])))
        return table

    def params(self) -> Table:
        from compress.report import fmt_count, fmt_percent

        params = self.summary.get("params") or {}
        total = params.get("total")
        table = Table(title="parameters", title_justify="left")
        table.add_column("part")
        table.add_column("parameters", justify="right")
        table.add_column("share", justify="right")
        for label, key in self.PARTS:
            if key not in params:
                continue
            value = params[key]
            shown = "0 (tied to the embedding)" if key == "lm_head" and value == 0 else fmt_count(value)
            table.add_row(label, shown, fmt_percent(value / total) if total else "—")
        if "decoder_linear" in params:
            value = params["decoder_linear"]
            share = fmt_percent(value / total) if total else "—"
            kind = "encoder" if "encoder_linear" in params else "decoder"
            table.add_row(f"[bold]{kind} linears[/bold] (prunable)", fmt_count(value), share)
        table.add_row("[bold]total[/bold]", fmt_count(total), "100.0%" if total else "—")
        return table

    def groups(self) -> Table:
        from compress.report import fmt_count

        table = Table(title="prunable groups", title_justify="left")
        table.add_column("kind", style="cyan")
        table.add_column("per layer", justify="right")
        table.add_column("params each", justify="right")
        table.add_column("description")
        for group in self.summary["groups"]:
            table.add_row(
                escape(str(group.get("kind", ""))), str(group.get("per_layer", "")),
                fmt_count(group.get("cost_params")), escape(str(group.get("description", ""))),
            )
        return table

    WIDTH_LABELS = {"heads": "heads", "kv_heads": "KV heads", "intermediate": "MLP channels",
                    "experts": "experts", "top_k": "top-k"}

    @classmethod
    def widths(cls, widths: list[dict]) -> Table | Text:
        """One line when every layer has the same widths, else a table (columns: the widths the
        adapter reports: heads, KV heads for decoders, MLP channels, experts for MoE)."""
        keys = [k for k in widths[0] if k != "index"] if widths else []
        shapes = {tuple(w.get(k) for k in keys) for w in widths}
        if len(shapes) == 1:
            values = shapes.pop()
            return Text(f"all {len(widths)} layers: " + ", ".join(
                f"{v} {cls.WIDTH_LABELS.get(k, k)}" for k, v in zip(keys, values)))
        table = Table(title="width per layer", title_justify="left")
        for column in ["layer"] + [cls.WIDTH_LABELS.get(k, k) for k in keys]:
            table.add_column(column, justify="right")
        for w in widths:
            table.add_row(str(w.get("index")), *(str(w.get(k)) for k in keys))
        return table


# ------------------------------------------------------------------------------------ eval
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
            "--data", "-d", callback=lambda values: _data_option(values or []) or None,
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
    _stdout().print(eval_table(model, reference, section))
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


if __name__ == "__main__":  # pragma: no cover
    app()
