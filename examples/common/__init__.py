"""Shared pieces of the fdsm_ext training examples: data, models, training loop helpers, metrics."""
