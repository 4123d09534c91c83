"""Built-in passes. Importing this package registers each of them by name."""

from passes import baselines, cfsp, flap, head_routing, heads, lora_recover, loraprune, moe_experts, tokens  # noqa: F401
from passes.spa import prune as spa  # noqa: F401
