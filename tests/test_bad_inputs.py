"""Bad and hostile input, through the real CLI: every case exits 2 (input) or 3 (gate) with a
message that names the field or file, never a traceback, and never touches a file compress did not
write. Grouped by the numbered items of the robustness issue, plus the inputs they stand for:
corrupt or truncated files in every format compress reads (safetensors, GGUF, ONNX, plan.json,
export.json, recipes, batch files, text), unwritable outputs and interrupted runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from compress.cli import app
from compress.outputs import OUTPUT_MARKER, STAGING_MARKER
from tests.conftest import tiny_smol_folder

runner = CliRunner()
WIDE = {"COLUMNS": "250"}


# ----------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (shared; tests copy it before damaging it)."""
    return tiny_smol_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(("The quick brown fox jumps over the lazy dog, and then it rests. " * 200), encoding="utf-8")
    return path


def recipe_data(model, output, text, **overrides) -> dict:
    data = {
        "name": "tiny",
        "model": str(model),
        "device": "cpu",
        "calibration": {"source": str(text), "samples": 4, "seqlen": 16, "seed": 0, "batch_size": 4},
        "passes": [{"magnitude_sp": {"ratio": 0.25}}],
        "export": {"output": str(output)},
        "evaluate": False,
    }
    data.update(overrides)
    return data


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def invoke(*arguments: str):
    return runner.invoke(app, [str(a) for a in arguments], env=WIDE)


def assert_refused(result, *fragments: str, code: int = 2) -> None:
    """Exit ``code`` through the CLI's error path (no traceback), with every fragment in the message."""
    assert result.exit_code == code, (result.exit_code, result.output, repr(result.exception))
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    for fragment in fragments:
        assert fragment in text, (fragment, result.output)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) with a hash of its bytes."""
    root = Path(root)
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in Path(parent).iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def damaged_copy(source: Path, target: Path, file: str, damage) -> Path:
    """A copy of the model folder ``source`` with ``file`` replaced by ``damage(original bytes)``."""
    import shutil

    shutil.copytree(source, target)
    (target / file).write_bytes(damage((source / file).read_bytes()))
    return target


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any model weights are loaded (a refusal must come first)."""
    import compress.kinds.base
    import compress.kinds.decoder
    import compress.models.loading
    import compress.run.validate

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    # every module that binds ``load_model`` at import (imported first, so none binds the fake)
    for module in (compress.models.loading, compress.kinds.base, compress.kinds.decoder, compress.run.validate):
        monkeypatch.setattr(module, "load_model", refuse)


# ----------------------------------------------------------------------------------- 1. data loss
def test_run_refuses_an_existing_folder_it_did_not_write_and_leaves_it_byte_identical(
        tmp_path, tiny_folder, text_file, no_model_loads):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my notes\n")
    (user / "sub").mkdir()
    (user / "sub" / "data.bin").write_bytes(os.urandom(100))
    before = tree_digest(user)
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(tiny_folder, tmp_path / "unused", text_file))
    assert_refused(invoke("run", recipe, "-o", user, "-q"), "output folder", "mine", "compress did not write it",
                   "--overwrite")
    assert tree_digest(user) == before
    assert leftovers(tmp_path) == []


def test_run_never_replaces_a_file_or_a_link(tmp_path, tiny_folder, text_file, no_model_loads):
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(tiny_folder, tmp_path / "unused", text_file))
    target = tmp_path / "a-file"
    target.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert_refused(invoke("run", recipe, "-o", target, "-q", *extra), "a-file", "is a file")
    assert target.read_text() == "keep me"
    link = tmp_path / "a-link"
    (tmp_path / "real").mkdir()
    link.symlink_to(tmp_path / "real")
    assert_refused(invoke("run", recipe, "-o", link, "-q", "--overwrite"), "symbolic link")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", [".", "..", "home", "/"])
