"""gpt2_jax vs Hugging Face PyTorch, side by side, on one machine, in one process tree.

    .venv/bin/python experiments/benchmark/bench.py                      # tiny + gpt2, T=128/512
    .venv/bin/python experiments/benchmark/bench.py --sizes=tiny --quick # what `make test` runs

Every measurement runs in its own worker subprocess (``--worker=jax|torch``) so that one
framework's thread pool never competes with the other's; the parent interleaves them
(jax, torch, jax, torch, ...) so load on a shared machine hits both alike. Each worker
reports compile/warm-up time apart from the steady-state time (median of ``--steps``).

Workloads (B = --batch, same shapes, same thread count on both sides):
  matmul     fp32 GFLOP/s on the model's own matmul shapes: the limit everything else is
             expressed against (fraction = achieved model FLOP/s / this)
  train      one optimizer step: forward, backward, clip, AdamW; dropout 0 and 0.1
             (FLOPs per token 6N + 12*L*T*C, PaLM / nanoGPT, N without wpe)
  eval       forward + mean next-token loss, no grad ((2N + 4*L*T*C) FLOPs per token)
  generate   greedy, 8-token prompt, --new_tokens new tokens, batch 1 and 8; the compile
             (first call) reported apart
  tokenize   tiktoken encode_ordinary_batch (all cores) vs GPT2TokenizerFast called as
             run_clm.py does (batches of 1000 rows)
  loader     gpt2_jax's BatchLoader batches/s vs what the train step consumes

Writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/ratios.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIZES = {  # (n_layer, n_head, n_embd)
    "tiny": (2, 4, 128),
    "gpt2": (12, 12, 768),
}
VOCAB = 50257


# ------------------------------------------------------------------ shared helpers


def model_flops_per_token(n_params_no_wpe: int, L: int, T: int, C: int, train: bool) -> float:
    """6N + 12LTC for a training step (forward + backward), a third of it for a forward."""
    per = 6 * n_params_no_wpe + 12 * L * T * C
    return per if train else per / 3


def n_params_no_wpe(L: int, C: int, T: int) -> int:
    """GPT-2 parameter count without the position table (nanoGPT's non_embedding)."""
    block = 12 * C * C + 13 * C  # c_attn, c_proj, c_fc, c_proj weights + biases + 2 LN
    return VOCAB * C + L * block + 2 * C


def _median_time(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------ jax worker


def jax_worker(task: dict) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from gpt2_jax.config import base as config_lib
    from gpt2_jax.model import config as gpt2_config
    from gpt2_jax.model import gpt2 as model_lib
    from gpt2_jax.model import losses as losses_lib
    from gpt2_jax.optim import optimizer as optim
    from gpt2_jax.train import step as step_lib

    kind = task["kind"]
    if kind == "matmul":
        return _jax_matmul(task)
    if kind == "tokenize":
        from gpt2_jax.data import tokenizer

        enc = tokenizer.get_tokenizer()
        rows = _text_rows(task["text"])
        t0 = time.perf_counter()
        n = sum(len(x) for x in enc.encode_ordinary_batch(rows, num_threads=os.cpu_count()))
        return {"step_s": time.perf_counter() - t0, "tokens": n}
    if kind == "loader":
        from gpt2_jax import data as data_lib

        rng, B, T = np.random.default_rng(0), task["batch"], task["seq"]
        tokens = rng.integers(0, VOCAB, 4_000_000).astype(np.uint16)
        offsets = np.arange(0, len(tokens) + 1, 400)
        blocks = data_lib.Blocks(tokens, offsets, T, 1000)
        loader = data_lib.BatchLoader(len(blocks), B, 0)
        n = 200
        t0 = time.perf_counter()
        for s in range(n):
            loader.batch(blocks, s)
        return {"step_s": (time.perf_counter() - t0) / n}
    L, H, C = SIZES[task["size"]]
    B, T = task["batch"], task["seq"]
    drop = task.get("dropout", 0.0)
    cfg = gpt2_config.GPT2Config(
        n_layer=L, n_head=H, n_embd=C, n_positions=max(1024, T),
        resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop,
    )  # fmt: skip
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    if kind == "train":
        ocfg = config_lib.base_config().optim
        tx, _ = optim.make_optimizer(ocfg, 1000)
        state = step_lib.init_state(jax.random.PRNGKey(0), model_cfg=cfg, tx=tx, params=params)
        step = jax.jit(
            functools.partial(step_lib.train_step, model_cfg=cfg, tx=tx), donate_argnums=0
        )
        batch = jnp.asarray(rng.integers(0, VOCAB, (1, B, T)), jnp.int32)
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        first = time.perf_counter() - t0
        holder = [state]

        def run():
            holder[0], m = step(holder[0], batch)
            jax.block_until_ready(m["loss"])

        return {"first_s": first, "step_s": _median_time(run, task["steps"])}
    if kind == "eval":
        fn = jax.jit(
            lambda p, ids: losses_lib.token_nll(
                model_lib.GPT2(cfg).apply({"params": p}, ids), ids
            ).mean()
        )
        batch = jnp.asarray(rng.integers(0, VOCAB, (B, T)), jnp.int32)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, batch))
        first = time.perf_counter() - t0
        return {
            "first_s": first,
            "step_s": _median_time(lambda: jax.block_until_ready(fn(params, batch)), task["steps"]),
        }
    if kind == "generate":
        from gpt2_jax.evaluation import generate as gen

        prompts = rng.integers(0, VOCAB, (B, 8)).tolist()
        n = task["new_tokens"]
        t0 = time.perf_counter()
        gen.generate_batch(cfg, params, prompts, n, temperature=0.0, stop_token=None)
        first = time.perf_counter() - t0
        step = _median_time(
            lambda: gen.generate_batch(cfg, params, prompts, n, temperature=0.0, stop_token=None),
            task["steps"],
        )
        return {"first_s": first, "step_s": step}
    raise ValueError(kind)


