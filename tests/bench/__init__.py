"""Tests of the benchmarks themselves (not of speed)."""