def test_run_refuses_the_working_directory_its_ancestors_home_and_root(
        tmp_path, tiny_folder, text_file, monkeypatch, no_model_loads, where):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    output = {"home": str(tmp_path / "home")}.get(where, where)
    recipe = write_yaml(work / "r.yaml", recipe_data(tiny_folder, "x", text_file))
    before = tree_digest(work)
    assert_refused(invoke("run", recipe, "-o", output, "-q", "--overwrite"), "refused because")
    assert tree_digest(work) == before


def test_a_compress_output_is_replaced_an_empty_folder_filled_and_overwrite_replaces(tmp_path, tiny_folder, text_file):
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(tiny_folder, tmp_path / "out", text_file))
    first = invoke("run", recipe, "-q")
    assert first.exit_code == 0, first.output
    marker = json.loads((tmp_path / "out" / OUTPUT_MARKER).read_text())
    assert marker["tool"] == "compress" and marker["kind"] == "run"
    (tmp_path / "out" / "stale.txt").write_text("from the first run")
    again = invoke("run", recipe, "-q")  # an output compress wrote is replaced without asking
    assert again.exit_code == 0, again.output
    assert not (tmp_path / "out" / "stale.txt").exists()
    (tmp_path / "empty").mkdir()
    assert invoke("run", recipe, "-o", tmp_path / "empty", "-q").exit_code == 0
    assert (tmp_path / "empty" / OUTPUT_MARKER).is_file()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "x.txt").write_text("x")
    assert invoke("run", recipe, "-o", tmp_path / "theirs", "-q", "--overwrite").exit_code == 0
    assert not (tmp_path / "theirs" / "x.txt").exists() and (tmp_path / "theirs" / "plan.json").is_file()
    assert leftovers(tmp_path) == []


def test_apply_refuses_a_folder_it_did_not_write(tmp_path, tiny_folder, text_file):
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(tiny_folder, tmp_path / "out", text_file))
    assert invoke("run", recipe, "-q").exit_code == 0
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    before = tree_digest(user)
    assert_refused(invoke("apply", tmp_path / "out" / "plan.json", "-m", tiny_folder, "-o", user, "--no-eval", "-q"),
                   "compress did not write it")
    assert tree_digest(user) == before


def test_plan_never_replaces_a_json_file_it_did_not_write(tmp_path, tiny_folder, text_file, no_model_loads):
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(tiny_folder, tmp_path / "out", text_file))
    theirs = tmp_path / "settings.json"
    theirs.write_text('{"mine": true}')
    assert_refused(invoke("plan", recipe, "-o", theirs, "-q"), "settings.json", "compress did not write it")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "plan.json").write_text("{}")
    assert_refused(invoke("plan", recipe, "-o", tmp_path / "folder", "-q"), "plan.json", "compress did not write it")
    assert theirs.read_text() == '{"mine": true}' and (tmp_path / "folder" / "plan.json").read_text() == "{}"
    assert_refused(invoke("plan", recipe, "-o", tmp_path / "folder" / "plan.json" / "x.json", "-q"), "is a file")


def test_plan_replaces_its_own_plan(tmp_path, tiny_folder, text_file):
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(tiny_folder, tmp_path / "out", text_file))
    assert invoke("plan", recipe, "-o", tmp_path / "p.json", "-q").exit_code == 0
    assert invoke("plan", recipe, "-o", tmp_path / "p.json", "-q").exit_code == 0
    assert json.loads((tmp_path / "p.json").read_text())["format"] == "compress.plan/1"


# ----------------------------------------------------------------------------------- 2. corrupt weights
def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _oversized_header(data: bytes) -> bytes:
    return struct.pack("<Q", 10**15) + data[8:]


