"""The GPT-2 decoder (Flax linen), one job a module: ``config`` (GPT2Config, named sizes),
``layers`` (Dense, LayerNorm, MLP), ``attention`` (the attention paths and which one
runs), ``gpt2`` (Block, GPT2, parameter layouts), ``decode`` (the KV-cache forward),
``losses`` (the loss heads), ``flops``, ``lora`` (LoRA adapters: config, init, merge, the
adapted Dense).
"""
