"""Roles of a decoder block's linears, as the architecture adapters name them (no heavy imports, so
pass options can default to them without importing torch)."""

from __future__ import annotations

# The decoder linears LoRA adapts by default (compress.training; the lora_recover and loraprune options).
DEFAULT_TARGET_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
