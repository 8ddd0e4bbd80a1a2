"""Greedy generation speed: gpt2_jax (KV cache, one jitted loop) vs transformers generate.

    .venv/bin/python experiments/generation/bench.py                      # 124M shape, 256 new
    .venv/bin/python experiments/generation/bench.py --size=tiny --new_tokens=32   # smoke run

GPT-2 124M shape with random weights (fp32), built once in PyTorch, saved in Hugging Face
format and imported with ``hf.load_pretrained``, so both sides run the same numbers. An
8-token prompt per row, greedy, batch 1 and 8; torch uses ``--threads`` threads. The two
sides alternate round by round in one process, so load on a shared machine hits both
alike; the best round of each is reported. Compile time (jax) is measured apart, on a
first call; transformers gets a warm-up call too. Writes ``--out`` (JSON) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from gpt2_jax.evaluation import generate as gen_lib
from gpt2_jax.weights import hf

SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=512),
}


def random_hf_model(size: str, seed: int = 0) -> transformers.GPT2LMHeadModel:
    """Random GPT-2 (normal(0.02) matrices, LayerNorm scales near 1), built on the meta
    device and filled: HF's own init of 124M parameters is slow."""
    with torch.device("meta"):
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SIZES[size]))
    m = m.to_empty(device="cpu").eval()
    m.tie_weights()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02)
            else:
                p.copy_(float(name.endswith(".weight")) + 0.05 * torch.randn_like(p))
    return m


def hf_generate(m, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """prompts: [B, P] int -> [B, new_tokens] greedy ids (no stop token: fixed length)."""
    with torch.no_grad():
        out = m.generate(
            torch.as_tensor(prompts, dtype=torch.long),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    return out[:, prompts.shape[1] :].numpy()


def jax_generate(cfg, params, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    rows = gen_lib.generate_batch(
        cfg, params, [list(p) for p in prompts], new_tokens, temperature=0.0
    )
    return np.asarray(rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="gpt2", choices=sorted(SIZES))
    p.add_argument("--prompt_tokens", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="experiments/generation/results.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    m = random_hf_model(a.size)
    with tempfile.TemporaryDirectory() as d:
        m.save_pretrained(d)
        cfg, host_params = hf.load_pretrained(d)
    params = gen_lib.decode_params(cfg, host_params)
    del host_params

    rng = np.random.default_rng(0)
    results = []
    for B in (int(b) for b in a.batches.split(",")):
        prompts = rng.integers(0, cfg.vocab_size, (B, a.prompt_tokens))
        stats = gen_lib.Stats()  # the first call compiles: its compile time, measured apart
        t0 = time.perf_counter()
        chunks = gen_lib.stream_batch(
            cfg, params, [list(x) for x in prompts], a.new_tokens, 0.0, stats=stats
        )
        first = np.concatenate(list(chunks), axis=1)
        first_call = time.perf_counter() - t0
        hf_generate(m, prompts, 4)  # warm-up
        times = {"gpt2_jax": [], "transformers": []}
        same = None
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            ours = jax_generate(cfg, params, prompts, a.new_tokens)
            times["gpt2_jax"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs = hf_generate(m, prompts, a.new_tokens)
            times["transformers"].append(time.perf_counter() - t0)
            same = bool((ours == theirs).all())
        tokens = B * a.new_tokens
        row = {
            "batch": B,
            "new_tokens": a.new_tokens,
            "gpt2_jax_tok_s": tokens / min(times["gpt2_jax"]),
            "transformers_tok_s": tokens / min(times["transformers"]),
            "gpt2_jax_first_call_s": first_call,
            "gpt2_jax_compile_s": stats.compile_seconds,
            "times_s": times,
            "same_ids": same,
            "first_matches": bool((first == ours).all()),
        }
        row["ratio"] = row["gpt2_jax_tok_s"] / row["transformers_tok_s"]
        results.append(row)
        print(json.dumps(row), flush=True)

    out = {
        "args": vars(a),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
        },
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": results,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(table(out))


def table(out: dict) -> str:
    lines = [
        "| batch | new tokens | gpt2_jax tok/s | transformers tok/s | ratio | jax compile s |"
        " same ids |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in out["results"]:
        lines.append(
            f"| {r['batch']} | {r['new_tokens']} | {r['gpt2_jax_tok_s']:.1f} | "
            f"{r['transformers_tok_s']:.1f} | {r['ratio']:.2f}x | "
            f"{r['gpt2_jax_compile_s']:.1f} | {r['same_ids']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
