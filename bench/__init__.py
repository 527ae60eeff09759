"""Benchmarks of SPEC §7 (T-PERF-1..5): scripts that print their figures and their references."""
