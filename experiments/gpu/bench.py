"""gpt2_jax against Hugging Face PyTorch on one GPU, side by side, in one run (run.sh's bench).

    python experiments/gpu/bench.py --out=bench.json [--deadline=EPOCH_S] [--dry-run]

PyTorch as its users run it on a GPU: ``GPT2LMHeadModel`` with SDPA attention, bf16 autocast
over fp32 weights, ``torch.optim.AdamW(fused=True)``, gradient clipping at 1.0. gpt2_jax as
its train loop runs: ``train.train_step`` jitted with the state donated, bf16 compute over
fp32 parameters (``model.dtype=bfloat16``), its fused AdamW and clipping, cuDNN attention.
Same shapes on both sides, random token ids, dropout 0 (a second pair with dropout 0.1, where
gpt2_jax leaves cuDNN for its XLA attention, runs last, if time is left).

Work (GPT-2 124M; --dry-run: a 2-layer model at tiny shapes on the CPU, same code):
  train         one optimizer step at batch 16 x 1024: tokens/s (median of 3 timed runs
                of 10 steps), MFU = tokens/s x flops.flops_per_token / the device's dense
                bf16 peak (gpt2_jax/flops.py), compile (jax) / first step (torch) seconds
  eval          forward + mean next-token loss at 16 x 1024 (what `gpt2-jax eval` jits)
  generate_1/8  greedy, 8-token prompts, 256 new tokens, batch 1 and 8, bf16 weights on both
                sides; tokens/s = batch x 256 / seconds (median of 3, compile apart)
  matmul        8192^3 bf16 jnp.dot (TFLOP/s): the measured ceiling beside the datasheet's

Each group of tasks runs in its own worker process (jax and torch never share the GPU), in
the order of GROUPS, each stopped at its time limit or at --deadline; a worker writes one JSON
line per finished task, so a stopped or crashed worker loses only its unfinished tasks, which
are reported with the reason. Writes --out (JSON: meta, rows, errors, summary) and prints a
table. Exit 0 even when tasks failed: their errors are in the JSON (run.sh fails only on
failed GPU tests).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 50257

SHAPES = {
    "gpu": dict(
        model=(12, 12, 768), n_positions=1024, batch=16, seq=1024,
        warmup=3, reps=3, steps=10, prompt=8, new_tokens=256, gen_reps=3, matmul=8192,
    ),
    "dry": dict(
        model=(2, 2, 64), n_positions=128, batch=2, seq=64,
        warmup=1, reps=2, steps=2, prompt=8, new_tokens=8, gen_reps=2, matmul=256,
    ),
}  # fmt: skip

# (framework, tasks, time limit in seconds), in order of importance.
GROUPS = [
    ("jax", ["train"], 150),
    ("torch", ["train"], 90),
    ("jax", ["eval", "generate_1", "generate_8"], 150),
    ("torch", ["eval", "generate_1", "generate_8"], 120),
    ("jax", ["matmul"], 45),
    ("jax", ["train_dropout"], 120),
    ("torch", ["train_dropout"], 60),
]


def _median_rate(run, units: float, reps: int) -> tuple[float, list[float]]:
    """``units`` / the median seconds of ``reps`` calls of ``run`` (which synchronizes)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return units / statistics.median(times), times


# ------------------------------------------------------------------ jax worker


def _jax_cfg(shape: dict, dropout: float = 0.0, param_dtype: str = "float32"):

    from gpt2_jax.model import config as gpt2_config

    L, H, C = shape["model"]
    return gpt2_config.GPT2Config(
        n_layer=L, n_head=H, n_embd=C, n_positions=shape["n_positions"], vocab_size=VOCAB,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        dtype="bfloat16", param_dtype=param_dtype,
    )  # fmt: skip


def _jax_mfu(cfg, seq: int, tokens_per_s: float, kind: str) -> dict:
    from gpt2_jax.model import flops

    peak = flops.peak_flops(kind, "bfloat16")
    out = {"flops_per_token": flops.flops_per_token(cfg, seq), "peak_flops": peak}
    out["mfu"] = tokens_per_s * out["flops_per_token"] / peak if peak else None
    return out


