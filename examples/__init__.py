"""Training examples of fdsm_ext; run each as a module from the repository root, e.g.
``python -m examples.train_ebm --out runs/ebm`` (see examples/README.md)."""