def _bad_header_json(data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    return data[:8] + b"!" * length + data[8 + length:]


@pytest.mark.parametrize("damage", [_truncate, lambda d: os.urandom(4096), _oversized_header, _bad_header_json,
                                    lambda d: b""], ids=["truncated", "random", "oversized-header", "bad-header",
                                                         "empty"])
@pytest.mark.parametrize("command", ["run", "inspect", "eval", "apply"])
def test_damaged_safetensors_are_named_in_every_command(tmp_path, tiny_folder, text_file, damage, command):
    broken = damaged_copy(tiny_folder, tmp_path / "broken", "model.safetensors", damage)
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(broken, tmp_path / "out", text_file))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "compress.plan/1", "model": {}, "steps": []}))
    arguments = {"run": ["run", recipe, "-q"], "inspect": ["inspect", broken], "eval": ["eval", broken],
                 "apply": ["apply", plan, "-m", broken, "-o", tmp_path / "out", "-q"]}[command]
    assert_refused(invoke(*arguments), "model.safetensors", "not a valid safetensors file")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_a_damaged_config_is_named(tmp_path, tiny_folder, content):
    broken = damaged_copy(tiny_folder, tmp_path / "broken", "config.json", lambda d: content.encode())
    assert_refused(invoke("inspect", broken), "config.json")


