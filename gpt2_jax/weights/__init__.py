"""Orbax checkpoints, Hugging Face import/export, and the one resolver of where weights come
from.
"""
