"""The GPT-2 decoder (Flax linen): config, attention paths, KV-cache decoding, loss heads,
FLOPs.
"""
