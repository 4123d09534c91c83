"""Model loading, architecture adapters and the pruned-model family."""

# Importing pruned_moe and pruned_encoder registers their per-layer-width classes (MoE expert
# counts; encoder heads and FFN widths) with the transformers Auto classes (as `import compress`
# does for pruned_llama), so exported folders load without trust_remote_code once compress is imported.
from compress.models import pruned_encoder, pruned_moe  # noqa: E402,F401
