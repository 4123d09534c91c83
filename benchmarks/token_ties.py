"""Why a kept-index set differs between PyTorch and ONNX Runtime: the selection margins of DivPrune.

    python benchmarks/token_ties.py bench-results/token_pruning/dinov2/divprune-0.7

Runs the benchmark's kept-index check on an exported `divprune` folder (100 test images and 100
standard-normal images, as in `token_pruning.py`) and, for every input, replays PyTorch's greedy
max-min selection in float64 on the hidden states PyTorch fed it, recording at each pick the margin
between the winning candidate's distance and the best smaller one (exact ties, which the first pick
has between mutual nearest neighbours, go to the lower index in both runtimes). An input whose smallest margin is
below the float32 disagreement of the two runtimes' hidden states (about 1e-5 after a few layers)
is a near-tie: either runtime's choice is right. Prints, per input set, the mismatching inputs with
their smallest margin and the distribution of the smallest margins of all inputs; writes JSON next
to the folder (`tie_margins.json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def greedy_margins(hidden, sizes, keep: int, protected: int) -> list[float]:
    """Margins (best minus the best smaller priority) of each greedy pick of `max_min_diverse_index`,
    replayed in float64 for one input: hidden [T, E], sizes [T]."""
    from compress.models.token_pruning import divprune_steps

    margins = []
    for priority, _ in divprune_steps(hidden[None, protected:].double(), sizes[None, protected:] > 0, keep):
        priority = priority[0]
        best = priority.max()
        # an exact tie (mutual nearest neighbours at the first pick) goes to the lower index in both
        # runtimes, so the margin that matters is to the best value below it
        margins.append(float(best - priority[priority < best].max()))
    return margins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="an exported divprune folder of the DINOv2 benchmark")
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModel

    import compress.models  # noqa: F401
    import compress.models.token_pruning as token_pruning
    from encoder_heads import session
    from exporters.encoder import kept_index_agreement
    from token_pruning import index_check_inputs

    captured = []
    selection = token_pruning.max_min_diverse_index

    def capturing(hidden, sizes, keep, protected):
        captured.append((hidden.detach().clone(), sizes.detach().clone(), keep, protected))
        return selection(hidden, sizes, keep, protected)

    token_pruning.max_min_diverse_index = capturing
    model = AutoModel.from_pretrained(args.folder, attn_implementation="sdpa").eval()
    graph = session(args.folder / "onnx" / "model.onnx")
    result = {}
    for name, batches in index_check_inputs("dinov2").items():
        smallest, mismatching = [], []
        for batch in batches:
            captured.clear()
            with torch.no_grad():
                expected = model(**batch)
            _, sizes, positions = graph.run(["last_hidden_state", "token_sizes", "kept_positions"],
                                            {"pixel_values": batch["pixel_values"].numpy()})
            agreement = kept_index_agreement(expected.token_sizes.numpy(), expected.kept_positions.numpy(),
                                             sizes, positions)
            for row in range(batch["pixel_values"].shape[0]):
                margin = min(min(greedy_margins(hidden[row], stage_sizes[row], keep, protected))
                             for hidden, stage_sizes, keep, protected in captured)
                smallest.append(margin)
                if row not in agreement["agreeing_rows"]:
                    mismatching.append({"input": len(smallest) - 1, "smallest_margin": margin})
        values = np.array(smallest)
        for m in mismatching:
            m["inputs_with_a_smaller_margin"] = int((values < m["smallest_margin"]).sum())
        result[name] = {"inputs": len(smallest), "mismatching": mismatching,
                        "smallest_margin_quantiles": {q: float(np.quantile(values, q)) for q in (0.0, 0.01, 0.1, 0.5)}}
        quantiles = [f"{v:.2e}" for v in result[name]["smallest_margin_quantiles"].values()]
        print(f"{name}: {len(mismatching)} of {len(smallest)} inputs differ: {mismatching}; smallest margin per "
              f"input, quantiles 0/1/10/50%: {quantiles}", flush=True)
    (args.folder / "tie_margins.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
