"""Weight-only quantization of an exported ONNX decoder folder (MatMulNBits), for deployment.

    quantize_onnx(source, out_dir, options) -> OnnxExport

ONNX Runtime's own block quantizers (``onnxruntime.quantization.matmul_nbits_quantizer``) rewrite
MatMuls with a constant weight into ``MatMulNBits`` (one scale, and a zero point unless symmetric,
per block of ``block_size`` input channels). Three parts get their own treatment, because a
pruned model's flat output distribution makes its argmax easy to move:

* **decoder linears**: 8 bits round-to-nearest, or 4 bits with HQQ (half-quadratic, data-free;
  ``method: hqq``, the default), round-to-nearest (``method: rtn``) or GPTQ on calibration
  statistics (``method: gptq``, fused graphs; :mod:`exporters.onnx_gptq`);
* **the LM head**: in the int4 graph, ``head_bits`` (8 by default); the tied head is exported as
  ``MatMul(x, Transpose(embedding))`` and is untied into a weight of its own first. The int8 graph
  keeps it in float and tied: the head decides near-ties between tokens, and an 8-bit head moved
  greedy continuations where the rest of the int8 graph did not;
* **the token embedding** (``embeddings``, int4 graphs): ``GatherBlockQuantized``, round-to-nearest
  (ONNX Runtime has no 8-bit form).

Measured on SmolLM2-135M FLAP-50 (its float graph is 326 MB), against the float graph: int4 with
HQQ, an int8 head and an int4 embedding is 90 MB with a perplexity ratio of 1.02 (8 Wikipedia
windows); round-to-nearest int4 everywhere is 69 MB and 1.36. int8 with an int8 head and
symmetric blocks kept 2 of 5 greedy continuations; with zero points and the head in float (the
defaults), all 5.

Activations, the KV cache and every I/O name and shape stay as in the float graph, so the
quantized folder is a drop-in for ``compress generate``, onnxruntime-genai (its
``genai_config.json`` is copied) and the validator. ``export.json`` records the quantization.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from compress.errors import CompressError
from exporters.onnx import DATA_FILE, ONNX_FILE, SPEC_FILE, DecoderIOSpec, OnnxExport

__all__ = ["QuantOptions", "quantize_onnx", "untie_transposed_weights"]


@dataclass(frozen=True)
class QuantOptions:
    """bits: 4 or 8 (decoder linears). block_size: input channels per scale (16 to 256). symmetric:
    no zero points (round-to-nearest parts). method: hqq or rtn for 4-bit linears. head_bits: the LM
    head's bits in a 4-bit graph (4 or 8; None keeps it in float, tied); an 8-bit graph keeps the
    head in float. embeddings: quantize the token embedding (4-bit graphs). accuracy_level: the
    MatMulNBits compute type (4: int8 activations, ONNX Runtime's fast CPU path; 0: float); None
    gives 4 to 4-bit graphs and 0 to 8-bit ones (int8 activations broke the int8 greedy gate)."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    method: str = "hqq"  # 4-bit linears: hqq, rtn, or gptq (needs the linears' input Hessians)
    head_bits: int | None = 8
    embeddings: bool = True
    accuracy_level: int | None = None  # None: 4 for 4-bit graphs, 0 for 8-bit graphs

    @property
    def compute_level(self) -> int:
        """The MatMulNBits ``accuracy_level`` written: the option, else 4 (int4) / 0 (int8)."""
        if self.accuracy_level is not None:
            return self.accuracy_level
        return 4 if self.bits == 4 else 0

    @property
    def name(self) -> str:
        return f"int{self.bits}"


def quantize_onnx(source: Path, out_dir: Path, options: QuantOptions = QuantOptions(),
                  hessians: dict | None = None) -> OnnxExport:
    """Quantize the float decoder in ``source`` into ``out_dir`` (graph, weights, export.json, and
    every other file of ``source`` copied: genai_config.json, the tokenizer). The caller owns
    atomicity of ``out_dir``. ``hessians``: for ``method: gptq``, the input second moments of the
    fused graph's linears (:func:`exporters.onnx_gptq.linear_hessians`)."""
    import onnx

    source, out_dir = Path(source), Path(out_dir)
    spec = DecoderIOSpec.load(source)
    if linear_method(options) == "gptq" and (spec.graph != "fused" or not hessians):
        raise CompressError(f"{source}: int4_method gptq quantizes the fused graph (export.onnx.graph: fused or auto) "
                            f"with calibration statistics; this graph is {spec.graph}")
    out_dir.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(str(source / ONNX_FILE))
    # the head stays tied to the (float) embedding when it is not quantized
    untie_transposed_weights(proto, skip_outputs=() if head_bits_of(options) else ("logits",))
    proto = quantize_graph(proto, options, hessians)
    if not any(node.op_type == "MatMulNBits" for node in proto.graph.node):
        raise CompressError(f"{source / ONNX_FILE}: no MatMul with a constant weight to quantize")
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".quant-") as scratch:
        onnx.save_model(proto, str(Path(scratch) / ONNX_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        for name in (ONNX_FILE, DATA_FILE):
            os.replace(Path(scratch) / name, out_dir / name)
    nodes = len(proto.graph.node)
    spec.opset = {entry.domain: entry.version for entry in proto.opset_import}.get("", spec.opset)
    del proto
    (out_dir / DATA_FILE).chmod((out_dir / ONNX_FILE).stat().st_mode & 0o777)
    spec.quantization = {"method": f"MatMulNBits (onnxruntime weight-only), linears {linear_method(options)}",
                         **asdict(options)}
    spec.save(out_dir / SPEC_FILE)
    copied = sorted(p.name for p in source.iterdir() if p.is_file() and p.name not in (ONNX_FILE, DATA_FILE, SPEC_FILE))
    for name in copied:
        shutil.copy2(source / name, out_dir / name)
    size = sum((out_dir / f).stat().st_size for f in (ONNX_FILE, DATA_FILE))
    return OnnxExport(folder=out_dir, files=[ONNX_FILE, DATA_FILE, SPEC_FILE] + copied, spec=spec, nodes=nodes, bytes=size)


def head_bits_of(options: QuantOptions) -> int | None:
    """The LM head's bits: ``head_bits`` in a 4-bit graph; an 8-bit graph keeps it in float."""
    return options.head_bits if options.bits == 4 else None


def linear_method(options: QuantOptions) -> str:
    return options.method if options.bits == 4 and options.method in ("hqq", "gptq") else "rtn"


def quantize_graph(proto, options: QuantOptions, hessians: dict | None = None):
    """The three parts in turn (linears, LM head, embedding); returns the quantized ModelProto."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig

    head = [n.name for n in proto.graph.node if n.op_type == "MatMul" and "logits" in n.output]
    embedding = [n.name for n in proto.graph.node if n.op_type == "Gather" and "input_ids" in n.input]
    head_bits = head_bits_of(options)

    def rtn(bits: int, op_type: str = "MatMul"):
        return DefaultWeightOnlyQuantConfig(block_size=options.block_size, is_symmetric=options.symmetric, bits=bits,
                                            op_types_to_quantize=(op_type,), quant_axes=((op_type, 0 if op_type == "MatMul" else 1),))

    if linear_method(options) == "gptq":
        from exporters.onnx_gptq import gptq_graph

        gptq_graph(proto, hessians or {}, options.block_size, options.compute_level)
    else:
        linears = (HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4, op_types_to_quantize=("MatMul",))
                   if linear_method(options) == "hqq" else rtn(options.bits))
        proto = _run_quantizer(proto, linears, exclude=head)
    if head and head_bits:
        proto = _run_quantizer(proto, rtn(head_bits), include=head)
    if embedding and options.embeddings and options.bits == 4:
        proto = _run_quantizer(proto, rtn(4, "Gather"), include=embedding)
    set_accuracy_level(proto, options.compute_level)
    return proto


def set_accuracy_level(proto, level: int) -> None:
    """Give every MatMulNBits node ``accuracy_level`` = ``level`` (its compute type; 0 = unset)."""
    import onnx

    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in [a for a in node.attribute if a.name == "accuracy_level"]:
                node.attribute.remove(attribute)
            if level:
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


def _run_quantizer(proto, config, include: list[str] | None = None, exclude: list[str] | None = None):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(proto, algo_config=config, nodes_to_include=include, nodes_to_exclude=exclude)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.ERROR)  # one INFO line per node, and a warning that int4 needs opset 21 (it sets it)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # HQQ: torch.from_numpy on read-only weights (it only reads them)
            quantizer.process()
    finally:
        logger.setLevel(level)
    return quantizer.model.model


def untie_transposed_weights(proto, skip_outputs: tuple[str, ...] = ()) -> int:
    """Give every ``MatMul(x, Transpose(W))`` with an initializer ``W`` [N, K] an initializer of its
    own, ``W`` transposed [K, N], so the quantizer sees a constant weight (except the MatMuls that
    write one of ``skip_outputs``). The tied LM head is exported this way, and so is every linear
    when torch.onnx's optimizer did not run (``optimize: false``); the embedding's ``Gather`` keeps
    ``W``. Returns how many MatMuls were rewired; dead Transposes are removed."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in proto.graph.initializer}
    transposes = {node.output[0]: node for node in proto.graph.node if node.op_type == "Transpose"
                  and node.input[0] in initializers and len(initializers[node.input[0]].dims) == 2
                  and [list(a.ints) for a in node.attribute if a.name == "perm"] in ([], [[1, 0]])}
    made: dict[str, str] = {}
    rewired = 0
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] in transposes and not set(node.output) & set(skip_outputs):
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
