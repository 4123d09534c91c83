"""``compress run``, ``plan``, ``apply`` and ``validate``, and the run summary they print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from compress.cli.common import DTypeChoice, DTypeOption, DeviceOption, EXIT_GATE_FAILED, MaxMemoryOption, OffloadDirOption, OverwriteOption, QuietOption, memory_overrides, size_option, stdout_console, app, print_error
from compress.errors import PlanError


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

    parsed = memory_overrides(load_recipe(recipe), max_memory, offload_dir)
    if dry_run:
        from compress.run.describe import dry_run_lines

        console = stdout_console()
        for line in dry_run_lines(parsed.with_overrides(device=device), output=output, overwrite=overwrite):
            console.print(line, markup=False, soft_wrap=True)
        return
    if not quiet:
        where = escape(parsed.source_name)
        stdout_console().print(f"running [bold]{escape(parsed.name)}[/bold] ({where}): {_recipe_outline(parsed)}")
        if parsed.max_memory is not None and parsed.evaluate is not None:
            stdout_console().print("[yellow]out of core: the evaluation and its gates are skipped (they need the whole "
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

    parsed = memory_overrides(load_recipe(recipe), max_memory, offload_dir)
    if not quiet:
        where = escape(parsed.source_name)
        stdout_console().print(f"planning [bold]{escape(parsed.name)}[/bold] ({where}): {_recipe_outline(parsed)}")
    result = write_plan(parsed, output, device=device, progress=not quiet, overwrite=overwrite)
    if not quiet:
        stdout_console().print(plan_summary_table(result.summary))
    stdout_console().print(f"plan: [bold]{escape(str(result.path))}[/bold]")


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
                             evaluate=not no_eval, overwrite=overwrite, max_memory=size_option(max_memory))
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
# ------------------------------------------------------------------------------------ run/apply summary
def _finish(result: Any, quiet: bool) -> None:
    """Print the summary (unless quiet) and the output folder; exit 3 with each failure if gates failed."""
    if not quiet:
        stdout_console().print(summary_table(result.report))
    stdout_console().print(f"output: [bold]{escape(str(result.output_dir))}[/bold]")
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
