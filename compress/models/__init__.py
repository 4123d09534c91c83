"""Model loading, architecture adapters and the pruned-model family."""

# Importing pruned_moe, pruned_encoder and pruned_llava registers their classes (MoE expert counts;
# encoder heads and FFN widths; LLaVA with pruned image tokens) with the transformers Auto classes
# (as `import compress` does for pruned_llama), so exported folders load without trust_remote_code
# once compress is imported.
from compress.models import pruned_encoder, pruned_llava, pruned_moe  # noqa: E402,F401
