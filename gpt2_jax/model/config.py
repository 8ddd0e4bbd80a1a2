"""The model's configuration: what a GPT-2 is (its shape) and how to compute with it.

``GPT2Config`` is the frozen, validated description every model function takes; field
names are Hugging Face's. ``SHAPE_FIELDS`` (fixed by the weights) and ``RUNTIME_FIELDS``
(free to change on resume or import) are the two lists every other list of model fields
derives from. ``config_from_section`` is the one translation from a config's ``model``
section (a mapping of plain values) to a ``GPT2Config``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from gpt2_jax.model.lora import LoraConfig

# Named sizes: (n_layer, n_head, n_embd), as in Hugging Face's configs.
SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


def size_fields(size: str) -> dict[str, int]:
    """(n_layer, n_head, n_embd) of a named size, e.g. ``GPT2Config(**size_fields("gpt2"))``;
    the one lookup (``model.size`` in a config asks it too)."""
    if size not in SIZES:
        raise ValueError(f"model.size={size!r} is not one of {sorted(SIZES)}")
    return dict(SIZES[size])


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Model config. Field names are Hugging Face ``GPT2Config``'s where they exist."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None -> 4 * n_embd
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # Not in Hugging Face's config: how we compute, not what the model is.
    dtype: str = "float32"  # compute dtype (activations, matmuls)
    param_dtype: str = "float32"  # parameter (and optimizer state) dtype
    scan_layers: bool = False  # True: one block compiled and scanned over layers, params under "h"
    remat: bool = False  # recompute block activations in the backward pass (saves memory)
    # LoRA adapters on the block's projections (model.lora), in the "lora" collection; None:
    # none (the model and its params exactly as without the field). Neither a shape nor a
    # runtime field: the adapters' shapes follow it, the base's do not.
    lora: LoraConfig | None = None

    @property
    def inner_dim(self) -> int:
        """The MLP's width: ``n_inner``, or 4 * n_embd when unset."""
        return self.n_inner or 4 * self.n_embd

    def validate(self) -> None:
        """Raises ValueError naming the field for an impossible config."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"model.{name}={getattr(self, name)!r} is not one of {list(DTYPES)}"
                )
        if self.lora is not None:
            self.lora.validate()


# What the weights fix (a checkpoint's shape) vs how to compute with them (a user may change
# these on resume or import). Every other list of model fields derives from these two.
SHAPE_FIELDS = (
    "n_layer",
    "n_head",
    "n_embd",
    "n_positions",
    "vocab_size",
    "n_inner",
    "layer_norm_epsilon",
)
RUNTIME_FIELDS = (
    "dtype",
    "param_dtype",
    "scan_layers",
    "remat",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
)


def runtime_from_section(m) -> dict:
    """The runtime fields from a config's ``model`` section (a mapping): one key,
    ``dropout``, sets all three of Hugging Face's *_pdrop fields."""
    defaults = GPT2Config()
    get = m.get if hasattr(m, "get") else lambda k, d: getattr(m, k, d)
    dropout = get("dropout", defaults.resid_pdrop)
    return {
        f: dropout if f.endswith("_pdrop") else get(f, getattr(defaults, f)) for f in RUNTIME_FIELDS
    }


def config_from_section(m) -> GPT2Config:
    """The frozen model config from a config's ``model`` section (a mapping of plain
    values): ``size`` first, explicit n_layer/n_head/n_embd win. Raises ValueError naming
    the key. Keys missing from an older saved config take GPT2Config's defaults."""
    get = m.get if hasattr(m, "get") else lambda k, d: getattr(m, k, d)
    fields = size_fields(get("size", "")) if get("size", "") else {}
    for name in ("n_layer", "n_head", "n_embd"):
        if get(name, 0):
            fields[name] = get(name, 0)
        elif name not in fields:
            raise ValueError(f"model.{name} is not set (set it, or model.size)")
    defaults = GPT2Config()
    return GPT2Config(
        **fields,
        vocab_size=get("vocab_size", defaults.vocab_size),
        n_positions=get("n_positions", defaults.n_positions),
        n_inner=get("n_inner", 0) or None,
        layer_norm_epsilon=get("layer_norm_epsilon", defaults.layer_norm_epsilon),
        **runtime_from_section(m),
    )
