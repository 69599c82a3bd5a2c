"""Bindings of the fused losses to training libraries (optional extras)."""
