"""Perplexity, the lm-evaluation-harness backend, and text generation."""