def jax_train(shape: dict, dropout: float = 0.0) -> dict:
    import functools

    import jax
    import numpy as np

    from gpt2_jax.config import base as config_lib
    from gpt2_jax.optim import optimizer as optim
    from gpt2_jax.train import step as step_lib

    cfg = _jax_cfg(shape, dropout)
    B, T = shape["batch"], shape["seq"]
    ocfg = config_lib.base_config().optim  # AdamW, clip 1.0, no weight decay, as torch's
    tx, _ = optim.make_optimizer(ocfg, 1000)
    init = jax.jit(functools.partial(step_lib.init_state, model_cfg=cfg, tx=tx))
    state = init(jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(step_lib.train_step, model_cfg=cfg, tx=tx), donate_argnums=0)
    batch = jax.device_put(np.random.default_rng(0).integers(0, VOCAB, (1, B, T)).astype(np.int32))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m["loss"])
    first_step_s = time.perf_counter() - t0
    for _ in range(shape["warmup"]):
        state, m = compiled(state, batch)
    jax.block_until_ready(m["loss"])
    holder = {"state": state, "m": m}

    def run():
        for _ in range(shape["steps"]):
            holder["state"], holder["m"] = compiled(holder["state"], batch)
        jax.block_until_ready(holder["m"]["loss"])

    tps, times = _median_rate(run, B * T * shape["steps"], shape["reps"])
    loss = float(holder["m"]["loss"])
    dev = jax.devices()[0]
    return {
        "batch": B, "seq": T, "dropout": dropout, "tokens_per_s": tps,
        "step_ms": 1000 * B * T / tps, "compile_s": compile_s, "first_step_s": first_step_s,
        "run_s": times, "loss": loss, "loss_finite": bool(np.isfinite(loss)),
        "peak_bytes_in_use": (dev.memory_stats() or {}).get("peak_bytes_in_use"),
        "attention": "cuDNN" if dropout == 0 and dev.platform == "gpu" else "XLA",
        **_jax_mfu(cfg, T, tps, dev.device_kind),
    }  # fmt: skip


def jax_eval(shape: dict) -> dict:
    import jax
    import numpy as np

    from gpt2_jax.evaluation import perplexity as evaluate
    from gpt2_jax.model import gpt2 as model_lib

    cfg = _jax_cfg(shape)
    B, T = shape["batch"], shape["seq"]
    params = jax.jit(lambda k: model_lib.init_params(cfg, k))(jax.random.PRNGKey(0))
    ids = jax.device_put(np.random.default_rng(0).integers(0, VOCAB, (B, T)).astype(np.int32))
    weights = jax.device_put(np.ones((B,), np.float32))
    t0 = time.perf_counter()
    compiled = evaluate._blocks_nll_sum.lower(cfg, params, ids, weights).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, ids, weights))

    def run():
        out = [compiled(params, ids, weights) for _ in range(shape["steps"])]
        jax.block_until_ready(out)

    tps, times = _median_rate(run, B * T * shape["steps"], shape["reps"])
    return {"batch": B, "seq": T, "tokens_per_s": tps, "compile_s": compile_s, "run_s": times}


def jax_generate(shape: dict, batch: int) -> dict:
    import jax
    import numpy as np

    from gpt2_jax.evaluation import generate as gen
    from gpt2_jax.model import gpt2 as model_lib

    cfg = _jax_cfg(shape, param_dtype="bfloat16")
    params = gen.decode_params(cfg, model_lib.init_params(cfg, jax.random.PRNGKey(0)))
    prompts = np.random.default_rng(0).integers(0, VOCAB, (batch, shape["prompt"])).tolist()
    n = shape["new_tokens"]
    stats = gen.Stats()
    t0 = time.perf_counter()
    rows = [c for c in gen.stream_batch(cfg, params, prompts, n, temperature=0.0, stats=stats)]
    first_s = time.perf_counter() - t0
    assert sum(c.shape[1] for c in rows) == n, "generation stopped early"

    def run():
        gen.generate_batch(cfg, params, prompts, n, temperature=0.0)

    tps, times = _median_rate(run, batch * n, shape["gen_reps"])
    return {
        "batch": batch, "prompt": shape["prompt"], "new_tokens": n, "tokens_per_s": tps,
        "compile_s": stats.compile_seconds, "first_call_s": first_s, "run_s": times,
    }  # fmt: skip


