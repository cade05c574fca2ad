"""Generic optax training loop, objectives, packing, metrics and resumable checkpoints."""
