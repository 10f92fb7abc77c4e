"""Benchmarks on public datasets, run by ``pv2tea bench``."""
