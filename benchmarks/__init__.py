"""Benchmark harness: plant label noise in real image sets and measure how well deft-clean and simple
baselines find it. Uses only deft-clean's public API; see docs/benchmarks.md.

Modules: ``datasets`` (materialise + plant noise), ``metrics`` (flags/scores vs. planted truth),
``baselines`` (cleanlab, kNN, small-loss, GMM, zero-shot), ``run`` (the entry point), ``report``
(markdown tables from the JSON records).
"""
