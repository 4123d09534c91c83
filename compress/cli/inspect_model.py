"""``compress inspect``: architecture, parameters by part, prunable groups and their costs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from compress.cli.common import DTypeChoice, DTypeOption, DeviceOption, TrustRemoteCodeOption, stdout_console, app
from compress.errors import CompressError


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
        TorchGroupsView(model, load_torch_factory(model), shape, all_groups, device=device or "cpu").print(stdout_console())
        return
    if input_shape is not None:
        raise CompressError(f"--input-shape applies only to a MODEL of the form package.module:factory, not {model!r}")
    if model.endswith(".onnx"):
        OnnxGroupsView(model, all_groups).print(stdout_console())
        return

    from compress.models.adapters import get_adapter
    from compress.models.loading import load_model

    loaded = load_model(model, dtype=dtype.value, device=device or "cpu", trust_remote_code=trust_remote_code)
    summary = get_adapter(loaded.model).summary()
    ModelSummaryView(summary, title=model).print(stdout_console())


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
