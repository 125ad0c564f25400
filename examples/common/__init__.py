"""Code shared by the example scripts (and imported by benchmarks/): command line, data,
models, losses, the training loop, checkpoints, distributed helpers, metrics and reports."""
