"""featcache benchmarks: ``python -m bench <benchmark> [options]`` from the repository root.

Every benchmark measures its baselines in the same run, interleaved with the cases under test
(each round runs every case once, in rotating order), prints a table with ratios to the baseline
and writes the same figures as JSON. Nothing here hard-codes a result: every number printed was
measured by the run that printed it.
"""
