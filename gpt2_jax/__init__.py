"""gpt2_jax: GPT-2 training, evaluation and sampling in JAX/Flax.

The public Python API, imported lazily (``import gpt2_jax`` loads no JAX until a name is
used), so that the modules behind it can move::

    import gpt2_jax as g
    model_cfg, params = g.load_pretrained("hf-dir-or-hub-id")   # GPT2Config + params
    logits = g.GPT2(model_cfg).apply({"params": params}, ids)      # [B, T, vocab]
    g.save_pretrained(model_cfg, params, "out_dir")                # transformers loads it
    enc = g.get_tokenizer()                                        # tiktoken "gpt2", offline
    new_ids = g.generate(model_cfg, params, enc.encode("Hi"), max_new_tokens=20)
    rows = g.generate_batch(model_cfg, params, [ids_a, ids_b], max_new_tokens=20)
    lm = g.GPT2JaxLM.from_workdir("runs/x")   # an lm_eval LM (the [eval] extra)

The package's layers and where each name lives: README.md ("Layout") and
tests/test_structure.py.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it
_API = {
    "GPT2": "gpt2_jax.model.gpt2",
    "GPT2Config": "gpt2_jax.model.config",
    "load_pretrained": "gpt2_jax.weights.hf",
    "save_pretrained": "gpt2_jax.weights.hf",
    "generate": "gpt2_jax.evaluation.generate",
    "generate_batch": "gpt2_jax.evaluation.generate",
    "GPT2JaxLM": "gpt2_jax.evaluation.harness.lm",
    "get_tokenizer": "gpt2_jax.data.tokenizer",
    "UserError": "gpt2_jax.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gpt2_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
