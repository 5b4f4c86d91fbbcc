"""Benchmarks beside main_benchmark.py: its step, FLOP, hardware, data-pipeline and report modules, and
family comparisons (family_vs_mae.py) and the scripted GPU suite (gpu_suite.sh)."""
