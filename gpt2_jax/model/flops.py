"""Model FLOPs per token and accelerator peaks: the figures behind ``mfu``.

FLOPs per trained token are ``6 N + 12 L T C`` (PaLM appendix B, nanoGPT's
``estimate_mfu``): 6 per parameter for the forward and backward matmuls, plus attention's
``QK^T`` and ``AV`` over a context of T. N counts every parameter except the position
table (its lookup does no matmul); the tied ``wte`` counts once, as the output head.
Recomputation under ``remat`` is not counted: MFU measures useful work.
"""

from __future__ import annotations

from gpt2_jax.model.config import GPT2Config

# Dense peak FLOP/s per device for the dtype the matmuls run in. float32 on NVIDIA GPUs is
# JAX's default precision there, TF32 on tensor cores; TPUs run float32 matmuls as bf16
# passes at default precision, so one figure serves both. Keys match ``device.device_kind``
# by substring, most specific first.
#
# Hopper, dense (without 2:4 sparsity; the datasheets' headline figures are sparse, twice
# these), bf16 and TF32 tensor-core rates from NVIDIA's H100 datasheet (H100 SXM5: 989.4 /
# 494.7 TFLOP/s; H100 PCIe: 756 / 378; H100 NVL: 835 / 418) and H200 datasheet (H200 SXM:
# the H100 SXM's rates, 989 / 494.7; H200 NVL: 835 / 418). device_kind reads e.g.
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200".
PEAK_FLOPS = (
    ("H200 NVL", {"bfloat16": 835e12, "float32": 418e12}),
    ("H200", {"bfloat16": 989e12, "float32": 495e12}),
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100 NVL", {"bfloat16": 835e12, "float32": 418e12}),
    ("H100", {"bfloat16": 989e12, "float32": 495e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("L4", {"bfloat16": 121e12, "float32": 60e12}),
    ("TPU v6 lite", {"bfloat16": 918e12, "float32": 918e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5p", {"bfloat16": 459e12, "float32": 459e12}),
    ("TPU v5", {"bfloat16": 459e12, "float32": 459e12}),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
)


def flops_per_token(model_cfg: GPT2Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of ``model_cfg`` at context ``seq_len``."""
    C, L = model_cfg.n_embd, model_cfg.n_layer
    inner = model_cfg.inner_dim
    attn = (C * 3 * C + 3 * C) + (C * C + C)  # c_attn, c_proj (weights + biases)
    mlp = (C * inner + inner) + (inner * C + C)  # c_fc, c_proj
    block = attn + mlp + 4 * C  # + two LayerNorms
    n = model_cfg.vocab_size * C + L * block + 2 * C
    return 6.0 * n + 12.0 * L * seq_len * C


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Peak FLOP/s of one device of ``device_kind`` for ``dtype`` matmuls; None if unknown."""
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None
