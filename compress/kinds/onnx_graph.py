"""ONNX graphs (``model: path/to/model.onnx``): passes that work on the graph itself (spa).

load (the graph with its weights) ► passes ► ``model.onnx`` + ``model.onnx.data`` + plan ►
validity (``onnx.checker`` and strict shape inference) ► ONNX Runtime runs the pruned graph on
the dense graph's synthetic inputs; the cosine of their first outputs and both latencies are
reported. There is no perplexity: the model may be anything.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from compress.errors import CompressError
from compress.gates import Gate
from compress.kinds.base import ModelKind, base_header
from compress.models.onnx_graph import WEIGHT_TYPES, OnnxPassContext, load_graph

SYNTHETIC_BATCH, SYNTHETIC_SEQ = 2, 16


def synthetic_feeds(session, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for any graph: symbolic axes get batch 2 / length 16 (a KV cache's past length 0);
    ``input_ids``-like int inputs get random ids below 100, masks ones, positions a range."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in session.get_inputs():
        is_past = "past" in value.name
        shape = []
        for k, dim in enumerate(value.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif k == 0:
                shape.append(SYNTHETIC_BATCH)
            else:
                shape.append(0 if is_past and k == 2 else SYNTHETIC_SEQ)
        kind = value.type
        if "int" in kind:
            dtype = np.int64 if "int64" in kind else np.int32
            if "mask" in value.name:
                array = np.ones(shape, dtype)
            elif "position" in value.name:
                array = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
            elif "type" in value.name:
                array = np.zeros(shape, dtype)
            else:
                array = rng.integers(0, 100, size=shape).astype(dtype)
        else:
            dtype = np.float16 if "float16" in kind else np.float32
            array = rng.normal(size=shape).astype(dtype)
        feeds[value.name] = array
    return feeds


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def float_params(model) -> int:
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type in WEIGHT_TYPES)


def _median_ms(session, feeds, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def check_source(model_source) -> Path:
    source = Path(model_source).expanduser()
    if not source.is_file():
        raise CompressError(f"model: {source}: ONNX file not found")
    return source


class OnnxGraphKind(ModelKind):
    name = "onnx"
    words = "ONNX graph"
    plan_format = "onnx"

    @classmethod
    def describe_gates(cls, v, export) -> list[str]:
        return ["onnx.checker and strict shape inference", "ONNX Runtime runs the pruned graph on the dense graph's "
                "inputs (output cosine reported)"]

    def __init__(self, state):
        super().__init__(state)
        self.path: Path | None = None
        self.dense_params = 0

    def load(self) -> None:
        s = self.state
        if s.recipe is not None and s.evaluate is not None:
            raise CompressError("evaluate: perplexity evaluation needs a Hugging Face model; for an ONNX model set "
                                "`evaluate: false` (the run compares the pruned graph's outputs with the dense graph's)")
        self.path = check_source(s.source)
        with s.stage("load"):
            s.model = load_graph(self.path, weights=True)
        self.dense_params = float_params(s.model)

    def pass_context(self) -> OnnxPassContext:
        return OnnxPassContext(model=self.state.model, source=self.path, progress=self.state.progress)

    def plan_header(self) -> dict:
        return {"source": str(self.path), "format": "onnx"}

    def step_details(self, step) -> dict:
        return {k: v for k, v in step.details.items() if k != "groups"}

    def replay(self, plan) -> None:
        from compress.registry import get_pass

        s = self.state
        s.ctx = self.pass_context()
        for step in plan.steps:
            cls = get_pass(step.pass_name).cls
            if not hasattr(cls, "replay"):
                raise CompressError(f"{s.plan_path}: the {step.pass_name!r} step cannot be replayed on an ONNX model")
            with s.stage(f"replay:{step.pass_name}"):
                cls.replay(s.ctx, step)
        s.model = s.ctx.model

    def report_header(self) -> dict:
        pruned = float_params(self.state.ctx.model if self.state.ctx is not None else self.state.model)
        return {**base_header(self.state), "format": "onnx",
                "params": {"dense": {"total": self.dense_params}, "pruned": {"total": pruned},
                           "pruning_ratio": 1.0 - pruned / max(1, self.dense_params),
                           "total_ratio": 1.0 - pruned / max(1, self.dense_params)}}

    def export(self) -> None:
        import onnx

        s = self.state
        graph = s.ctx.model if s.ctx is not None else s.model
        with s.stage("export"):
            onnx.save_model(graph, str(s.folder / "model.onnx"), save_as_external_data=True,
                            all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
            s.files += [f for f in ("model.onnx", "model.onnx.data") if (s.folder / f).is_file()]
            s.files += s.plan.save(s.folder / "plan.json")

    def reload_check(self) -> None:
        """Validity of the written graph, and ONNX Runtime running it on the dense graph's inputs."""
        import onnx

        s = self.state
        pruned_path = s.folder / "model.onnx"
        with s.stage("validate onnx"):
            try:
                onnx.checker.check_model(str(pruned_path))
                inferred = pruned_path.with_suffix(".inferred.onnx")
                onnx.shape_inference.infer_shapes_path(str(pruned_path), str(inferred), strict_mode=True)
                inferred.unlink(missing_ok=True)
                valid, problem = 1.0, ""
            except Exception as exc:  # the gate reports it
                valid, problem = 0.0, str(exc).splitlines()[0][:300]
            s.gate(Gate.check("onnx_graph_valid", valid, 1.0, ">=",
                              "onnx.checker and strict shape inference" + (f": {problem}" if problem else "")))
            dense_session, pruned_session = _session(self.path), _session(pruned_path)
            feeds = synthetic_feeds(dense_session)
            # resizable inputs (a KV cache, empty at past length 0) take the pruned graph's own shapes
            pruned_feeds = {name: feeds[name] if name in feeds and feeds[name].shape == value.shape else value
                            for name, value in synthetic_feeds(pruned_session).items()}
            dense_out = dense_session.run(None, feeds)[0].astype(np.float64).reshape(-1)
            try:
                pruned_out = pruned_session.run(None, pruned_feeds)[0].astype(np.float64).reshape(-1)
                runs = 1.0
            except Exception as exc:
                pruned_out, runs, problem = None, 0.0, str(exc).splitlines()[0][:300]
            s.gate(Gate.check("onnx_runtime_runs", runs, 1.0, ">=",
                              "ONNX Runtime runs the pruned graph on the dense graph's inputs"
                              + (f": {problem}" if not runs else "")))
            section = {"synthetic_inputs": {k: list(v.shape) for k, v in feeds.items()}}
            if pruned_out is not None and pruned_out.shape == dense_out.shape:
                denominator = np.linalg.norm(dense_out) * np.linalg.norm(pruned_out)
                section["output_cosine_to_dense"] = float(dense_out @ pruned_out / denominator) if denominator else 1.0
                section["dense_ms"] = _median_ms(dense_session, feeds)
                section["pruned_ms"] = _median_ms(pruned_session, pruned_feeds)
        s.report["onnx"] = {"validation": section}

    def plan_summary(self) -> dict:
        return {"steps": [{"pass": s.pass_name, "groups_pruned": s.details.get("groups_pruned")}
                          for s in self.state.plan.steps]}
