"""Differential privacy for the aggregator: keyed Gaussian noise, (epsilon, delta) accounting."""
