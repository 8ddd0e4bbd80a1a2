"""Optimizers and learning-rate schedules (optax)."""
