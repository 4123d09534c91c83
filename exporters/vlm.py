"""LLaVA-style VLMs with pruned image tokens: safetensors + a processor that emits k placeholders,
and the vision encoder (tower to the feature layer + rewrite + projector) as ONNX.

The safetensors folder is what ``save_pretrained`` writes for the ``pruned_llava`` classes
(config with ``token_pruning`` and ``image_seq_length`` = k, weights, and the three remote-code
files pruned_llava.py, pruned_encoder.py and token_pruning.py), so
``AutoModelForImageTextToText.from_pretrained(out)`` loads it (with ``trust_remote_code=True``
when compress is not installed).

The processor: transformers' `LlavaProcessor` writes (H/p)·(W/p) + num_additional_image_tokens
placeholders per image (minus one for the 'default' strategy), and the model refuses a prompt whose
count differs from its image features. The export sets ``num_additional_image_tokens`` so that the
stock processor writes exactly k (a negative number when tokens were removed); nothing else of the
processor changes.

ONNX (``onnx/vision_encoder.onnx``): pixel_values [batch, 3, S, S] (S = the tower's image size,
dynamic batch) -> image_features [batch, k, D_text] (what replaces the k placeholders) and
kept_positions [batch, k] int64 (tower token indices: 0 = CLS, patch p = p + 1).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError

VISION_ONNX = "vision_encoder.onnx"
VISION_INPUTS = ["pixel_values"]
VISION_OUTPUTS = ["image_features", "kept_positions"]


# ------------------------------------------------------------------------------------ processor
def stock_image_tokens(processor, image_size: int) -> int:
    """Placeholders per image that ``processor`` (a `LlavaProcessor`) writes for ``image_size``² images."""
    count = (image_size // processor.patch_size) ** 2 + int(processor.num_additional_image_tokens or 0)
    return count - 1 if processor.vision_feature_select_strategy == "default" else count


def match_processor(processor, model) -> dict:
    """Set ``processor``'s ``num_additional_image_tokens`` so it writes ``image_seq_length``
    placeholders per image; returns the settings that make it so."""
    config = model.config
    image_size = config.vision_config.image_size
    missing = [name for name in ("patch_size", "vision_feature_select_strategy") if getattr(processor, name, None) is None]
    if missing:
        raise CompressError(f"the LLaVA processor has no {', '.join(missing)}; set them in its processor_config.json "
                            "so the number of image placeholders can be matched to the pruned model")
    if processor.vision_feature_select_strategy != config.vision_feature_select_strategy:
        raise CompressError(f"the processor's vision_feature_select_strategy "
                            f"({processor.vision_feature_select_strategy}) differs from the model's "
                            f"({config.vision_feature_select_strategy})")
    wanted = int(config.image_seq_length)
    processor.num_additional_image_tokens = int(processor.num_additional_image_tokens or 0) + wanted - \
        stock_image_tokens(processor, image_size)
    return {"num_image_tokens": wanted, "num_additional_image_tokens": processor.num_additional_image_tokens,
            "patch_size": processor.patch_size, "image_size": image_size,
            "vision_feature_select_strategy": processor.vision_feature_select_strategy}


def export_llava_safetensors(model: nn.Module, processor, out_dir: Path) -> dict:
    """Write ``model`` (a LLaVA model, token-pruned or not) and its processor (or tokenizer; None for
    none) into ``out_dir``. Returns {"files": sorted names, "processor": the placeholder settings or None}.

    The weights are written from ``state_dict()`` under the module names (not through
    ``save_pretrained``, which turns a model loaded from an older checkpoint back into that
    checkpoint's key layout, a layout only the stock ``llava`` type knows how to convert)."""
    from compress.models import pruned_encoder, pruned_llava, token_pruning
    from exporters.safetensors import (
        _without_shared_storage,
        model_dtype,
        write_config,
        write_generation_config,
        write_remote_code,
        write_weights,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    files = []
    if config.model_type == pruned_llava.PrunedLlavaConfig.model_type:
        for module in (pruned_llava, pruned_encoder, token_pruning):
            files += write_remote_code(out_dir, module)
        config.auto_map = {"AutoConfig": "pruned_llava.PrunedLlavaConfig",
                           "AutoModelForImageTextToText": "pruned_llava.PrunedLlavaForConditionalGeneration"}
    config.architectures = [type(model).__name__]
    config.dtype = model_dtype(model)
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    files += write_weights(_without_shared_storage(state), out_dir)
    files += write_config(config, out_dir)
    files += write_generation_config(model, out_dir)
    settings = None
    if processor is not None:
        if hasattr(processor, "num_additional_image_tokens"):
            processor = copy.copy(processor)
            settings = match_processor(processor, model)
        saved = processor.save_pretrained(out_dir)
        files += [str(Path(path).relative_to(out_dir)) for path in (saved or []) if Path(path).is_file()]
    files = sorted(set(files) | {str(p.relative_to(out_dir)) for p in out_dir.iterdir() if p.is_file()})
    return {"files": files, "processor": settings}


# ------------------------------------------------------------------------------------ ONNX
class _VisionEncoder(nn.Module):
    """pixel_values -> (image_features, kept_positions): LLaVA's image path with the rewrite."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.llava = model.model

    def forward(self, pixel_values):
        from compress.models.pruned_llava import pruned_image_features

        config = self.llava.config
        return pruned_image_features(self.llava.vision_tower, self.llava.multi_modal_projector, pixel_values,
                                     config.token_pruning or {"stages": []}, config.vision_feature_layer,
                                     config.vision_feature_select_strategy)


def sample_pixels(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal pixel_values [batch, 3, S, S] at the tower's image size."""
    size = model.config.vision_config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def export_llava_vision_onnx(model: nn.Module, out_dir: Path, opset: int = 18) -> dict:
    """Trace the image path of ``model`` (a CPU float32 copy) into ``out_dir``/vision_encoder.onnx."""
    from exporters.encoder import trace_to_onnx

    traced = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    traced.config._attn_implementation = "sdpa"
    batch = torch.export.Dim("batch")
    out_dir = Path(out_dir)
    result = trace_to_onnx(_VisionEncoder(traced).eval(), (sample_pixels(traced),), VISION_INPUTS, VISION_OUTPUTS,
                           {"pixel_values": {0: batch}}, out_dir, opset)
    names = {"model.onnx": VISION_ONNX, "model.onnx.data": VISION_ONNX + ".data"}
    for old, new in names.items():
        if (out_dir / old).is_file():
            (out_dir / old).replace(out_dir / new)
    if "model.onnx.data" in result["files"]:
        raise CompressError("the vision encoder graph is larger than 2 GiB; external weights are not supported for it")
    result["files"] = [names[name] for name in result["files"]]
    return result


def llava_vision_parity(model: nn.Module, onnx_path: Path, pixel_values: torch.Tensor,
                        device: str | None = None) -> dict:
    """Kept index sets, then values, of the ONNX vision encoder against the PyTorch model.

    Returns {"kept_index_rows", "kept_index_mismatches", "max_abs_diff", "mean_abs_diff", "provider"};
    values are compared by kept position, on the inputs whose sets agree."""
    import numpy as np

    from exporters.encoder import kept_index_agreement, parity_session, real_tokens_by_position

    session = parity_session(onnx_path, device)
    onnx_features, onnx_positions = session.run(VISION_OUTPUTS, {"pixel_values": pixel_values.cpu().numpy()})
    wrapper = _VisionEncoder(model).eval()
    with torch.no_grad():
        features, positions = wrapper(pixel_values.to(next(model.parameters()).device))
    features, positions = features.float().cpu().numpy(), positions.cpu().numpy()
    if onnx_features.shape != features.shape:
        raise RuntimeError(f"ONNX image features {onnx_features.shape} != PyTorch {features.shape}")
    ones = np.ones(positions.shape, dtype=np.float32)
    agreement = kept_index_agreement(ones, positions, ones, onnx_positions)
    rows = agreement.pop("agreeing_rows")
    diff = np.abs(real_tokens_by_position(onnx_features, ones, onnx_positions, rows)
                  - real_tokens_by_position(features, ones, positions, rows))
    return {**agreement, "max_abs_diff": float(diff.max()) if diff.size else 0.0,
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0, "provider": session.get_providers()[0]}