def _jax_matmul(task: dict) -> dict:
    import jax
    import jax.numpy as jnp

    out = {}
    for M, K, N in _matmul_shapes(task):
        a = jnp.ones((M, K), jnp.float32)
        b = jnp.ones((K, N), jnp.float32)
        f = jax.jit(jnp.dot)
        jax.block_until_ready(f(a, b))
        t = _median_time(lambda f=f, a=a, b=b: jax.block_until_ready(f(a, b)), task["steps"])
        out[f"{M}x{K}x{N}"] = 2 * M * K * N / t / 1e9
    return {"gflops": out}


def _matmul_shapes(task: dict) -> list[tuple[int, int, int]]:
    _, _, C = SIZES["gpt2"]
    M = task["batch"] * task["seq"]
    return [(M, C, 3 * C), (M, C, 4 * C), (M, 4 * C, C), (M, C, VOCAB)]


def _text_rows(path: str) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


# ------------------------------------------------------------------ torch worker


def torch_worker(task: dict) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(task["threads"])
    torch.manual_seed(0)
    kind = task["kind"]
    if kind == "matmul":
        out = {}
        for M, K, N in _matmul_shapes(task):
            a, b = torch.ones(M, K), torch.ones(K, N)
            a @ b
            t = _median_time(lambda a=a, b=b: a @ b, task["steps"])
            out[f"{M}x{K}x{N}"] = 2 * M * K * N / t / 1e9
        return {"gflops": out}
    if kind == "tokenize":
        import shutil
        import tempfile

        from transformers import GPT2TokenizerFast

        from gpt2_jax.data import tokenizer

        # A Hugging Face GPT-2 tokenizer directory from the same two files (what run_clm
        # loads from the hub: vocab.json = encoder.json, merges.txt = vocab.bpe).
        encoder_json, vocab_bpe = tokenizer.vocab_files()
        directory = Path(tempfile.mkdtemp())
        shutil.copyfile(encoder_json, directory / "vocab.json")
        shutil.copyfile(vocab_bpe, directory / "merges.txt")
        tok = GPT2TokenizerFast.from_pretrained(directory)
        rows = _text_rows(task["text"])
        t0 = time.perf_counter()
        n = 0
        for i in range(0, len(rows), 1000):  # datasets.map(batched=True)'s batch
            n += sum(len(x) for x in tok(rows[i : i + 1000])["input_ids"])
        return {"step_s": time.perf_counter() - t0, "tokens": n}
    import transformers

    L, H, C = SIZES[task["size"]]
    B, T = task["batch"], task["seq"]
    drop = task.get("dropout", 0.0)
    hf_cfg = transformers.GPT2Config(
        n_layer=L, n_head=H, n_embd=C, n_positions=max(1024, T), vocab_size=VOCAB,
        resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(hf_cfg)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, VOCAB, (B, T)))
    if kind == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

        def run():
            loss = model(ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        return {"first_s": first, "step_s": _median_time(run, task["steps"])}
    model.eval()
    if kind == "eval":

        def run():
            with torch.no_grad():
                model(ids, labels=ids).loss.item()

        t0 = time.perf_counter()
        run()
        return {"first_s": time.perf_counter() - t0, "step_s": _median_time(run, task["steps"])}
    if kind == "generate":
        prompt = ids[:, :8]
        n = task["new_tokens"]

        def run():
            with torch.no_grad():
                model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=VOCAB - 1,
                )

        t0 = time.perf_counter()
        run()
        return {"first_s": time.perf_counter() - t0, "step_s": _median_time(run, task["steps"])}
    raise ValueError(kind)


