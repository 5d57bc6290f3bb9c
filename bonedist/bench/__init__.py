"""Benchmarks: each prints bonedist's figure and a baseline measured in the same run, and their ratio."""
