"""Runs: ``compress run``, ``plan``, ``apply`` and ``validate`` as stage lists over the model kinds.

    recipe ► preflight ► kind (chosen once) ► stages ► gates ► report ► staging folder renamed

:mod:`compress.run.runner` holds the one stage list; :mod:`compress.kinds` the strategies.
"""

from compress.replay import apply_plan, load_plan_for_apply
from compress.run.runner import apply_plan_file, make_plan, run_recipe
from compress.run.state import RunResult, RunState

__all__ = ["RunResult", "RunState", "apply_plan", "apply_plan_file", "load_plan_for_apply", "make_plan", "run_recipe"]
