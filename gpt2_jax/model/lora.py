"""LoRA adapters on GPT-2's projections: PEFT's math, PEFT's tensor layout, a flax collection.

What: each adapted projection (kernel W [in, out], Hugging Face Conv1D's layout, and bias b)
computes

    y = x @ W + b + scale * (dropout(x) @ A.T) @ B.T,   A [r, in], B [out, r],
    scale = alpha / r,

which is PEFT's LoRA on a ``Conv1D`` (``fan_in_fan_out=True``): A and B are stored as PEFT
stores ``lora_A.weight`` and ``lora_B.weight``, so import and export are a rename. A starts
as PEFT's default (``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(in), 1/sqrt(in))), B at zero,
so a fresh adapter leaves the model's numbers as they were.

Why: only A and B train. The branch is computed beside the frozen kernel, never by merging
it into W, so a gradient with respect to the adapters forms no [in, out] gradient of a base
kernel, and the optimizer keeps state for r * (in + out) numbers per projection.

Where: the adapters live in their own flax collection, ``"lora"``, under the same module
paths as the kernels they adapt, so the ``"params"`` tree is the same with or without LoRA:
``GPT2(cfg).apply({"params": base, "lora": adapters}, ids)``. Unrolled layout:
``{"h_<i>": {"attn": {"c_attn": {"lora_A": [r, C], "lora_B": [3C, r]}, ...}, "mlp": ...}}``;
scanned layout (``scan_layers``): ``{"h": {...}}`` with a leading layer axis on every leaf
(``lora_A`` [L, r, in]). Only the targeted modules have leaves.

Targets use PEFT's names: ``c_attn``, ``c_fc``, and ``c_proj`` (both the attention and the
MLP projection); ``attn.c_proj`` / ``mlp.c_proj`` (and ``attn.c_attn``, ``mlp.c_fc``) pick
one. ``merge`` folds adapters into a copy of the base (for generation and ``--merge``
exports); ``weights.peft`` reads and writes PEFT adapter directories.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

COLLECTION = "lora"  # the flax collection holding the adapters
# Every adaptable module, as its path inside a block (the order of every listing).
MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# A target name (PEFT's, or a qualified one) -> the modules it adapts.
TARGETS = {
    "c_attn": ("attn.c_attn",),
    "c_proj": ("attn.c_proj", "mlp.c_proj"),
    "c_fc": ("mlp.c_fc",),
    **{path: (path,) for path in MODULES},
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how (``lora.*`` config keys): rank r (0 = off), alpha (the
    branch is scaled by alpha / r), dropout on the branch's input, target modules."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")

    def __post_init__(self):
        # A list (from a config or JSON) becomes a tuple: the config must stay hashable.
        if not isinstance(self.targets, tuple):
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        """alpha / rank, PEFT's ``scaling`` (0 when the rank is 0: no branch)."""
        return self.alpha / self.rank if self.rank else 0.0

    def validate(self) -> None:
        """Raises ValueError naming the key ``lora.<name>`` for an impossible config."""
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"lora.rank must be an integer >= 0 (0 = off), got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(
                f"lora.targets: {', '.join(map(repr, bad))} is not a GPT-2 module LoRA can "
                f"adapt; valid names: {', '.join(TARGETS)}"
            )
        if self.rank and not self.targets:
            raise ValueError(f"lora.targets is empty; valid names: {', '.join(TARGETS)}")


def lora_from_section(section) -> LoraConfig | None:
    """A config's ``lora`` section (a mapping of plain values: ``rank``, ``alpha``,
    ``dropout``, ``targets`` as ``"c_attn,c_proj"`` or a list) -> its LoraConfig, None for
    rank 0 (LoRA off). Not validated (``LoraConfig.validate`` names the bad key)."""
    get = section.get if hasattr(section, "get") else lambda k, d: getattr(section, k, d)
    rank = get("rank", 0)
    if not rank:
        return None
    targets = get("targets", "")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(
        rank=rank,
        alpha=float(get("alpha", 16.0)),
        dropout=float(get("dropout", 0.0)),
        targets=tuple(targets),
    )


def targets_text(lora_cfg: LoraConfig) -> str:
    """The targets as the ``lora.targets`` config key writes them (``"c_attn,c_proj"``)."""
    return ",".join(lora_cfg.targets)


def module_paths(lora_cfg: LoraConfig) -> tuple[str, ...]:
    """The modules ``lora_cfg.targets`` adapt, in ``MODULES`` order (``c_proj`` is two)."""
    chosen = {path for t in lora_cfg.targets for path in TARGETS.get(t, ())}
    return tuple(path for path in MODULES if path in chosen)


def adapts(lora_cfg: LoraConfig | None, path: str | None) -> bool:
    """Whether the module at ``path`` (e.g. ``"mlp.c_proj"``) gets a LoRA branch."""
    return lora_cfg is not None and lora_cfg.rank > 0 and path in module_paths(lora_cfg)


