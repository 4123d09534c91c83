"""Model loading, architecture adapters and the pruned-model family."""
