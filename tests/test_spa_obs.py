"""OBSPA (experimental): OBS saliency, least-squares compensation and the data-free Hessians of the
``spa`` pass, checked against brute-force least squares and on small graphs run in ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compress.models.onnx_graph.grouping import find_groups
from passes.spa.obs import damped, refit_kept_columns, unit_saliency
from tests.test_spa import conv_model, mlp_model, onnx_recipe, run, tiny_llama_export  # noqa: F401 (fixture)

RNG = np.random.default_rng(1)


def best_error(weight: torch.Tensor, hessian: torch.Tensor, removed: list[int]) -> float:
    """min over W' with W'[:, removed] = 0 of tr((W - W') H (W - W')ᵀ), by brute-force least squares."""
    kept = [c for c in range(weight.shape[1]) if c not in removed]
    root = torch.linalg.cholesky(hessian)  # H = L Lᵀ: the error is ‖(W - W') L‖²
    target = weight @ root  # [rows, C]
    solution = torch.linalg.lstsq(root[kept].T, target.T).solution.T  # W'[:, K] minimising ‖W'_K L_K - W L‖
    return float(((target - solution @ root[kept]) ** 2).sum())


def test_saliency_is_the_least_squares_error_and_the_refit_attains_it():
    x = torch.from_numpy(RNG.normal(size=(64, 6)) @ RNG.normal(size=(6, 6)))  # correlated channels
    hessian = damped(x.T @ x, 0.01)
    weight = torch.from_numpy(RNG.normal(size=(5, 6)))
    hinv = torch.linalg.inv(hessian)
    units = torch.tensor([[0, 1], [2, 3], [4, 5]])  # three units of two channels
    saliency = unit_saliency(weight, hinv, units)
    for u, channels in enumerate(units.tolist()):
        assert saliency[u].item() == pytest.approx(best_error(weight, hessian, channels), rel=1e-8)
        kept = torch.tensor([c for c in range(6) if c not in channels])
        refit = refit_kept_columns(weight, hessian, kept)
        delta = weight.clone()
        delta[:, kept] -= refit[:, kept]  # W - W', with W'[:, removed] = 0
        assert float(torch.einsum("ri,ij,rj->", delta, hessian, delta)) == pytest.approx(saliency[u].item(), rel=1e-8)


def test_identity_hessian_is_column_energy_and_leaves_kept_columns_alone():
    weight = torch.from_numpy(RNG.normal(size=(4, 5)))
    identity = torch.eye(5, dtype=torch.float64)
    units = torch.arange(5)[:, None]
    torch.testing.assert_close(unit_saliency(weight, torch.linalg.inv(identity), units), (weight ** 2).sum(0))
    kept = torch.tensor([0, 2, 4])
    torch.testing.assert_close(refit_kept_columns(weight, identity, kept)[:, kept], weight[:, kept])


def output_error(dense: onnx.ModelProto, pruned: onnx.ModelProto, count: int = 256) -> float:
    x = np.random.default_rng(7).normal(size=(count, 8)).astype(np.float32)
    return float(np.square(run(dense, {"x": x})[0] - run(pruned, {"x": x})[0]).mean())


@pytest.mark.parametrize("hessian", ["synthetic", "identity"])
def test_obs_pass_compensation_lowers_the_output_error(tmp_path, hessian):
    from compress.run import run_recipe

    dense = mlp_model(activation="Identity")  # linear: the synthetic Hessian is the real one
    errors, plans = {}, {}
    for compensation in ("none", "obs"):
        folder = tmp_path / compensation
        folder.mkdir()
        recipe = onnx_recipe(folder, dense, ratio=0.25, importance="obs", hessian=hessian,
                             compensation=compensation, damp=1e-6, samples=64, batch_size=16)
        result = run_recipe(recipe, progress=False)
        assert result.passed, result.failures
        errors[compensation] = output_error(dense, onnx.load(str(folder / "out" / "model.onnx")))
        plans[compensation] = json.loads((folder / "out" / "plan.json").read_text())["steps"][0]["details"]
    assert plans["obs"]["hessian"] == hessian and plans["obs"]["compensated_tensors"] == 1
    assert plans["none"]["compensated_tensors"] == 0
    assert plans["obs"]["groups"][0]["keep"] == plans["none"]["groups"][0]["keep"]
    if hessian == "identity":  # H = I: the refit is the identity map
        assert errors["obs"] == pytest.approx(errors["none"], rel=1e-5)
    else:  # x is standard normal, as the synthetic inputs: 12 kept channels span the 9-dim affine image
        assert errors["obs"] < 1e-3 * errors["none"], errors


def test_obs_prunes_a_cnn_with_synthetic_images(tmp_path):
    from compress.run import run_recipe

    result = run_recipe(onnx_recipe(tmp_path, conv_model(), importance="obs", samples=8, batch_size=4),
                        progress=False)
    assert result.passed, result.failures
    pruned = onnx.load(str(tmp_path / "out" / "model.onnx"))
    shapes = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    assert shapes["K2"] == (4, 4, 3, 3) and shapes["W"] == (4, 5)
    dense_w = numpy_helper.to_array(next(i for i in conv_model().graph.initializer if i.name == "W"))
    kept = json.loads((tmp_path / "out" / "plan.json").read_text())["steps"][0]["details"]["groups"]
    assert kept  # the fc layer's kept rows were refit, so they differ from the dense rows
    fc_group = next(g for g in kept if any(s["tensor"] == "W" for s in g["slices"]))
    assert not np.allclose(numpy_helper.to_array(next(i for i in pruned.graph.initializer if i.name == "W")),
                           dense_w[fc_group["keep"]])
    assert run(pruned, {"x": RNG.normal(size=(1, 3, 10, 10)).astype(np.float32)})[0].shape == (1, 5)


def test_calibration_text_on_a_graph_without_tokens_is_refused(tmp_path):
    from compress.errors import CompressError
    from compress.run import run_recipe

    with pytest.raises(CompressError, match="input_ids"):
        run_recipe(onnx_recipe(tmp_path, conv_model(), importance="obs", hessian="calibration"), progress=False)
    assert not (tmp_path / "out").exists()


def decoder_outputs(model: onnx.ModelProto, ids: np.ndarray, extra: list[str]) -> list[np.ndarray]:
    """[logits, *extra tensors] of an exported decoder run as one prefill with an empty cache."""
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in extra)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    b, t = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, t), np.int64),
             "position_ids": np.tile(np.arange(t, dtype=np.int64), (b, 1))}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            feeds[value.name] = np.zeros((b, value.shape[1], 0, value.shape[3]), np.float32)
    return session.run(["logits", *extra], feeds)


def test_obs_on_an_exported_decoder_refits_on_the_synthetic_tokens(tmp_path, tiny_llama_export):
    """On a random-weight decoder the heads are nearly independent, so the refit has little to
    recover out of sample; on the seeded synthetic tokens it was fit to, the first pruned
    consumer's output error must drop."""
    from compress.run import run_recipe
    from passes.spa.activations import consumer_inputs
    from compress.models.onnx_graph import OnnxPassContext
    from passes.spa.prune import SpaPass

    _, dense = tiny_llama_export
    options = dict(ratio=0.25, importance="obs", samples=16, seqlen=16, seed=5)
    ids = SpaPass(SpaPass.Options(**options)).synthetic_windows(OnnxPassContext(model=dense, source=tmp_path))
    assert ids.shape == (16, 16) and ids.max() < 128
    groups, _ = find_groups(dense)
    first = next(g for g in groups if g.prunable and len([s for s in g.slices if s.role == "producer"]) == 3)
    consumer = next(s.tensor for s in first.slices if s.role == "consumer")
    producer_node = next(n for n in dense.graph.node if n.op_type == "MatMul" and n.input[1] == consumer)
    assert consumer_inputs(dense, [first])[consumer].activation == producer_node.input[0]
    reference = decoder_outputs(dense, ids, [producer_node.output[0]])
    errors = {}
    for compensation in ("none", "obs"):
        folder = tmp_path / compensation
        folder.mkdir()
        result = run_recipe(onnx_recipe(folder, dense, compensation=compensation, **options), progress=False)
        assert result.passed, result.failures
        details = json.loads((folder / "out" / "plan.json").read_text())["steps"][0]["details"]
        assert details["hessian"] == "synthetic" and details["groups_pruned"] > 0
        logits, layer_out = decoder_outputs(onnx.load(str(folder / "out" / "model.onnx")), ids,
                                            [producer_node.output[0]])
        assert np.isfinite(logits).all()
        errors[compensation] = float(np.square(layer_out - reference[1]).mean())
    assert errors["obs"] < 0.8 * errors["none"], errors


