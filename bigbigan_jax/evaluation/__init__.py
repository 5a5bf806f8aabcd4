"""Evaluation: the linear probe, the judge classifier, FID and Inception Score."""
