"""The ``lora_recover`` pass, declared: name, options and what it needs (light; run by passes.lora_recover.run)."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, model_validator

from compress.registry import register_pass
from passes._common import BalanceOption, LoRATrainOptions


@register_pass("lora_recover", implementation="passes.lora_recover.run:LoraRecoverPass")
class LoraRecover:
    """LoRA recovery fine-tuning: train low-rank adapters on text, then merge them into the weights.

    Attaches peft LoRA to the decoder linears of the (pruned) model and trains it with AdamW on
    random windows of a text source: by default by distillation, the KL from the dense model's
    next-token distribution at every position (``loss: kl``), or on the text's own next tokens
    (``loss: next_token``). Then it adds ``scaling · B @ A`` to each weight, so the model stays a
    plain model. The factors are saved beside plan.json, so ``compress apply`` reproduces the weights.
    """

    kinds = ("decoder",)  # the model kinds it works on (compress.kinds)
    needs_calibration = False

    class Options(LoRATrainOptions, BalanceOption):
        rank: int = Field(8, ge=1, description="LoRA rank (the mean rank with rank_by: block_importance).")
        rank_by: Literal["none", "block_importance"] = Field(
            "none",
            description="'block_importance': each block's rank proportional to its angular block importance "
            "(CFSP coarse-to-fine), mean rank = rank, each at least 1.",
        )
        importance_samples: int = Field(32, ge=1, description="Windows measured for rank_by: block_importance.")
        loss: Literal["kl", "next_token"] = Field(
            "kl", description="'kl': distil the dense model (KL(dense || pruned) per token; the dense model is "
            "loaded as teacher); 'next_token': cross-entropy on the text.")
        temperature: float = Field(1.0, gt=0.0, description="loss: kl: softmax temperature of both models.")
        bf16: bool = Field(False, description="Run the forward passes under bfloat16 autocast (faster on CPUs with "
                           "AMX or AVX-512 BF16 and on GPUs; the adapters and the merge stay float32).")

        @model_validator(mode="after")
        def _balance_needs_kl(self):
            if self.balance and self.loss != "kl":
                raise ValueError("balance weighs the parts by the excess loss over the dense model, so it needs "
                                 f"loss: kl (loss is {self.loss!r})")
            return self

        def train_spec(self):
            """The training settings with this pass's loss (BOS is the caller's: it needs the tokenizer)."""
            return replace(super().train_spec(), loss=self.loss, temperature=self.temperature, bf16=self.bf16,
                           balance=self.balance)
