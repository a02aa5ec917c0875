"""Benchmarks of ``FusedGroupProxAdam`` against the unfused ways to take the same step.

``pytest benchmarks/ --benchmark-only`` times every method on the papers' model shapes;
``python -m benchmarks.report`` prints the comparison table and writes ``benchmarks/RESULTS.md``;
``LOMT_BENCH_SMALL=1 pytest benchmarks --benchmark-disable`` is the CI smoke run (small sets,
one step each, fused results checked against the unfused ones).
"""
