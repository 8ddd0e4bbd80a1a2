"""Shared plumbing below every layer: the workdir's file names, the cache root, host malloc
tuning.
"""
