"""Benchmarks of fdsm_ext against the autograd score-matching baselines.

Run everything with ``python -m benchmarks.run [--quick] [--only NAME]``; each benchmark is
also a module of its own (``python -m benchmarks.dimension [--quick]``). Results (markdown
tables and PNG plots) go to ``benchmarks/results/<quick|full>/``.
"""

BENCHMARKS = ("dimension", "deep_ebm", "order", "compile", "fused_ops", "ncsn")
