"""Evaluation: exact distributed inference, metrics, ensembles, the report, single-image prediction."""
