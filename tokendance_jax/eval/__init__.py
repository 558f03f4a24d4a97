"""Evaluation: quality metrics and the benchmark experiments, kept out of the serving runtime."""