def jax_matmul(shape: dict) -> dict:
    import jax
    import jax.numpy as jnp

    N = shape["matmul"]
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (N, N), jnp.bfloat16)  # random data: zeros run faster
    b = jax.random.normal(kb, (N, N), jnp.bfloat16)
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(a, b))

    def run():
        jax.block_until_ready([f(a, b) for _ in range(10)])

    rate, times = _median_rate(run, 10 * 2 * N**3, 5)
    return {"n": N, "tflops": rate / 1e12, "run_s": times}


JAX_TASKS = {
    "train": jax_train,
    "train_dropout": lambda s: jax_train(s, dropout=0.1),
    "eval": jax_eval,
    "generate_1": lambda s: jax_generate(s, 1),
    "generate_8": lambda s: jax_generate(s, 8),
    "matmul": jax_matmul,
}


def jax_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "device": str(d)}


# ------------------------------------------------------------------ torch worker


def _torch_model(shape: dict, dropout: float = 0.0):
    import torch
    import transformers

    L, H, C = shape["model"]
    hf_cfg = transformers.GPT2Config(
        n_layer=L, n_head=H, n_embd=C, n_positions=shape["n_positions"], vocab_size=VOCAB,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_cfg).to(_torch_device())
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_train(shape: dict, dropout: float = 0.0) -> dict:
    import torch

    dev = _torch_device()
    model = _torch_model(shape, dropout).train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.0, fused=True)
    B, T = shape["batch"], shape["seq"]
    ids = torch.randint(0, VOCAB, (B, T), device=dev, generator=None)
    losses = []

    def step():
        with torch.autocast(device_type=dev, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    t0 = time.perf_counter()
    step()
    _sync()
    first_step_s = time.perf_counter() - t0
    for _ in range(shape["warmup"]):
        step()
    _sync()

    def run():
        for _ in range(shape["steps"]):
            step()
        _sync()

    tps, times = _median_rate(run, B * T * shape["steps"], shape["reps"])
    loss = float(losses[-1])
    return {
        "batch": B, "seq": T, "dropout": dropout, "tokens_per_s": tps,
        "step_ms": 1000 * B * T / tps, "first_step_s": first_step_s, "run_s": times,
        "loss": loss, "loss_finite": loss == loss and abs(loss) != float("inf"),
        "peak_bytes_in_use": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
        "attention": "sdpa", **_torch_mfu(shape, tps),
    }  # fmt: skip


def _torch_mfu(shape: dict, tokens_per_s: float) -> dict:
    # The same FLOPs per token (gpt2_jax/flops.py) and peak as the jax side's.
    import torch

    from gpt2_jax.model import flops

    cfg = _jax_cfg(shape)
    kind = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = flops.peak_flops(kind, "bfloat16")
    fpt = flops.flops_per_token(cfg, shape["seq"])
    return {
        "flops_per_token": fpt,
        "peak_flops": peak,
        "mfu": tokens_per_s * fpt / peak if peak else None,
    }


def torch_eval(shape: dict) -> dict:
    import torch

    dev = _torch_device()
    model = _torch_model(shape).eval()
    B, T = shape["batch"], shape["seq"]
    ids = torch.randint(0, VOCAB, (B, T), device=dev)

    def one():
        with torch.no_grad(), torch.autocast(device_type=dev, dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids).loss

    t0 = time.perf_counter()
    one()
    _sync()
    first_s = time.perf_counter() - t0

    def run():
        out = [one() for _ in range(shape["steps"])]
        _sync()
        return out

    tps, times = _median_rate(run, B * T * shape["steps"], shape["reps"])
    return {"batch": B, "seq": T, "tokens_per_s": tps, "first_call_s": first_s, "run_s": times}


def torch_generate(shape: dict, batch: int) -> dict:
    import torch

    dev = _torch_device()
    model = _torch_model(shape).to(torch.bfloat16).eval()
    prompt = torch.randint(0, VOCAB, (batch, shape["prompt"]), device=dev)
    n = shape["new_tokens"]

    def run():
        with torch.no_grad():
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                min_new_tokens=n, do_sample=False, pad_token_id=VOCAB - 1,
            )  # fmt: skip
        _sync()
        assert out.shape[1] == shape["prompt"] + n, out.shape

    t0 = time.perf_counter()
    run()
    first_s = time.perf_counter() - t0
    tps, times = _median_rate(run, batch * n, shape["gen_reps"])
    return {
        "batch": batch, "prompt": shape["prompt"], "new_tokens": n, "tokens_per_s": tps,
        "first_call_s": first_s, "run_s": times,
    }  # fmt: skip