def test_a_damaged_tokenizer_is_named(tmp_path, tiny_folder):
    broken = damaged_copy(tiny_folder, tmp_path / "broken", "tokenizer.json", lambda d: d[: len(d) // 3])
    assert_refused(invoke("inspect", broken), "tokenizer", "broken")


def _tiny_gguf(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("damage", [lambda d: d[:-1000], lambda d: os.urandom(2000), lambda d: b"GGUF" + os.urandom(64),
                                    lambda d: b""], ids=["truncated", "random", "bad-version", "empty"])
def test_damaged_gguf_files_are_named(tmp_path, text_file, damage):
    good = _tiny_gguf(tmp_path / "good.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(good.read_bytes()))
    assert_refused(invoke("inspect", bad), "bad.gguf", "GGUF")
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(bad, tmp_path / "out", text_file))
    assert_refused(invoke("run", recipe, "--dry-run"), "bad.gguf", "GGUF")
    assert_refused(invoke("run", recipe, "-q"), "bad.gguf", "GGUF")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", [lambda d: d[: len(d) // 2], lambda d: os.urandom(3000)], ids=["truncated", "random"])
def test_damaged_onnx_files_are_named(tmp_path, damage):
    import onnx

    from tests.test_spa import conv_model

    good = tmp_path / "good.onnx"
    onnx.save(conv_model(), str(good))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(damage(good.read_bytes()))
    assert_refused(invoke("inspect", bad), "bad.onnx", "not a readable ONNX model")
    recipe = write_yaml(tmp_path / "r.yaml", {"name": "x", "model": str(bad), "calibration": None, "evaluate": False,
                                              "passes": [{"spa": {"ratio": 0.5, "importance": "magnitude"}}],
                                              "export": {"output": str(tmp_path / "out")}})
    assert_refused(invoke("run", recipe, "-q"), "bad.onnx", "not a readable ONNX model")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------- 3. unwritable outputs
def test_an_output_under_a_file_or_in_an_unwritable_place_is_refused_before_work(
        tmp_path, tiny_folder, text_file, no_model_loads):
    (tmp_path / "a-file").write_text("x")
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(tiny_folder, tmp_path / "out", text_file))
    assert_refused(invoke("run", recipe, "-o", tmp_path / "a-file" / "out", "-q"), "a-file is a file")
    assert_refused(invoke("run", recipe, "-o", "/proc/compress-cannot-write/out", "-q"), "/proc cannot be written")
    assert_refused(invoke("plan", recipe, "-o", tmp_path / "a-file" / "plan.json", "-q"), "a-file", "is a file")
    assert_refused(invoke("plan", recipe, "-o", "/proc/compress-cannot-write/plan.json", "-q"), "compress-cannot-write")
    assert (tmp_path / "a-file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_refused(tmp_path, tiny_folder, text_file, no_model_loads):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        recipe = write_yaml(tmp_path / "r.yaml", recipe_data(tiny_folder, locked / "out", text_file))
        assert_refused(invoke("run", recipe, "-q"), "not writable")
    finally:
        locked.chmod(0o755)


def test_a_batch_output_root_that_is_a_file_or_foreign_folder_is_refused(tmp_path, tiny_folder, text_file):
    base = write_yaml(tmp_path / "base.yaml", recipe_data(tiny_folder, tmp_path / "unused", text_file))
    (tmp_path / "a-file").write_text("x")
    for root, message in ((tmp_path / "a-file", "is a file"), (tmp_path / "a-file" / "sub", "a-file is a file"),
                          ("/proc/compress-cannot-write", "cannot be written")):
        batch = write_yaml(tmp_path / "b.yaml", {"output": str(root), "jobs": [{"recipe": str(base)}]})
        assert_refused(invoke("batch", batch, "-q"), message)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.md").write_text("my results")
    batch = write_yaml(tmp_path / "b.yaml", {"output": str(theirs), "jobs": [{"recipe": str(base)}]})
    assert_refused(invoke("batch", batch, "-q"), "compress did not write it")
    assert (theirs / "results.md").read_text() == "my results"


# ----------------------------------------------------------------------------------- 4. interrupted runs
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_run_removes_what_a_killed_run_left_and_reports_the_rest(tmp_path, tiny_folder, text_file):
    dead = _dead_pid()
    stale = tmp_path / f".out.tmp-{dead}"
    stale.mkdir()
    (stale / STAGING_MARKER).write_text("{}")
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    old = tmp_path / f".other.old-{dead}"
    old.mkdir()
    (old / OUTPUT_MARKER).write_text("{}")
    unmarked = tmp_path / f".legacy.tmp-{dead}"
    unmarked.mkdir()
    (unmarked / "x").write_text("x")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".busy.tmp-{sleeper.pid}"
        live.mkdir()
        (live / STAGING_MARKER).write_text("{}")
        recipe = write_yaml(tmp_path / "r.yaml", recipe_data(tiny_folder, tmp_path / "out", text_file))
        result = invoke("run", recipe, "-q")
        assert result.exit_code == 0, result.output
        assert not stale.exists() and not old.exists()
        assert unmarked.exists() and live.exists()
        assert "left by an interrupted compress run" in result.output and ".legacy.tmp-" in result.output
    finally:
        sleeper.kill()
        sleeper.wait()


def test_ctrl_c_leaves_nothing_under_the_output_name(tmp_path, tiny_folder, text_file, monkeypatch):
    from passes.baselines.run import MagnitudeSpPass

    def interrupted(self, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(MagnitudeSpPass, "run", interrupted)
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(tiny_folder, tmp_path / "out", text_file))
    assert_refused(invoke("run", recipe, "-q"), "interrupted", code=130)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_killed_process_leaves_only_its_staging_folder_which_the_next_run_removes(tmp_path, tiny_folder, text_file):
    """SIGKILL a real `compress run` while it works: nothing appears under the output name."""
    data = recipe_data(tiny_folder, tmp_path / "out", text_file)
    data["passes"] = [{"wanda_sp": {"ratio": 0.25}}]
    data["calibration"].update(samples=64, seqlen=64)
    recipe = write_yaml(tmp_path / "r.yaml", data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "compress.cli", "run", str(recipe), "-q"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    staging = tmp_path / f".out.tmp-{child.pid}"
    while not staging.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert staging.exists(), "the run never created its staging folder"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "out").exists() and staging.exists()
    result = invoke("run", recipe, "-q")
    assert result.exit_code == 0, result.output
    assert not staging.exists() and (tmp_path / "out" / OUTPUT_MARKER).is_file()


# ----------------------------------------------------------------------------------- 5. more tracebacks
@pytest.mark.parametrize("field,value,fragment", [
    ("seed", 10**30, "seed: must be >= 0 and <= 4294967295"),
    ("seed", -1, "seed: must be >= 0"),
    ("calibration", {"seed": 2**64}, "calibration.seed"),
])
def test_out_of_range_seeds_are_recipe_errors(tmp_path, tiny_folder, text_file, field, value, fragment):
    data = recipe_data(tiny_folder, tmp_path / "out", text_file)
    data[field] = {**data[field], **value} if isinstance(value, dict) else value
    assert_refused(invoke("run", write_yaml(tmp_path / "r.yaml", data), "--dry-run"), fragment)


@pytest.mark.parametrize("text,fragment", [
    ("a: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ("a: " + "{x: " * 3000 + "1" + "}" * 3000, "nested too deeply"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n", "unknown field"),
    ("\x00\x01\x02", "invalid YAML"),
    ("", "empty"),
    ("- just\n- a list\n", "not a mapping"),
    ("name: x\nname: y\n", "duplicate key"),
])
def test_hostile_recipe_text_is_refused(tmp_path, text, fragment):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    assert_refused(invoke("run", path, "--dry-run"), "r.yaml", fragment)


def test_a_huge_recipe_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    import compress.recipe.loading as recipe_loading

    def never(*args, **kwargs):
        raise AssertionError("a 6 MB recipe was parsed")

    monkeypatch.setattr(recipe_loading, "parse_yaml", never)  # where load_recipe looks it up
    path = tmp_path / "big.yaml"
    path.write_text("name: x\nfoo: [" + ",".join(["1"] * 3_000_000) + "]\n", encoding="utf-8")
    assert_refused(invoke("run", path, "--dry-run"), "big.yaml", "too large for a recipe")


def test_binary_recipe_and_folder_recipe_are_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xff\xfe\x00name: x")
    assert_refused(invoke("run", path, "--dry-run"), "not UTF-8")
    assert_refused(invoke("run", tmp_path, "--dry-run"), "is a folder")


def _onnx_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    return folder


@pytest.mark.parametrize("spec,fragment", [
    ("{bad", "not a readable export spec"),
    ("[]", "not a JSON object"),
    ('{"format": "compress.onnx-decoder/1"}', "not a readable export spec"),
    ('{"format": "other/1"}', "not a readable export spec"),
    (json.dumps({"format": "compress.onnx-decoder/1", "num_layers": 2, "kv_heads": [1], "head_dim": 8,
                 "vocab_size": 10, "dtype": "float32", "opset": 18}), "kv_heads must list 2"),
    (json.dumps({"format": "compress.onnx-decoder/1", "num_layers": 1, "kv_heads": [1], "head_dim": 8,
                 "vocab_size": 10, "dtype": "int4", "opset": 18}), "dtype must be"),
])
def test_generate_on_a_malformed_export_json(tmp_path, spec, fragment):
    from exporters.onnx import SPEC_FORMAT

    folder = _onnx_folder(tmp_path)
    (folder / "export.json").write_text(spec.replace("compress.onnx-decoder/1", SPEC_FORMAT))
    assert_refused(invoke("generate", "--onnx", folder, "hi"), "export.json", fragment)


def test_generate_on_a_damaged_graph_or_a_missing_file(tmp_path):
    from exporters.onnx import SPEC_FORMAT

    folder = _onnx_folder(tmp_path)
    (folder / "export.json").write_text(json.dumps({
        "format": SPEC_FORMAT, "num_layers": 1, "kv_heads": [1], "head_dim": 8, "vocab_size": 10, "dtype": "float32",
        "opset": 18}))
    (folder / "model.onnx").write_bytes(os.urandom(500))
    assert_refused(invoke("generate", "--onnx", folder, "hi"), "model.onnx", "cannot load")
    (folder / "model.onnx").unlink()
    assert_refused(invoke("generate", "--onnx", folder, "hi"), "model.onnx is missing")


@pytest.mark.parametrize("command", ["plan", "run"])
def test_passes_that_do_not_fit_the_model_kind_are_refused_before_loading(
        tmp_path, tiny_folder, text_file, command, no_model_loads):
    for passes, fragment in (([{"spa": {"ratio": 0.2}}], "'spa' works on ONNX graphs"),
                             ([{"token_prune": {"keep_ratio": 0.5}}], "'token_prune' works on encoders"),
                             ([{"heads": {"ratio": 0.25}}], "'heads' works on encoders"),
                             ([{"moe_experts": {"keep": 4}}], "mixture-of-experts decoders")):
        data = recipe_data(tiny_folder, tmp_path / "out", text_file, passes=passes)
        recipe = write_yaml(tmp_path / "r.yaml", data)
        arguments = ["plan", recipe, "-o", tmp_path / "p.json"] if command == "plan" else ["run", recipe]
        assert_refused(invoke(*arguments, "-q"), "passes[0]", fragment, "is a decoder (llama)")
        assert_refused(invoke("run", recipe, "--dry-run"), "passes[0]", fragment)


# ----------------------------------------------------------------------------------- 6. security
def test_trust_remote_code_accepts_only_booleans(tmp_path):
    for value in ("yes", "true", 1, "on"):
        recipe = write_yaml(tmp_path / "r.yaml", {"name": "x", "model": {"source": "smollm2-135m",
                                                                          "trust_remote_code": value}})
        assert_refused(invoke("run", recipe, "--dry-run"), "model.trust_remote_code: must be true or false")


def test_tokenizers_are_loaded_offline_only(tmp_path, monkeypatch):
    import transformers

    from compress.onnx_runtime import load_tokenizer

    seen = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(Exception, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    assert seen.get("local_files_only") is True
    source = Path(__file__).resolve().parents[1] / "passes" / "spa" / "prune.py"
    assert "AutoTokenizer.from_pretrained(str(folder), local_files_only=True)" in source.read_text()


def test_inspect_help_says_a_factory_runs_code():
    result = invoke("inspect", "--help")
    assert result.exit_code == 0
    assert "runs code" in " ".join(result.output.split()) or "RUNS that Python module" in " ".join(result.output.split())


# ----------------------------------------------------------------------------------- 7. bad input accepted
@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "..", "x\ny", "a\\b", " ", "x" * 201])
def test_a_run_name_is_one_plain_folder_name(tmp_path, name):
    recipe = write_yaml(tmp_path / "r.yaml", {"name": name, "model": "smollm2-135m"})
    assert_refused(invoke("run", recipe, "--dry-run"), "name: must be a plain name")


def test_the_default_name_of_an_oddly_named_recipe_file_is_made_plain(tmp_path):
    from compress.recipe import load_recipe

    path = tmp_path / "..my recipe\t(v2).yaml"
    write_yaml(path, {"model": "smollm2-135m"})
    assert load_recipe(path).name == "my recipe-(v2)"


@pytest.mark.parametrize("section,field,value", [
    ("validate", "onnx_atol", ".inf"), ("validate", "max_ppl_ratio", ".nan"), ("validate", "onnx_rtol", "-.inf"),
])
def test_infinite_or_nan_thresholds_are_refused(tmp_path, section, field, value):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: x\nmodel: smollm2-135m\n{section}:\n  {field}: {value}\n", encoding="utf-8")
    assert_refused(invoke("run", path, "--dry-run"), f"{section}.{field}", "finite number")


def test_nan_pass_options_are_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel: smollm2-135m\npasses:\n  - flap: {ratio: 0.5, ls_damp: .nan}\n", encoding="utf-8")
    assert_refused(invoke("run", path, "--dry-run"), "passes[0].flap.ls_damp", "finite number")


def _plan(tmp_path: Path, steps: list, model: dict | None = None) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": "compress.plan/1", "model": model or {}, "steps": steps}))
    return path


@pytest.mark.parametrize("steps,fragment", [
    ([{"pass_name": "flpa", "options": {}, "layers": []}], "unknown pass 'flpa' (did you mean 'flap'?)"),
    ([{"pass_name": "flap", "options": {}, "layers": [{"index": 1, "keep_kv_heads": []}]}],
     "keep_kv_heads is given without keep_heads"),
    ([{"pass_name": "flap", "options": {}, "layers": [{"index": 1, "keep_heads": [], "keep_kv_heads": []}]}],
     "keeps nothing"),
    ([{"pass_name": "flap", "options": {}, "layers": [{"index": 99, "keep_channels": [0]}]}], "names layer 99"),
    ([{"pass_name": "flap", "options": {}, "layers": [{"index": 1, "keep_channels": [5, 2]}]}], "sorted unique"),
    ([{"pass_name": "flap", "options": {}, "layers": [{"index": "1"}]}], "\"index\" must be a whole number"),
    ([{"pass_name": "flap", "options": {}, "layers": [{"index": 1, "keep_heads": [0.5]}]}], "list of whole numbers"),
    ([{"pass_name": "flap", "options": {}, "layers": [{"index": 1, "o_proj_bias": ["x"]}]}], "finite numbers"),
    ([{"pass_name": "flap", "options": {}, "layers": [{"index": 1, "surprise": 1}]}], "unknown layer field"),
    ([{"pass_name": "flap", "options": [], "layers": []}], "must be mappings"),
    ([{"pass_name": 3, "layers": []}], "pass_name"),
    (["step"], "must be a mapping"),
    ([{"pass_name": "lora_recover", "options": {}, "layers": [], "artifacts": {"lora": "0-lora.safetensors"}}],
     "0-lora.safetensors beside the plan"),
    ([{"pass_name": "lora_recover", "options": {}, "layers": [], "artifacts": {"lora": "../x.safetensors"}}],
     "plain file name"),
])
def test_apply_refuses_malformed_plans_naming_the_plan_file(tmp_path, tiny_folder, steps, fragment):
    plan = _plan(tmp_path, steps)
    assert_refused(invoke("apply", plan, "-m", tiny_folder, "-o", tmp_path / "out", "--no-eval", "-q"),
                   "plan.json", fragment)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("content,fragment", [
    ("{", "not a readable JSON plan"), ("[]", "not a compress plan"), ('{"format": "x"}', "not a compress plan"),
    ("\xff", "not a readable JSON plan"),
])
def test_apply_refuses_unreadable_plan_files(tmp_path, tiny_folder, content, fragment):
    plan = tmp_path / "plan.json"
    plan.write_bytes(content.encode("latin-1"))
    assert_refused(invoke("apply", plan, "-m", tiny_folder, "-o", tmp_path / "out", "-q"), "plan.json", fragment)


def test_a_damaged_plan_artifact_is_named(tmp_path, tiny_folder):
    plan = _plan(tmp_path, [{"pass_name": "lora_recover", "options": {}, "layers": [],
                             "artifacts": {"lora": "0-lora.safetensors"}}])
    (tmp_path / "0-lora.safetensors").write_bytes(os.urandom(64))
    assert_refused(invoke("apply", plan, "-m", tiny_folder, "-o", tmp_path / "out", "-q"), "cannot read 0-lora")


def test_dry_run_checks_the_model_path_without_loading(tmp_path, text_file, no_model_loads):
    for model, fragment in ((tmp_path / "missing", "not found"), (tmp_path / "missing.gguf", "not found"),
                            (tmp_path / "missing.onnx", "not found"), ("nobody/nothing-cached", "not in the local")):
        recipe = write_yaml(tmp_path / "r.yaml", recipe_data(model, tmp_path / "out", text_file))
        assert_refused(invoke("run", recipe, "--dry-run"), "model:", fragment)
    empty = tmp_path / "empty-model"
    empty.mkdir()
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(empty, tmp_path / "out", text_file))
    assert_refused(invoke("run", recipe, "--dry-run"), "holds no *.safetensors")


def test_dry_run_reports_the_kind_and_what_happens_to_the_output(tmp_path, tiny_folder, text_file, no_model_loads):
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(tiny_folder, tmp_path / "out", text_file))
    result = invoke("run", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "model is a decoder (llama)" in result.output and "new folder" in result.output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert_refused(invoke("run", recipe, "--dry-run"), "compress did not write it")


# ----------------------------------------------------------------------------------- 8. messages
def test_a_too_short_calibration_text_names_the_file_and_the_field(tmp_path, tiny_folder):
    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    data = recipe_data(tiny_folder, tmp_path / "out", short, passes=[{"wanda_sp": {"ratio": 0.25}}])
    recipe = write_yaml(tmp_path / "r.yaml", data)
    assert_refused(invoke("run", recipe, "-q"), "calibration", "short.txt", "too few")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_plan_for_another_model_names_the_plan_file(tmp_path, tiny_folder, text_file):
    plan = _plan(tmp_path, [], model={"num_layers": 7})
    assert_refused(invoke("apply", plan, "-m", tiny_folder, "-o", tmp_path / "out", "--no-eval", "-q"),
                   "plan.json", "7 layers", str(tiny_folder))


# ----------------------------------------------------------------------------------- other inputs
@pytest.mark.parametrize("content,fragment", [(b"\xff\xfe bad", "not valid UTF-8"), (b"", "empty"),
                                              (b"   \n\n", "empty")])
def test_unreadable_text_sources(tmp_path, tiny_folder, content, fragment):
    text = tmp_path / "t.txt"
    text.write_bytes(content)
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(tiny_folder, tmp_path / "out", text,
                                                         passes=[{"wanda_sp": {"ratio": 0.25}}]))
    assert_refused(invoke("run", recipe, "-q"), "t.txt", fragment)
    assert_refused(invoke("eval", tiny_folder, "-d", text), "t.txt", fragment)


