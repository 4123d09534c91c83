"""`compress batch`: batch files, grid expansion, skipping, retries, results tables and both executors.

The runner's logic (skip, retry, statuses, results) is checked with an in-process executor and a
fake job function; the real executors run tiny recipes (a 4-layer random Llama) end to end.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from compress import batch as batch_module
from compress.batch import (
    FAILED,
    GATE_FAILED,
    PASSED,
    SKIPPED,
    LocalExecutor,
    RayExecutor,
    finished_report,
    headline_figures,
    load_batch,
    run_batch,
)
from compress.cli import app
from compress.errors import CompressError, RecipeError
from conftest import tiny_smol_folder

REPO = Path(__file__).resolve().parents[1]
SHIPPED_BATCH = REPO / "recipes" / "batches" / "batch-smollm2-magnitude.yaml"
WIDE = {"COLUMNS": "250"}
runner = CliRunner()


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def tiny_recipe(model: str, pass_name: str = "magnitude_sp", ratio: float = 0.3, **fields) -> dict:
    """A recipe that runs in about a second on the tiny model: few windows, short sequences."""
    data = {
        "model": str(model),
        "device": "cpu",
        "calibration": {"source": "austen:persuasion", "samples": 4, "seqlen": 16, "batch_size": 4},
        "passes": [{pass_name: {"ratio": ratio}}],
        "evaluate": {"datasets": ["austen:persuasion"], "seqlen": 16, "max_windows": 2, "batch_size": 2},
        "validate": {"reload_max_abs_diff": 1e-3},
    }
    data.update(fields)
    return data


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_smol_folder(tmp_path_factory.mktemp("tiny-smol"))


# ------------------------------------------------------------------------------ in-process doubles
class InlineExecutor:
    """Runs each attempt when it is submitted, in this process (stands in for the local/ray executors)."""

    def __init__(self):
        self.submitted: list[str] = []
        self.outcomes: dict[int, dict] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    def submit(self, function, task, resources):
        self.submitted.append(task["name"])
        handle = len(self.submitted)
        self.outcomes[handle] = function(task)
        return handle

    def next_finished(self, handles):
        return [(handles[0], self.outcomes.pop(handles[0]))]


PLAN: dict[str, list[str]] = {}  # job name -> what each attempt does: pass, gate or error (default pass)


def fake_job(task: dict) -> dict:
    """Writes what the pipeline writes on success (report.json, recipe.yaml) unless PLAN says error."""
    attempts = PLAN.setdefault(task["name"], [])
    action = attempts.pop(0) if attempts else "pass"
    if action == "error":
        return {"error": f"RuntimeError: {task['name']} broke", "traceback": "Traceback ...", "seconds": 0.5}
    if action == "raise":  # what a worker that dies looks like from the executor's side
        raise RuntimeError(f"{task['name']}'s worker died")
    (pass_name, options), = task["recipe"]["passes"][0].items()
    passed = action == "pass"
    report = {
        "recipe": task["recipe"]["name"],
        "params": {"dense": {"total": 1000}, "pruning_ratio": options["ratio"], "target_ratio": None},
        "evaluation": {"seqlen": 16, "max_windows": 2, "datasets": {"persuasion": {"ppl_ratio": 1.25}},
                       "top1_agreement": 0.75},
        "validation": {"passed": passed},
    }
    output = Path(task["output"])
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(report), encoding="utf-8")
    (output / "recipe.yaml").write_text(yaml.safe_dump(task["recipe"], sort_keys=False), encoding="utf-8")
    failures = [] if passed else ["ppl_ratio = 1.25 (must be <= 1.1)"]
    return {"passed": passed, "failures": failures, "report": report, "seconds": 0.25}


@pytest.fixture
def plan(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "PLAN", {})
    return PLAN


def fake_batch(tmp_path: Path, names: list[str], retries: int = 1) -> Path:
    """A batch of magnitude_sp jobs on the (never loaded) default model, one per name, ratio 0.1, 0.2…"""
    for i, name in enumerate(names):
        write_yaml(tmp_path / "recipes" / f"{name}.yaml", tiny_recipe("smollm2-135m", ratio=0.1 * (i + 1)))
    jobs = [{"recipe": f"recipes/{name}.yaml"} for name in names]
    return write_yaml(tmp_path / "batch.yaml", {"output": str(tmp_path / "out"), "retries": retries, "jobs": jobs})


def by_name(outcome) -> dict:
    return {result.name: result for result in outcome.results}


# ------------------------------------------------------------------------------ expansion
def test_grid_expands_models_passes_and_ratios_into_named_jobs(tmp_path):
    write_yaml(tmp_path / "recipes" / "base.yaml", tiny_recipe("smollm2-135m", name="base"))
    path = write_yaml(tmp_path / "sweeps" / "grid.yaml", {
        "output": str(tmp_path / "out"),
        "resources": {"cpus": 2, "memory": "1GiB"},
        "jobs": [{"recipe": "../recipes/base.yaml"}, {"recipe": "../recipes/base.yaml", "resources": {"gpus": 0.5}}],
        "grid": {
            "base": "../recipes/base.yaml",
            "models": ["smollm2-135m", "/data/Tiny Model.gguf"],
            "passes": ["wanda_sp", ["flap", "lora_recover"]],
            "ratios": [0.2, 0.5],
            "overrides": {"evaluate": {"max_windows": 3}},
            "resources": {"gpus": 1},
        },
    })
    batch = load_batch(path)
    names = [job.name for job in batch.jobs]
    assert names == [
        "base", "base-2",
        "smollm2-135m-wanda_sp-r0.2", "smollm2-135m-wanda_sp-r0.5",
        "smollm2-135m-flap+lora_recover-r0.2", "smollm2-135m-flap+lora_recover-r0.5",
        "tiny-model-wanda_sp-r0.2", "tiny-model-wanda_sp-r0.5",
        "tiny-model-flap+lora_recover-r0.2", "tiny-model-flap+lora_recover-r0.5",
    ]
    grid_jobs = {job.name: job for job in batch.jobs[2:]}
    for name, job in grid_jobs.items():
        recipe = job.recipe
        assert recipe.name == name and job.output_dir == tmp_path / "out" / name
        assert recipe.model.source == ("smollm2-135m" if name.startswith("smollm2") else "/data/Tiny Model.gguf")
        ratio = float(name.rsplit("-r", 1)[1])
        expected = ["wanda_sp"] if "wanda_sp" in name else ["flap", "lora_recover"]
        assert [entry.name for entry in recipe.passes] == expected
        assert recipe.passes[0].options.ratio == ratio  # lora_recover has no ratio: left as it was
        assert recipe.evaluate.max_windows == 3  # grid override
        assert recipe.calibration.samples == 4 and recipe.validate.reload_max_abs_diff == 1e-3  # from the base
        assert (job.resources.cpus, job.resources.gpus, job.resources.memory) == (2, 1, 2**30)
    assert batch.jobs[0].recipe.evaluate.max_windows == 2 and batch.jobs[0].resources.gpus == 0
    assert batch.jobs[1].resources.gpus == 0.5
    assert (batch.executor, batch.workers, batch.retries) == ("local", 1, 1)
    assert load_batch(path).jobs == batch.jobs  # deterministic


def test_job_overrides_merge_names_default_to_the_recipe_and_a_grid_may_vary_ratios_only(tmp_path):
    write_yaml(tmp_path / "a.yaml", tiny_recipe("smollm2-135m", name="Flap Run!"))
    path = write_yaml(tmp_path / "batch.yaml", {
        "jobs": [
            {"recipe": "a.yaml"},
            {"recipe": "a.yaml", "name": "short", "overrides": {"evaluate": {"max_windows": 1}, "dtype": "bfloat16",
                                                                "passes": [{"wanda_sp": {"ratio": 0.4}}]}},
        ],
        "grid": {"base": "a.yaml", "ratios": [0.25, 0.75]},
    })
    batch = load_batch(path)
    assert [job.name for job in batch.jobs] == ["flap-run", "short", "smollm2-135m-magnitude_sp-r0.25",
                                                "smollm2-135m-magnitude_sp-r0.75"]
    assert batch.output_root == Path("outputs") / "batch"
    short = batch.jobs[1].recipe
    assert short.evaluate.max_windows == 1 and short.evaluate.seqlen == 16  # mappings merge
    assert [(e.name, e.options.ratio) for e in short.passes] == [("wanda_sp", 0.4)]  # lists replace
    assert short.model.dtype == "bfloat16"  # the top-level dtype reaches a model that names none
    assert short.export.output == str(Path("outputs") / "batch" / "short")
    assert [job.recipe.passes[0].options.ratio for job in batch.jobs[2:]] == [0.25, 0.75]
    assert batch.jobs[0].recipe.passes[0].options.ratio == pytest.approx(0.3)


def test_bad_batch_files_name_the_field(tmp_path):
    write_yaml(tmp_path / "a.yaml", tiny_recipe("smollm2-135m"))

    def problems(data) -> str:
        with pytest.raises(RecipeError) as caught:
            load_batch(write_yaml(tmp_path / "bad.yaml", data))
        return str(caught.value)

    message = problems({"executor": "slurm", "workers": 0, "colour": "red", "jobs": [{"recipe": "a.yaml", "name": "a b"}],
                        "grid": {"base": "a.yaml", "ratios": [0.2, 1.5]}})
    assert "jobs[0].name: must be a folder-safe name" in message
    assert "bad.yaml: executor: must be one of: local, ray (got 'slurm')" in message
    assert "bad.yaml: workers: must be >= 1 (got 0)" in message
    assert "bad.yaml: colour: unknown field" in message
    assert "bad.yaml: grid.ratios[1]: must be < 1 (got 1.5)" in message
    message = problems({"jobs": [{"recipe": "missing.yaml"}, {"recipe": "a.yaml", "overrides": {"export": {"output": "o"}}},
                                 {"recipe": "a.yaml", "overrides": {"name": "x"}}],
                        "grid": {"base": "a.yaml", "passes": ["flpa", ["wanda_sp", {"flap": {"ratio": 2}}], []]}})
    assert "jobs[0].recipe: recipe file not found:" in message and "missing.yaml" in message
    assert "jobs[1].overrides.export.output: set by the batch" in message
    assert "jobs[2].overrides.name: set by the batch" in message
    assert "grid.passes[0]: unknown pass 'flpa' (did you mean 'flap'?)" in message
    assert "grid.passes[1][1].flap.ratio: must be > 0 and < 1 (got 2)" in message
    assert "grid.passes[2]: an empty pass list" in message
    message = problems({"jobs": [{"recipe": "a.yaml", "name": "x", "overrides": {"evaluate": {"max_windows": 0}}},
                                 {"recipe": "a.yaml", "name": "x"}]})
    assert "jobs[0]: job x (jobs[0] a.yaml): evaluate.max_windows: must be > 0 (got 0)" in message
    assert "jobs[1].name: job name 'x' is already used by jobs[0] a.yaml" in message
    assert "grid.passes[0]: none of these passes has a ratio option" in problems(
        {"grid": {"base": "a.yaml", "passes": ["lora_recover"], "ratios": [0.5]}})
    assert "needs jobs: (a list of recipes) or grid:" in problems({"output": "x"})
    assert "a batch file is a YAML mapping (this one is empty)" in problems("")

    result = runner.invoke(app, ["batch", str(tmp_path / "bad.yaml")], env=WIDE)
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    assert "is a YAML mapping" in result.output
    result = runner.invoke(app, ["batch", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "batch file not found" in result.output


def test_shipped_batch_file_dry_runs_without_running(monkeypatch, tmp_path):
    def no_run(*args, **kwargs):
        raise AssertionError("a dry run must not run jobs")

    monkeypatch.setattr(batch_module, "run_batch", no_run)
    monkeypatch.chdir(tmp_path)  # the output root is relative: nothing may appear under it
    result = runner.invoke(app, ["batch", str(SHIPPED_BATCH), "--dry-run", "--workers", "2"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "4 jobs (local, 2 workers, retries 1)" in result.output
    for name in ("smollm2-135m-magnitude_sp-r0.2", "smollm2-135m-magnitude_sp-r0.5", "smollm2-135m-wanda_sp-r0.2",
                 "smollm2-135m-wanda_sp-r0.5"):
        assert name in result.output
    assert "magnitude_sp(ratio=0.5)" in result.output
    assert not (tmp_path / "outputs").exists()
    jobs = load_batch(SHIPPED_BATCH).jobs
    assert all(job.recipe.model.source == "smollm2-135m" and job.recipe.validate.max_ppl_ratio is None for job in jobs)


# ------------------------------------------------------------------------------ running (in process)
def test_finished_jobs_are_skipped_and_changed_or_failed_ones_rerun(tmp_path, plan):
    path = fake_batch(tmp_path, ["a", "b", "c"])
    first = run_batch(load_batch(path), progress=False, executor=InlineExecutor(), job_function=fake_job)
    assert [r.status for r in first.results] == [PASSED, PASSED, PASSED]

    executor = InlineExecutor()
    second = run_batch(load_batch(path), progress=False, executor=executor, job_function=fake_job)
    assert executor.submitted == []
    assert [(r.status, r.attempts, r.seconds) for r in second.results] == [(SKIPPED, 0, 0.0)] * 3
    assert [r.figures for r in second.results] == [r.figures for r in first.results]  # read back from report.json
    assert by_name(second)["b"].figures["params.pruning_ratio"] == pytest.approx(0.2)

    report_b = tmp_path / "out" / "b" / "report.json"
    report_b.write_text(report_b.read_text().replace('"passed": true', '"passed": false'))  # an earlier failed gate
    write_yaml(tmp_path / "recipes" / "c.yaml", tiny_recipe("smollm2-135m", ratio=0.35))  # the recipe changed
    executor = InlineExecutor()
    third = run_batch(load_batch(path), progress=False, executor=executor, job_function=fake_job)
    assert executor.submitted == ["b", "c"]
    assert [r.status for r in third.results] == [SKIPPED, PASSED, PASSED]
    assert by_name(third)["c"].figures["params.pruning_ratio"] == pytest.approx(0.35)


def test_a_job_that_raises_is_retried_once_and_failures_do_not_stop_the_others(tmp_path, plan):
    plan.update({"flaky": ["error"], "broken": ["error", "error", "error"], "strict": ["gate"]})
    path = fake_batch(tmp_path, ["flaky", "broken", "strict", "fine"])
    executor = InlineExecutor()
    outcome = run_batch(load_batch(path), progress=False, executor=executor, job_function=fake_job)
    results = by_name(outcome)
    assert executor.submitted.count("flaky") == 2 and executor.submitted.count("broken") == 2
    assert executor.submitted.count("strict") == 1  # a failed gate is not retried
    assert (results["flaky"].status, results["flaky"].attempts) == (PASSED, 2)
    assert (results["broken"].status, results["broken"].attempts) == (FAILED, 2)
    assert results["broken"].error == "RuntimeError: broken broke" and results["broken"].seconds == 1.0
    assert (results["strict"].status, results["strict"].failures) == (GATE_FAILED, ["ppl_ratio = 1.25 (must be <= 1.1)"])
    assert results["fine"].status == PASSED and not outcome.ok

    plan.update({"broken": ["error", "error", "error"]})
    rerun = run_batch(load_batch(fake_batch(tmp_path, ["broken"], retries=2)), progress=False,
                      executor=InlineExecutor(), job_function=fake_job)
    assert (rerun.results[0].status, rerun.results[0].attempts) == (FAILED, 3)
    plan.update({"broken": ["error", "error"]})
    once = run_batch(load_batch(fake_batch(tmp_path, ["broken"], retries=0)), progress=False,
                     executor=InlineExecutor(), job_function=fake_job)
    assert (once.results[0].status, once.results[0].attempts) == (FAILED, 1)


def test_results_json_csv_and_markdown_hold_one_row_per_job(tmp_path, plan):
    plan.update({"broken": ["error", "error"], "strict": ["gate"]})
    outcome = run_batch(load_batch(fake_batch(tmp_path, ["fine", "broken", "strict"])), progress=False,
                        executor=InlineExecutor(), job_function=fake_job)
    out = tmp_path / "out"
    assert outcome.files == [out / "results.json", out / "results.csv", out / "results.md"]

    saved = json.loads((out / "results.json").read_text())
    assert saved["counts"] == {"passed": 1, "skipped": 0, "gate_failed": 1, "failed": 1}
    assert [job["name"] for job in saved["jobs"]] == ["fine", "broken", "strict"]
    assert saved["jobs"][1]["traceback"] == "Traceback ..." and saved["jobs"][1]["error"] == "RuntimeError: broken broke"
    assert saved["jobs"][0]["figures"] == {"params.dense.total": 1000, "params.pruning_ratio": pytest.approx(0.1),
                                           "eval.persuasion.ppl_ratio": 1.25, "eval.top1_agreement": 0.75}

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert list(rows[0]) == ["name", "status", "attempts", "seconds", "output", "params.dense.total",
                             "params.pruning_ratio", "eval.persuasion.ppl_ratio", "eval.top1_agreement", "note"]
    assert [(r["name"], r["status"], r["attempts"]) for r in rows] == [("fine", "passed", "1"), ("broken", "failed", "2"),
                                                                       ("strict", "gate_failed", "1")]
    assert rows[0]["output"] == str(out / "fine") and rows[1]["params.dense.total"] == ""
    assert rows[2]["note"] == "ppl_ratio = 1.25 (must be <= 1.1)"

    markdown = (out / "results.md").read_text()
    assert "3 jobs: 1 passed, 1 gate_failed, 1 failed." in markdown
    assert "| name | status | attempts | seconds | output | params.dense.total |" in markdown
    assert "| fine | passed | 1 | 0.250 |" in markdown and "| 1.250 | 0.750 |" in markdown
    assert "| broken | failed | 2 | 1.000 |" in markdown and "RuntimeError: broken broke |" in markdown


def test_headline_figures_flatten_params_and_evaluation_results_only():
    report = {
        "params": {"dense": {"total": 10, "encoder_linear": 8}, "pruning_ratio": 0.5, "target_ratio": None},
        "evaluation": {"seqlen": 128, "max_windows": 256, "items": 100, "dense": True,
                       "datasets": {"sts": {"mean_cosine": 0.9, "spearman": 0.8, "worst": float("nan")}},
                       "mean_cosine": 0.9},
        "validation": {"passed": True, "gates": [{"value": 1.0}]},
    }
    assert headline_figures(report) == {"params.dense.total": 10, "params.dense.encoder_linear": 8,
                                        "params.pruning_ratio": 0.5, "eval.sts.mean_cosine": 0.9,
                                        "eval.sts.spearman": 0.8, "eval.mean_cosine": 0.9}


def test_cli_exits_3_when_a_job_failed_and_0_when_all_passed_or_skipped(tmp_path, monkeypatch, plan):
    def inline_run_batch(batch, progress=True):
        return run_batch(batch, progress=progress, executor=InlineExecutor(), job_function=fake_job)

    monkeypatch.setattr(batch_module, "run_batch", inline_run_batch)
    plan.update({"strict": ["gate"], "broken": ["error", "error"]})
    path = fake_batch(tmp_path, ["fine", "strict", "broken"])
    result = runner.invoke(app, ["batch", str(path)], env=WIDE)
    assert result.exit_code == 3, result.output
    assert "[1/3] passed fine" in result.output and "retrying broken after attempt 1" in result.output
    assert "error: strict: gate_failed: ppl_ratio = 1.25 (must be <= 1.1)" in result.output
    assert "error: broken: failed: RuntimeError: broken broke" in result.output
    assert f"results: {tmp_path / 'out' / 'results.md'}" in result.output

    result = runner.invoke(app, ["batch", str(path), "--quiet"], env=WIDE)  # fine is skipped, the others pass now
    assert result.exit_code == 0, result.output
    assert "passed" not in result.output and "results:" in result.output
    assert [r["status"] for r in json.loads((tmp_path / "out" / "results.json").read_text())["jobs"]] == [
        SKIPPED, PASSED, PASSED]


def test_ray_executor_without_ray_says_how_to_install_it(tmp_path, monkeypatch, plan):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(CompressError, match=r"executor: ray needs `pip install ray`"):
        RayExecutor().__enter__()
    result = runner.invoke(app, ["batch", str(fake_batch(tmp_path, ["a"])), "--executor", "ray"], env=WIDE)
    assert result.exit_code == 2 and "executor: ray needs `pip install ray`" in result.output
    assert "Traceback" not in result.output


class ThreadPool(ThreadPoolExecutor):
    """Stands in for the one-process pool LocalExecutor makes per attempt (same arguments, threads)."""

    made: list["ThreadPool"] = []

    def __init__(self, max_workers, mp_context=None, initializer=None, initargs=()):
        assert mp_context.get_start_method() == "spawn" and initargs[0] >= 1
        super().__init__(max_workers=max_workers)
        ThreadPool.made.append(self)


def test_local_executor_runs_at_most_workers_attempts_at_once_each_in_its_own_pool(tmp_path, plan, monkeypatch):
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", ThreadPool)
    monkeypatch.setattr(ThreadPool, "made", [])
    running = {"now": 0, "most": 0}
    lock = threading.Lock()

    def counting_job(task):
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        time.sleep(0.05)
        with lock:
            running["now"] -= 1
        return fake_job(task)

    plan.update({"j1": ["raise"]})
    batch = load_batch(fake_batch(tmp_path, [f"j{i}" for i in range(5)])).with_settings(workers=2)
    outcome = run_batch(batch, progress=False, executor=LocalExecutor(batch.workers), job_function=counting_job)
    assert [r.status for r in outcome.results] == [PASSED] * 5
    assert by_name(outcome)["j1"].attempts == 2  # the attempt whose worker raised was retried
    assert running["most"] == 2 and len(ThreadPool.made) == 6  # one pool per attempt


# ------------------------------------------------------------------------------ real executors, tiny models
def test_local_executor_runs_real_jobs_in_worker_processes(tmp_path, tiny_folder):
    """Two tiny recipes on two spawned workers: one passes, one has no model and fails without
    stopping it (retries and failed gates are covered in process above: each attempt here costs a
    fresh interpreter importing torch)."""
    write_yaml(tmp_path / "recipes" / "good.yaml", tiny_recipe(tiny_folder))
    write_yaml(tmp_path / "recipes" / "lost.yaml", tiny_recipe(tmp_path / "no-such-model"))
    path = write_yaml(tmp_path / "batch.yaml", {"output": str(tmp_path / "out"), "workers": 2, "retries": 0,
                                                "jobs": [{"recipe": "recipes/good.yaml"}, {"recipe": "recipes/lost.yaml"}]})
    result = runner.invoke(app, ["batch", str(path)], env=WIDE)
    assert result.exit_code == 3, result.output
    saved = {job["name"]: job for job in json.loads((tmp_path / "out" / "results.json").read_text())["jobs"]}
    assert (saved["good"]["status"], saved["good"]["attempts"]) == (PASSED, 1)
    assert (saved["lost"]["status"], saved["lost"]["attempts"]) == (FAILED, 1)
    assert "no-such-model" in saved["lost"]["error"] and "error: lost: failed:" in result.output
    figures = saved["good"]["figures"]
    assert 0.2 < figures["params.pruning_ratio"] < 0.4 and figures["eval.persuasion.pruned_ppl"] > 0
    assert (tmp_path / "out" / "good" / "report.json").is_file()
    good = next(job for job in load_batch(path).jobs if job.name == "good")
    assert finished_report(good) is not None  # a rerun would skip it: the saved recipe.yaml matches


@pytest.fixture(scope="module")
def ray_runtime():
    """One small local Ray runtime for the module: one CPU (so one worker process, started once and
    reused by every task), no dashboard, worker logs kept out of the test output."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_executor_runs_jobs_as_ray_tasks_and_reports_a_failing_one(tmp_path, tiny_folder, ray_runtime):
    """A tiny recipe passes and one with no model fails, each attempt a Ray task on the caller's
    runtime; both results come back (evaluation is off: the figures come from the parameter counts)."""
    write_yaml(tmp_path / "recipes" / "good.yaml", tiny_recipe(tiny_folder, evaluate=None))
    write_yaml(tmp_path / "recipes" / "lost.yaml", tiny_recipe(tmp_path / "no-such-model", evaluate=None))
    path = write_yaml(tmp_path / "batch.yaml", {
        "output": str(tmp_path / "out"), "executor": "ray", "retries": 0, "resources": {"cpus": 1},
        "jobs": [{"recipe": "recipes/good.yaml"}, {"recipe": "recipes/lost.yaml"}],
    })
    batch = load_batch(path)
    assert isinstance(batch_module.make_executor(batch), RayExecutor)
    outcome = run_batch(batch, progress=False)
    assert ray_runtime.is_initialized()  # Ray was started by the caller: the batch leaves it running
    assert [(r.name, r.status, r.attempts) for r in outcome.results] == [("good", PASSED, 1), ("lost", FAILED, 1)]
    good, lost = outcome.results
    assert (Path(good.output_dir) / "report.json").is_file()
    assert 0.2 < good.figures["params.pruning_ratio"] < 0.4
    assert "no-such-model" in lost.error and not outcome.ok
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["counts"] == {"passed": 1, "skipped": 0, "gate_failed": 0, "failed": 1}