TORCH_TASKS = {
    "train": torch_train,
    "train_dropout": lambda s: torch_train(s, dropout=0.1),
    "eval": torch_eval,
    "generate_1": lambda s: torch_generate(s, 1),
    "generate_8": lambda s: torch_generate(s, 8),
}


def torch_info() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "platform": "gpu" if cuda else "cpu",
        "device_kind": torch.cuda.get_device_name() if cuda else "cpu",
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
    }


def worker(framework: str, tasks: list[str], shape_name: str, results: Path) -> int:
    shape = SHAPES[shape_name]
    table, info = (JAX_TASKS, jax_info) if framework == "jax" else (TORCH_TASKS, torch_info)
    try:
        base = {"framework": framework, **info()}
    except Exception as e:  # e.g. the framework is not installed: every task says why
        why = f"{framework} did not start: {type(e).__name__}: {e}"[:3000]
        with results.open("a") as f:
            for task in tasks:
                f.write(json.dumps({"framework": framework, "task": task, "error": why}) + "\n")
        print(f"bench: {why}", file=sys.stderr, flush=True)
        return 1
    for task in tasks:
        print(f"bench: {framework} {task} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            row = {**base, "task": task, **table[task](shape)}
        except Exception as e:  # recorded, and the next task runs
            row = {**base, "task": task, "error": f"{type(e).__name__}: {e}"[:3000]}
        row["wall_s"] = time.perf_counter() - t0
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"bench: {json.dumps(_short(row))}", file=sys.stderr, flush=True)
        gc.collect()
        if framework == "jax":
            import jax

            jax.clear_caches()
        elif framework == "torch":
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return 0


def _short(row: dict) -> dict:
    keep = ("framework", "task", "tokens_per_s", "mfu", "compile_s", "first_step_s",
            "first_call_s", "tflops", "error", "wall_s")  # fmt: skip
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k in keep}


# ------------------------------------------------------------------ the parent


def run_group(framework, tasks, limit_s, shape_name, work: Path) -> list[dict]:
    results = work / f"{framework}-{'-'.join(tasks)}.jsonl"
    results.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, f"--worker={framework}", f"--tasks={','.join(tasks)}",
           f"--shape={shape_name}", f"--results={results}"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    why = None
    try:
        rc = proc.wait(timeout=limit_s)
        if rc != 0:
            why = f"the {framework} worker exited with {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        why = f"stopped at its time limit ({limit_s:.0f} s)"
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    done = {r["task"] for r in rows}
    for task in tasks:
        if task not in done:
            rows.append({"framework": framework, "task": task, "error": f"not finished: {why}"})
    return rows


def summarise(rows: list[dict]) -> dict:
    by = {(r["framework"], r["task"]): r for r in rows}
    out = {}
    for task in ("train", "train_dropout", "eval", "generate_1", "generate_8"):
        j, t = by.get(("jax", task), {}), by.get(("torch", task), {})
        s = {
            "jax_tokens_per_s": j.get("tokens_per_s"),
            "torch_tokens_per_s": t.get("tokens_per_s"),
        }
        if s["jax_tokens_per_s"] and s["torch_tokens_per_s"]:
            s["ratio"] = s["jax_tokens_per_s"] / s["torch_tokens_per_s"]
        for k in ("mfu", "compile_s"):
            if j.get(k) is not None:
                s[f"jax_{k}"] = j[k]
        if t.get("mfu") is not None:
            s["torch_mfu"] = t["mfu"]
        if t.get("first_step_s", t.get("first_call_s")) is not None:
            s["torch_first_call_s"] = t.get("first_step_s", t.get("first_call_s"))
        out[task] = s
    if ("jax", "matmul") in by and "tflops" in by[("jax", "matmul")]:
        out["matmul_bf16_tflops"] = by[("jax", "matmul")]["tflops"]
        tr = by.get(("jax", "train"), {})
        if tr.get("tokens_per_s"):
            achieved = tr["tokens_per_s"] * tr["flops_per_token"] / 1e12
            out["train"]["jax_fraction_of_measured_matmul"] = achieved / out["matmul_bf16_tflops"]
    # The issue's targets: recorded, not asserted.
    tr = out["train"]
    out["targets"] = {
        "jax_train_mfu_at_least_0.45": None if tr.get("jax_mfu") is None else tr["jax_mfu"] >= 0.45,
        "train_ratio_at_least_1.3": None if tr.get("ratio") is None else tr["ratio"] >= 1.3,
    }
    return out


