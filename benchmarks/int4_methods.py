"""Which 4-bit weights for the fused ONNX decoder: quality of each int4 method against the float graph
(issue 22; the table "Which int4" in docs/export.md).

Input: the fused float graph and the pruned model of ``compress run recipes/llama-flap-50.yaml``
(``outputs/llama-flap-50``). Variants, each a quantized copy of that graph (blocks of 32):

  rtn                 ONNX Runtime's round-to-nearest, integer zero points, every decoder linear
  rtn-<part>          the same for one part only (qkv, o_proj, gate_proj, up_proj, down_proj)
  hqq                 ONNX Runtime's HQQ (float zero points), every decoder linear
  gptq-in-order       exporters/onnx_gptq.py, columns in order
  gptq                the same, columns by decreasing input energy (act order; what the run uses)
  gptq-head8          gptq + the LM head in int8 (the deploy recipe)
  gptq-head8-emb4     gptq + int8 head + the embedding in int4 (GatherBlockQuantized)

GPTQ's statistics: ``--gptq-windows`` calibration windows of the general corpus (seed 0, 128
tokens, as the recipe's). Quality: perplexity ratio to the float graph and next-token top-1
agreement, teacher-forced in ONNX Runtime on ``--windows`` evaluation windows from each
protocol-v2 domain.

    python benchmarks/int4_methods.py --out docs/results/int4_methods.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repo_paths import ROOT, command_line, display

sys.path.insert(0, str(ROOT))

PARTS = {"qkv": "attn.qkv_proj", "o_proj": "attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
         "down_proj": "mlp.down_proj"}


def quantize(source: Path, folder: Path, name: str, hessians) -> float:
    """Write variant ``name`` of ``source`` into ``folder``; returns the seconds it took."""
    from exporters.onnx_quant import QuantOptions, quantize_onnx

    start = time.perf_counter()
    if name.startswith("rtn-"):  # one part: the other linears stay float
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
        )

        from exporters.onnx_quant import _run_quantizer, set_accuracy_level

        proto = onnx.load(str(source / "model.onnx"))
        part = PARTS[name[4:]]
        others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and part not in n.input[1]]
        config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, bits=4, op_types_to_quantize=("MatMul",),
                                              quant_axes=(("MatMul", 0),))
        proto = _run_quantizer(proto, config, exclude=others)  # (nodes_to_include adds to the op types; it does not restrict)
        set_accuracy_level(proto, 4)
        _save_like(source, folder, proto)
        return time.perf_counter() - start
    options = {"rtn": QuantOptions(bits=4, method="rtn", head_bits=None, embeddings=False),
               "hqq": QuantOptions(bits=4, method="hqq", head_bits=None, embeddings=False),
               "gptq-in-order": QuantOptions(bits=4, method="gptq", head_bits=None, embeddings=False),
               "gptq": QuantOptions(bits=4, method="gptq", head_bits=None, embeddings=False),
               "gptq-head8": QuantOptions(bits=4, method="gptq", head_bits=8, embeddings=False),
               "gptq-head8-emb4": QuantOptions(bits=4, method="gptq", head_bits=8, embeddings=True)}[name]
    if name == "gptq-in-order":  # the linears only, as quantize_onnx's gptq path with act order off
        import onnx

        from exporters.onnx_gptq import gptq_graph

        proto = onnx.load(str(source / "model.onnx"))
        gptq_graph(proto, hessians, options.block_size, options.compute_level, act_order=False)
        _save_like(source, folder, proto)
    else:
        quantize_onnx(source, folder, options, hessians)
    return time.perf_counter() - start


def _save_like(source: Path, folder: Path, proto) -> None:
    import shutil

    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name not in ("model.onnx", "model.onnx.data"):
            shutil.copy2(path, folder / path.name)
    onnx.save_model(proto, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "outputs" / "llama-flap-50",
                        help="output of compress run recipes/llama-flap-50.yaml")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows per protocol domain")
    parser.add_argument("--gptq-windows", type=int, default=64)
    parser.add_argument("--variants", nargs="*", default=["rtn", *(f"rtn-{p}" for p in PARTS), "hqq", "gptq-in-order",
                                                           "gptq", "gptq-head8", "gptq-head8-emb4"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "int4_methods.json")
    args = parser.parse_args()

    import torch

    from compress.calibration.sources import random_windows, window_bos
    from compress.calibration.token_cache import source_ids
    from compress.evaluation.lm_evaluator import LMEvaluator
    from compress.models.loading import load_model
    from compress.onnx_runtime import OrtDecoder
    from compress.recipe import EvaluateSpec
    from compress.validation import teacher_forced_agreement
    from exporters.onnx_gptq import linear_hessians

    source = args.run / "onnx"
    loaded = load_model(str(args.run), dtype="float32", device="cpu", progress=False)
    calibration = random_windows(source_ids(loaded.tokenizer, "general"), args.gptq_windows, 128, 0, source="general",
                                 bos=window_bos(loaded.tokenizer), field="calibration")
    start = time.perf_counter()
    hessians = linear_hessians(loaded.model, calibration)
    hessian_s = time.perf_counter() - start
    evaluator = LMEvaluator(EvaluateSpec(suite="v2", seqlen=128, max_windows=args.windows), loaded.tokenizer,
                            progress=False)
    windows = evaluator.spread_windows(args.windows * len(evaluator.windows))
    del loaded
    torch.set_num_threads(2)
    reference = OrtDecoder(source, optimization="all", threads=2)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.variants:
            folder = Path(scratch) / name
            seconds = quantize(source, folder, name, hessians)
            stats = teacher_forced_agreement(reference, OrtDecoder(folder, optimization="all", threads=2), windows)
            size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data")) / 1e6
            rows.append({"variant": name, "ppl_ratio": stats["ppl_ratio"], "top1_agreement": stats["top1_agreement"],
                         "ppl": stats["ppl"], "reference_ppl": stats["reference_ppl"], "size_mb": size,
                         "quantize_s": seconds})
            print(f"{name:18s} ratio {stats['ppl_ratio']:.4f}  top-1 {stats['top1_agreement']:.1%}  {size:6.1f} MB  "
                  f"{seconds:5.1f} s", flush=True)
    data = {"command": command_line(__file__), "graph": display(source), "windows": int(windows.shape[0]),
            "tokens_per_window": int(windows.shape[1]), "gptq_windows": args.gptq_windows,
            "hessians_s": hessian_s, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"JSON: {display(args.out)}")


if __name__ == "__main__":
    main()
