"""Benchmarks run by ``pv2tea bench``: accuracy on ImplicitAVE or a gold-labelled catalogue, and the speed of S3,
training, extraction and serving on synthetic data."""