def test_compress_apply_replays_an_onnx_plan_with_its_refit_consumers(tmp_path):
    from typer.testing import CliRunner

    from compress.cli import app
    from compress.run import run_recipe

    recipe = onnx_recipe(tmp_path, conv_model(), importance="obs", samples=8, batch_size=4)
    assert run_recipe(recipe, progress=False).passed
    out = tmp_path / "out"
    assert (out / "0-refit.safetensors").is_file()
    result = CliRunner().invoke(app, ["apply", str(out / "plan.json"), "--model", str(tmp_path / "model.onnx"),
                                      "-o", str(tmp_path / "replayed")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out / "model.onnx")).graph.initializer}
    replayed = {i.name: numpy_helper.to_array(i)
                for i in onnx.load(str(tmp_path / "replayed" / "model.onnx")).graph.initializer}
    assert original.keys() == replayed.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(replayed[name], value, err_msg=name)
    other = tmp_path / "other.onnx"
    onnx.save(mlp_model(), str(other))
    wrong = CliRunner().invoke(app, ["apply", str(out / "plan.json"), "--model", str(other),
                                     "-o", str(tmp_path / "wrong")], env={"COLUMNS": "200"})
    assert wrong.exit_code != 0 and "made for another graph" in wrong.output
    assert not (tmp_path / "wrong").exists()
    hf = CliRunner().invoke(app, ["apply", str(out / "plan.json"), "--model", "smollm2-135m",
                                  "-o", str(tmp_path / "hf")], env={"COLUMNS": "200"})
    assert hf.exit_code != 0 and "replays on an .onnx file" in hf.output
