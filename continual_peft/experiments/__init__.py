"""Experiments: one run of a stream into a run directory, a grid of runs (orders, seeds,
options), and a comparison of strategies or module kinds on one stream."""
