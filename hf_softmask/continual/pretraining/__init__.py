"""Continual pre-training over a sequence of domains: configuration, the domain loop, evaluation, results, sweeps
and the learning-rate frontier."""