def table(rows: list[dict], summary: dict) -> str:
    head = ("work", "gpt2_jax tok/s", "HF PyTorch tok/s", "ratio", "jax MFU", "torch MFU",
            "jax compile s", "torch first call s")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"

    for task, s in summary.items():
        ran = isinstance(s, dict) and (s.get("jax_tokens_per_s") or s.get("torch_tokens_per_s"))
        if not ran:
            continue  # not run (--only), or failed on both sides: in the errors below
        lines.append(
            f"| {task} | {f(s['jax_tokens_per_s'], '.0f')} | {f(s['torch_tokens_per_s'], '.0f')} "
            f"| {f(s.get('ratio'), '.2f')} | {f(s.get('jax_mfu'), '.1%')} "
            f"| {f(s.get('torch_mfu'), '.1%')} | {f(s.get('jax_compile_s'), '.1f')} "
            f"| {f(s.get('torch_first_call_s'), '.1f')} |"
        )
    if "matmul_bf16_tflops" in summary:
        lines.append(f"\nbf16 matmul 8192^3 (jax): {summary['matmul_bf16_tflops']:.0f} TFLOP/s")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        lines.append(f"error: {r['framework']} {r['task']}: {r['error'][:300]}")
    return "\n".join(lines)


def versions() -> dict:
    from importlib import metadata

    names = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
             "flax", "optax", "orbax-checkpoint", "numpy", "torch", "transformers")  # fmt: skip
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help="the JSON file to write")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes (the CPU's dry run)")
    p.add_argument("--deadline", type=float, default=0.0, help="epoch seconds: start nothing after")
    p.add_argument("--only", help="comma-separated tasks (default: all)")
    p.add_argument("--worker", choices=("jax", "torch"))
    p.add_argument("--tasks")
    p.add_argument("--shape", choices=tuple(SHAPES))
    p.add_argument("--results")
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.tasks.split(","), a.shape, Path(a.results))
    if not a.out:
        p.error("--out is required")
    shape_name = "dry" if a.dry_run else "gpu"
    out = Path(a.out)
    work = out.parent / (out.stem + "_work")
    work.mkdir(parents=True, exist_ok=True)
    deadline = a.deadline or time.time() + 3600
    started = time.time()
    groups = GROUPS
    if a.only:
        keep = set(a.only.split(","))
        groups = [(f, [t for t in ts if t in keep], lim) for f, ts, lim in groups]
        groups = [g for g in groups if g[1]]
    if a.dry_run:  # one worker a framework: the CPU's process starts are what costs there
        groups = [
            (
                fw,
                [t for f, ts, _ in groups if f == fw for t in ts],
                sum(lim for f, _, lim in groups if f == fw),
            )
            for fw in ("jax", "torch")
        ]
        groups = [g for g in groups if g[1]]
    rows = []
    for framework, tasks, limit in groups:
        left = deadline - time.time()
        if left < 10:
            rows += [
                {"framework": framework, "task": t, "error": "not run: out of time"} for t in tasks
            ]
            continue
        rows += run_group(framework, tasks, min(limit, left), shape_name, work)
    summary = summarise(rows)
    result = {
        "meta": {
            "shape": shape_name, **SHAPES[shape_name], "versions": versions(),
            "seconds": time.time() - started, "groups": [g[:2] for g in groups],
        },
        "rows": rows,
        "errors": [f"{r['framework']} {r['task']}: {r['error']}" for r in rows if "error" in r],
        "summary": summary,
    }  # fmt: skip
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
