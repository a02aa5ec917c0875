"""Studies: one-off measurements behind a design decision, kept so that a reader can repeat them.

Their conclusions live in the RESULTS files (``benchmarks/RESULTS-cpu-kernel.md``); the code here
is not maintained with the kernels and is not part of the default test run
(``pytest benchmarks/studies`` runs their own checks).
"""
