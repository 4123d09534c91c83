"""The ``distill`` pass, declared: name, options and what it needs (light; run by passes.distill.run)."""

from __future__ import annotations

from dataclasses import replace

from pydantic import Field

from compress.registry import register_pass
from passes._common import BalanceOption, TrainOptions


@register_pass("distill", implementation="passes.distill.run:DistillPass")
class Distill:
    """Recovery by distillation: fine-tune the pruned model's decoder blocks toward the dense model.

    Every parameter of the decoder blocks (the sliced linears, their biases and the norms; not the
    embedding or the head) trains with AdamW on random windows of a text source, the loss being the
    KL from the dense model's next-token distribution at every position. Full fine-tuning recovers
    more per step than LoRA of the same cost (docs/general.md); the trained weights are saved beside
    plan.json, so ``compress apply`` reproduces them without data.
    """

    kinds = ("decoder",)  # the model kinds it works on (compress.kinds)
    needs_calibration = False

    class Options(TrainOptions, BalanceOption):
        batch_size: int = Field(8, ge=1, description="Windows per micro-batch.")
        checkpoint_every: int = Field(100, ge=0, description="Checkpoint every this many steps (0: only at the end); "
                                      "a checkpoint holds the trained weights and AdamW's two moments.")
        temperature: float = Field(1.0, gt=0.0, description="Softmax temperature of both models.")
        hidden_weight: float = Field(0.0, ge=0.0, description="Add this times the blocks' hidden-state distance to "
                                     "the KL: mean over blocks and positions of |h - h_dense|^2 / |h_dense|^2 "
                                     "(0: logits only).")
        bf16: bool = Field(False, description="Run the forward passes under bfloat16 autocast (faster on CPUs with "
                           "AMX or AVX-512 BF16 and on GPUs; the weights and AdamW stay float32).")

        def train_spec(self):
            """The training settings with this pass's KL loss (BOS is the caller's: it needs the tokenizer)."""
            return replace(super().train_spec(), loss="kl", temperature=self.temperature, bf16=self.bf16,
                           hidden_weight=self.hidden_weight, balance=self.balance)
