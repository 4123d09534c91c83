"""Replaying a plan on a model in memory, without calibration data (``compress apply``).

Structured steps are sliced by the surgeons (decoder or encoder); token-pruning steps re-install
their stages; a step that carries tensors or replays from its details goes through its pass's
``replay``. The result is bit for bit the model the recipe run wrote.
"""

from __future__ import annotations

from pathlib import Path

from compress.errors import PlanError
from compress.models.encoder import EncoderAdapter
from compress.models.adapters import get_adapter
from compress.plan import Plan
from compress.pruning.encoder_surgeon import apply_encoder_step
from compress.pruning.surgeon import REFIT_ARTIFACT, apply_step
from compress.pruning.token_schedule import install_token_pruning
from compress.recipe import unknown_pass_message
from compress.registry import available_passes, get_pass


def load_plan_for_apply(plan_path: Path) -> Plan:
    """Read ``plan_path`` and check that every step names a registered pass (PlanError otherwise)."""
    plan = Plan.load(plan_path)
    for index, step in enumerate(plan.steps):
        if get_pass(step.pass_name) is None:
            raise PlanError(f"{plan_path}: step {index}: "
                            + unknown_pass_message(step.pass_name, list(available_passes())))
    return plan


def check_plan_fits(plan: Plan, adapter) -> None:
    """The plan's layer count and dense widths must be this model's (PlanError otherwise)."""
    expected = plan.model.get("num_layers")
    if expected is not None and expected != adapter.num_layers:
        raise PlanError(f"the plan is for a model with {expected} layers, this model has {adapter.num_layers}")
    dense_widths = plan.model.get("dense_widths")
    if dense_widths and [w.__dict__ for w in adapter.all_widths()] != dense_widths:
        raise PlanError("the plan was made for a model with other layer widths than this one")


def apply_plan(model, plan: Plan) -> None:
    """Replay every step of ``plan`` on ``model`` (a decoder or an encoder) in place."""
    adapter = get_adapter(model)
    check_plan_fits(plan, adapter)
    for step in plan.steps:
        if isinstance(adapter, EncoderAdapter):
            apply_encoder_step(adapter, step)
            if "token_stages" in step.details:  # token_prune / token_merge: the stages they added
                install_token_pruning(model, step.details["token_stages"],
                                      step.details["token_pruning"].get("proportional_attention", True))
            continue
        apply_step(adapter, step)  # slices, biases and least-squares refits
        spec = get_pass(step.pass_name)
        if set(step.artifacts) - {REFIT_ARTIFACT} or (spec is not None and spec.replays_details):
            replay_with_pass(model, step)


def replay_with_pass(model, step) -> None:
    """Re-apply a step's saved tensors or details (e.g. merged LoRA deltas) through its pass's ``replay``."""
    spec = get_pass(step.pass_name)
    replay = getattr(spec.cls, "replay", None) if spec is not None else None
    if replay is None:
        raise PlanError(f"plan step {step.pass_name!r} carries artifacts ({', '.join(step.artifacts)}) "
                        "but no registered pass of that name can replay them")
    replay(model, step)