# ------------------------------------------------------------------ the parent


# The glibc variables that equal what gpt2_jax's CLI sets in-process (core/allocator.py's
# tune(): one arena, no mmap, never trim); set from the start here, for either framework.
GLIBC_TUNED = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
}


def run_worker(framework: str, task: dict, threads: int, torch_malloc: str = "system") -> dict:
    from gpt2_jax.core import allocator

    env = dict(os.environ)
    # gpt2_jax as its CLI runs (allocator.tune); PyTorch as run_clm.py users run it, or
    # with the same glibc settings (--torch_malloc=tuned)
    if allocator.skip_reason(env) is None and (framework == "jax" or torch_malloc == "tuned"):
        env.update(GLIBC_TUNED)
    env.setdefault("PYTHONPATH", str(ROOT))
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, f"--worker={framework}", f"--task={json.dumps(task)}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} worker failed on {task}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _jax_malloc() -> str:
    from gpt2_jax.core import allocator

    reason = allocator.skip_reason(os.environ)
    return "tuned (gpt2_jax/core/allocator.py)" if reason is None else f"system ({reason})"


def plan(a) -> list[dict]:
    tasks = [{"kind": "matmul", "batch": a.batch, "seq": max(a.seqs)}]
    for size in a.sizes:
        for T in a.seqs:
            for drop in (0.0, 0.1):
                tasks.append({"kind": "train", "size": size, "seq": T, "dropout": drop})
            tasks.append({"kind": "eval", "size": size, "seq": T})
        for gb in (1, 8):
            tasks.append({"kind": "generate", "size": size, "seq": 8, "gen_batch": gb})
    tasks.append({"kind": "tokenize", "text": a.text})
    return tasks


def measure(a) -> list[dict]:
    rows = []
    for task in plan(a):
        task = {"batch": a.batch, "steps": a.steps, "threads": a.threads, **task}
        if task["kind"] == "generate":
            task["batch"] = task.pop("gen_batch")
            task["new_tokens"] = a.new_tokens
            task["steps"] = max(1, min(a.steps, 3))
        res = {fw: run_worker(fw, task, a.threads, a.torch_malloc) for fw in ("jax", "torch")}
        rows.append(_summarise(task, res))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    # The input pipeline vs the step that consumes it (largest train shape).
    for size in a.sizes:
        T = max(a.seqs)
        loader = run_worker("jax", {"kind": "loader", "batch": a.batch, "seq": T}, a.threads)
        train = next(
            r for r in rows
            if r["kind"] == "train" and r["size"] == size and r["seq"] == T and r["dropout"] == 0
        )  # fmt: skip
        rows.append(
            {
                "kind": "loader",
                "size": size,
                "seq": T,
                "batch": a.batch,
                "loader_batches_per_s": 1 / loader["step_s"],
                "train_steps_per_s": 1 / train["jax"]["step_s"],
                "headroom": train["jax"]["step_s"] / loader["step_s"],
            }
        )
    return rows


