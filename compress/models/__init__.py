"""Model loading, architecture adapters and the pruned-model family."""

# Importing pruned_moe registers its per-layer-expert-count MoE classes with the transformers Auto
# classes (as `import compress` does for pruned_llama), so exported folders load without
# trust_remote_code once compress is imported.
from compress.models import pruned_moe  # noqa: E402,F401