def module_shapes(model_cfg) -> dict[str, tuple[int, int]]:
    """Each adaptable module's kernel shape (in, out) for a ``GPT2Config``."""
    C, inner = model_cfg.n_embd, model_cfg.inner_dim
    return {
        "attn.c_attn": (C, 3 * C),
        "attn.c_proj": (C, C),
        "mlp.c_fc": (C, inner),
        "mlp.c_proj": (inner, C),
    }


def init_lora_a(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """PEFT's default A: torch's ``kaiming_uniform_(a=sqrt(5))`` of a [r, in] weight, i.e.
    U(-1/sqrt(in), 1/sqrt(in)) (gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / in))."""
    bound = 1.0 / math.sqrt(shape[-1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def init_adapters(lora_cfg: LoraConfig, model_cfg, rng: jax.Array, scanned: bool) -> dict:
    """Fresh adapters for ``model_cfg`` in the ``"lora"`` collection's layout: A as
    ``init_lora_a``, B zeros, in ``model_cfg.param_dtype``; stacked (leading layer axis)
    when ``scanned``. Layer i's values are the same in both layouts."""
    dtype = jnp.dtype(model_cfg.param_dtype)
    shapes = module_shapes(model_cfg)
    r = lora_cfg.rank

    def layer(i: int) -> dict:
        tree: dict = {}
        for j, path in enumerate(module_paths(lora_cfg)):
            fan_in, fan_out = shapes[path]
            key = jax.random.fold_in(jax.random.fold_in(rng, i), j)
            group, name = path.split(".")
            tree.setdefault(group, {})[name] = {
                "lora_A": init_lora_a(key, (r, fan_in), dtype),
                "lora_B": jnp.zeros((fan_out, r), dtype),
            }
        return tree

    layers = [layer(i) for i in range(model_cfg.n_layer)]
    if scanned:
        return {"h": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    return {f"h_{i}": tree for i, tree in enumerate(layers)}


def merge(params: dict, adapters: dict, lora_cfg: LoraConfig) -> dict:
    """Base params with each adapted kernel replaced by W + scale * A.T @ B.T (PEFT's
    ``merge_and_unload``), either layout (``adapters``' must match ``params``'). The delta
    is formed in float32 at full precision and cast to the kernel's dtype. Pure: the
    inputs are not modified; unadapted leaves are shared with ``params``."""
    out = jax.tree.map(lambda x: x, params)  # fresh containers, the same leaves
    scale = lora_cfg.scale
    layers = [k for k in params if k == "h" or k.startswith("h_")]
    for layer in layers:
        for path in module_paths(lora_cfg):
            group, name = path.split(".")
            try:
                ab = adapters[layer][group][name]
                module = out[layer][group][name]
            except KeyError as e:
                raise ValueError(f"adapters have no {layer}/{group}/{name} to merge") from e
            kernel = module["kernel"]
            delta = jnp.einsum(
                "...ri,...or->...io",
                jnp.asarray(ab["lora_A"], jnp.float32),
                jnp.asarray(ab["lora_B"], jnp.float32),
                precision=jax.lax.Precision.HIGHEST,
            )
            merged = jnp.asarray(kernel, jnp.float32) + scale * delta
            out[layer][group][name] = {**module, "kernel": merged.astype(kernel.dtype)}
    return out


class LoraDense(nn.Module):
    """``nn.Dense``'s parameters (``kernel`` [in, out], ``bias``) and numbers, plus the LoRA
    branch with ``lora_A`` [r, in] and ``lora_B`` [out, r] in the ``"lora"`` collection:
    [..., in] -> [..., out]. Dropout on the branch's input uses the ``"dropout"`` rng.

    ``GPT2.init`` with LoRA draws A from the ``"params"`` rng too, so in the scanned layout
    its base values differ from a plain init's (same tree, same shapes); LoRA adapts
    pretrained weights, and ``init_adapters`` makes its adapters without a model init."""

    features: int
    lora_cfg: LoraConfig
    dtype: Any
    param_dtype: Any
    kernel_init: Callable
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in, r = x.shape[-1], self.lora_cfg.rank
        kernel = self.param("kernel", self.kernel_init, (fan_in, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        a = self.variable(
            COLLECTION,
            "lora_A",
            lambda: init_lora_a(self.make_rng("params"), (r, fan_in), self.param_dtype),
        ).value
        b = self.variable(
            COLLECTION, "lora_B", lambda: jnp.zeros((self.features, r), self.param_dtype)
        ).value
        x, kernel, bias, a, b = nn.dtypes.promote_dtype(x, kernel, bias, a, b, dtype=self.dtype)
        # The base exactly as nn.Dense computes it.
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        h = nn.Dropout(self.lora_cfg.dropout)(x, deterministic=self.deterministic)
        h = jnp.einsum("...i,ri->...r", h, a)  # (..., r)
        return y + self.lora_cfg.scale * jnp.einsum("...r,or->...o", h, b)
