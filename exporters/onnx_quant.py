"""Weight-only quantization of an exported ONNX decoder folder (MatMulNBits), for deployment.

    quantize_onnx(source, out_dir, options) -> OnnxExport

ONNX Runtime's own block quantizer (``onnxruntime.quantization.matmul_nbits_quantizer``) rewrites
every MatMul whose weight is a constant, the LM head included (the exporter writes the tied head
as a transposed initializer of its own), into ``MatMulNBits``: ``bits`` (4 or 8) per weight, one
scale per block of ``block_size`` input channels, symmetric or with a zero point. With
``embeddings`` and 4 bits the token embedding's ``Gather`` becomes ``GatherBlockQuantized`` too
(ONNX Runtime has no 8-bit form of it, so an int8 graph keeps the embedding in float).

Activations, the KV cache and every I/O name and shape stay as in the float graph, so the
quantized folder is a drop-in for ``compress generate``, onnxruntime-genai (its
``genai_config.json`` is copied) and the validator. ``export.json`` records the quantization.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from exporters.onnx import DATA_FILE, ONNX_FILE, SPEC_FILE, DecoderIOSpec, OnnxExport

__all__ = ["QuantOptions", "quantize_onnx", "untie_transposed_weights"]


@dataclass(frozen=True)
class QuantOptions:
    """bits: 4 or 8. block_size: input channels per scale (a power of two, ≥ 16). symmetric: no
    zero point. embeddings: also quantize the token embedding (4 bits only)."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    embeddings: bool = True

    @property
    def name(self) -> str:
        return f"int{self.bits}"


def quantize_onnx(source: Path, out_dir: Path, options: QuantOptions = QuantOptions()) -> OnnxExport:
    """Quantize the float decoder in ``source`` into ``out_dir`` (graph, weights, export.json, and
    every other file of ``source`` copied: genai_config.json, the tokenizer). The caller owns
    atomicity of ``out_dir``."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    source, out_dir = Path(source), Path(out_dir)
    spec = DecoderIOSpec.load(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    op_types = ("MatMul", "Gather") if options.embeddings and options.bits == 4 else ("MatMul",)
    axes = (("MatMul", 0), ("Gather", 1))
    config = DefaultWeightOnlyQuantConfig(block_size=options.block_size, is_symmetric=options.symmetric,
                                          bits=options.bits, op_types_to_quantize=op_types, quant_axes=axes)
    proto = onnx.load(str(source / ONNX_FILE))
    untie_transposed_weights(proto)
    quantizer = MatMulNBitsQuantizer(proto, bits=options.bits,
                                     block_size=options.block_size, is_symmetric=options.symmetric,
                                     algo_config=config, op_types_to_quantize=op_types, quant_axes=axes)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs one INFO line per node
    try:
        quantizer.process()
    finally:
        logger.setLevel(level)
    proto = quantizer.model.model
    del quantizer
    spec.opset = {entry.domain: entry.version for entry in proto.opset_import}.get("", spec.opset)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".quant-") as scratch:
        onnx.save_model(proto, str(Path(scratch) / ONNX_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        for name in (ONNX_FILE, DATA_FILE):
            os.replace(Path(scratch) / name, out_dir / name)
    nodes = len(proto.graph.node)
    del proto
    (out_dir / DATA_FILE).chmod((out_dir / ONNX_FILE).stat().st_mode & 0o777)
    spec.quantization = {"method": "MatMulNBits (onnxruntime weight-only)", **asdict(options)}
    spec.save(out_dir / SPEC_FILE)
    copied = sorted(p.name for p in source.iterdir() if p.is_file() and p.name not in (ONNX_FILE, DATA_FILE, SPEC_FILE))
    for name in copied:
        shutil.copy2(source / name, out_dir / name)
    size = sum((out_dir / f).stat().st_size for f in (ONNX_FILE, DATA_FILE))
    return OnnxExport(folder=out_dir, files=[ONNX_FILE, DATA_FILE, SPEC_FILE] + copied, spec=spec, nodes=nodes, bytes=size)


def untie_transposed_weights(proto) -> int:
    """Give every ``MatMul(x, Transpose(W))`` with an initializer ``W`` [N, K] an initializer of its
    own, ``W`` transposed [K, N], so the quantizer sees a constant weight. The tied LM head is
    exported this way (the exporter folds the transpose only for small tensors); the embedding's
    ``Gather`` keeps ``W``. Returns how many MatMuls were rewired; dead Transposes are removed."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in proto.graph.initializer}
    transposes = {node.output[0]: node for node in proto.graph.node if node.op_type == "Transpose"
                  and node.input[0] in initializers and len(initializers[node.input[0]].dims) == 2
                  and [list(a.ints) for a in node.attribute if a.name == "perm"] in ([], [[1, 0]])}
    made: dict[str, str] = {}
    rewired = 0
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] in transposes:
            weight = transposes[node.input[1]].input[0]
            if weight not in made:
                made[weight] = f"{weight}.T"
                array = numpy_helper.to_array(initializers[weight]).T.copy()
                proto.graph.initializer.append(numpy_helper.from_array(array, made[weight]))
            node.input[1] = made[weight]
            rewired += 1
    read = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    dead = [node for node in proto.graph.node if node.op_type == "Transpose" and node.output[0] in transposes
            and node.output[0] not in read]
    for node in dead:
        proto.graph.node.remove(node)
    return rewired
