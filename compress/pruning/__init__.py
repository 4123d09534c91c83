"""Shared parts of structured pruning: scorers, units, allocators and the surgeon."""