def test_malformed_jsonl_text_names_the_line(tmp_path, tiny_folder):
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "fine"}\n{oops\n', encoding="utf-8")
    assert_refused(invoke("eval", tiny_folder, "-d", text), "t.jsonl", "line 2")


@pytest.mark.parametrize("content,fragment", [("jobs: [", "invalid YAML"), ("[]", "mapping"),
                                              ("jobs: []\nsurprise: 1\n", "surprise")])
def test_malformed_batch_files(tmp_path, content, fragment):
    batch = tmp_path / "b.yaml"
    batch.write_text(content, encoding="utf-8")
    assert_refused(invoke("batch", batch, "--dry-run"), "b.yaml", fragment)


def test_validate_refuses_folders_compress_did_not_write(tmp_path, tiny_folder):
    assert_refused(invoke("validate", tmp_path / "missing"), "no such recipe file or artifact folder")
    assert_refused(invoke("validate", tiny_folder), "not a compress artifact")
    import shutil

    fake = tmp_path / "fake"
    shutil.copytree(tiny_folder, fake)
    (fake / "report.json").write_text("{broken")
    assert_refused(invoke("validate", fake), "report.json", "not a readable report")


@pytest.mark.parametrize("value", ["lots", "-1GiB", "0", "1e99XB"])
def test_bad_memory_caps(tmp_path, tiny_folder, text_file, value):
    recipe = write_yaml(tmp_path / "r.yaml", recipe_data(tiny_folder, tmp_path / "out", text_file))
    result = invoke("run", recipe, "--max-memory", value, "--dry-run")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--max-memory" in result.output


def test_eval_and_inspect_of_missing_models(tmp_path):
    for command in ("eval", "inspect"):
        assert_refused(invoke(command, tmp_path / "nothing"), "not found")
        assert_refused(invoke(command, tmp_path / "weights.pt"), "not found")
    (tmp_path / "weights.pt").write_bytes(b"pickle")
    assert_refused(invoke("inspect", tmp_path / "weights.pt"), "pickled checkpoint")