def _summarise(task: dict, res: dict) -> dict:
    row = {k: v for k, v in task.items() if k not in ("steps", "threads", "text")}
    if task["kind"] == "matmul":
        row["jax_gflops"] = res["jax"]["gflops"]
        row["torch_gflops"] = res["torch"]["gflops"]
        row["limit_gflops"] = max(max(res["jax"]["gflops"].values()), 1e-9)
        return row
    for fw in ("jax", "torch"):
        r = dict(res[fw])
        if task["kind"] in ("train", "eval"):
            r["tokens_per_s"] = task["batch"] * task["seq"] / r["step_s"]
        elif task["kind"] == "generate":
            r["tokens_per_s"] = task["batch"] * task["new_tokens"] / r["step_s"]
        elif task["kind"] == "tokenize":
            r["tokens_per_s"] = r["tokens"] / r["step_s"]
        row[fw] = r
    row["ratio"] = row["jax"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
    return row


def add_fractions(rows: list[dict]) -> None:
    """Model FLOP/s as a fraction of the measured fp32 matmul rate."""
    limit = next(r["limit_gflops"] for r in rows if r["kind"] == "matmul") * 1e9
    for r in rows:
        if r["kind"] not in ("train", "eval"):
            continue
        L, _, C = SIZES[r["size"]]
        fpt = model_flops_per_token(n_params_no_wpe(L, C, r["seq"]), L, r["seq"], C,
                                    train=r["kind"] == "train")  # fmt: skip
        for fw in ("jax", "torch"):
            r[fw]["fraction_of_matmul_limit"] = r[fw]["tokens_per_s"] * fpt / limit


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers", "tiktoken"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            out[name] = None
    return out


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {cpu}, {mem:.0f} GiB, {platform.system()}"


def markdown(rows: list[dict], meta: dict) -> str:
    out = [
        f"Measured {meta['date']} on {meta['machine']}; threads={meta['threads']}; "
        f"versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.",
        f"Command: `{meta['command']}`",
        f"glibc malloc: gpt2_jax {meta['malloc']['jax']}, PyTorch {meta['malloc']['torch']}.",
        "",
    ]
    mm = next(r for r in rows if r["kind"] == "matmul")
    out.append(
        "fp32 matmul limit (best of the model's shapes): "
        f"jax {max(mm['jax_gflops'].values()):.0f} GFLOP/s, "
        f"torch {max(mm['torch_gflops'].values()):.0f} GFLOP/s"
    )
    out += [
        "",
        "| work | size | B x T | dropout | gpt2_jax tok/s | HF PyTorch tok/s | ratio "
        "| jax % of matmul limit | torch % | jax compile / first call s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["kind"] in ("matmul", "loader"):
            continue
        j, t = r["jax"], r["torch"]

        def frac(x):
            if "fraction_of_matmul_limit" not in x:
                return ""
            return f"{100 * x['fraction_of_matmul_limit']:.0f}%"

        shape = f"{r['batch']} x {r['seq']}" if r["kind"] != "tokenize" else ""
        if r["kind"] == "generate":
            shape = f"{r['batch']} x (8 + {r['new_tokens']})"
        out.append(
            f"| {r['kind']} | {r.get('size', '')} | {shape} | {r.get('dropout', '')} "
            f"| {j['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {r['ratio']:.2f}x "
            f"| {frac(j)} | {frac(t)} | {j.get('first_s', 0):.1f} |"
        )
    out += ["", "| input pipeline | size | B x T | loader batches/s | train steps/s | headroom |",
            "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        if r["kind"] == "loader":
            out.append(
                f"| BatchLoader | {r['size']} | {r['batch']} x {r['seq']} "
                f"| {r['loader_batches_per_s']:.0f} | {r['train_steps_per_s']:.2f} "
                f"| {r['headroom']:.0f}x |"
            )
    return "\n".join(out) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [r for r in rows if "ratio" in r]
    labels = []
    for r in bars:
        if r["kind"] in ("train", "eval"):
            extra = f" p={r['dropout']}" if r["kind"] == "train" else ""
            labels.append(f"{r['kind']} {r['size']} T={r['seq']}{extra}")
        elif r["kind"] == "generate":
            labels.append(f"generate {r['size']} B={r['batch']}")
        else:
            labels.append(r["kind"])
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(bars) + 1.5))
    y = range(len(bars))
    ax.barh(list(y), [r["ratio"] for r in bars], color="tab:blue")
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel("gpt2_jax tokens/s ÷ Hugging Face PyTorch tokens/s (higher is better)")
    ax.set_title("gpt2_jax vs HF PyTorch, same machine, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", choices=("jax", "torch"))
    p.add_argument("--task")
    p.add_argument("--sizes", default="tiny,gpt2")
    p.add_argument("--seqs", default="128,512")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed repetitions (median)")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--text", default=str(ROOT / "tests" / "data" / "wiki.test.head.raw"))
    p.add_argument("--quick", action="store_true", help="T=32, 2 steps, 16 new tokens")
    p.add_argument(
        "--torch_malloc",
        choices=("system", "tuned"),
        default="system",
        help="system: PyTorch as run_clm.py users run it; tuned: with the glibc malloc "
        "settings gpt2_jax applies to itself (gpt2_jax/core/allocator.py)",
    )
    p.add_argument("--out", default=str(ROOT / "experiments" / "benchmark" / "results"))
    a = p.parse_args(argv)
    if a.worker:
        fn = jax_worker if a.worker == "jax" else torch_worker
        print(json.dumps(fn(json.loads(a.task))))
        return 0
    a.sizes = a.sizes.split(",")
    a.seqs = [int(s) for s in a.seqs.split(",")]
    if a.quick:
        a.seqs, a.steps, a.new_tokens = [32], 2, 16
    if not Path(a.text).is_file():
        p.error(f"--text={a.text}: no such file (a text file to tokenize)")
    rows = measure(a)
    add_fractions(rows)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "threads": a.threads,
        "malloc": {"jax": _jax_malloc(), "torch": a.torch_malloc},
        "versions": versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "results.md").write_text(markdown(rows, meta))
    chart(rows, out / "ratios.png")
    print(out / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
