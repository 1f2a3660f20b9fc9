"""Evaluation: zero-shot forget / related / utility accuracy."""
