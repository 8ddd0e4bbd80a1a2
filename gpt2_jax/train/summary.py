"""What a run is about to do and what it did, as short text: stdout, TensorBoard, eval table.

``start_summary`` is one screen printed before the first step (model, weights, devices and
mesh, batch, steps and epochs, blocks per split, cadence, workdir); ``end_summary`` gives
the final metrics, wall time and the paths written. ``write_tensorboard`` stores both,
with the resolved config, as TensorBoard text. Every function takes plain values (the
config as a dict), so this module needs neither jax nor the training loop.
"""

from __future__ import annotations

import json
from pathlib import Path

from gpt2_jax.core import allocator

_INDENT = "  "


def _row(name: str, text: str) -> str:
    return f"{_INDENT}{name:<11} {text}"


def _every(n: int, what: str, never: str) -> str:
    if not n:
        return f"{what} {never}"
    return f"{what} every step" if n == 1 else f"{what} every {n:,} steps"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def weights_source(resume_checkpoint: str | Path | None, init_from: str, seed: int) -> str:
    """Where the weights come from, in words: a checkpoint, ``hf:...`` or scratch."""
    if resume_checkpoint is not None:
        return f"checkpoint {resume_checkpoint} (resuming)"
    if init_from:
        return f"{init_from} (Hugging Face weights)"
    return f"scratch (random init, train.seed={seed})"


def start_summary(
    config: dict,
    *,
    params: int,
    device_count: int,
    process_count: int,
    platform: str,
    mesh_shape: dict,
    start_step: int,
    total_steps: int,
    steps_per_epoch: int,
    blocks: dict[str, int],
    weights: str,
    workdir: str | Path,
    data: str = "",
    trainable: int | None = None,
) -> str:
    """The start-of-run screen. ``config``: the resolved config as a dict (``to_dict``);
    ``blocks``: examples per split, e.g. ``{"train": 2088, "validation": 95}``; ``data``:
    how the tokens were had (``data.cache_report``: tokenized in how long, or reused);
    ``params``: every parameter, ``trainable`` the ones trained (LoRA's adapters)."""
    m, t, d, o = config["model"], config["train"], config["data"], config["optim"]
    shape = (
        f"{_plural(m['n_layer'], 'layer')} x {_plural(m['n_head'], 'head')} x n_embd {m['n_embd']}"
        if m.get("n_layer")
        else f"size {m.get('size')!r}"
    )
    block = d["block_size"]
    epochs = total_steps / steps_per_epoch if steps_per_epoch else float("nan")
    steps = f"{start_step:,} -> {total_steps:,}, {steps_per_epoch:,} steps an epoch"
    steps += f" = {epochs:.2f} epochs"
    per_split = ", ".join(f"{name} {n:,}" for name, n in blocks.items())
    cadence = ", ".join(
        (
            _every(t["log_every"], "log", "never"),
            _every(t["eval_every"], "eval", "at the end"),
            _every(t["checkpoint_every"], "checkpoint", "at the end and on SIGTERM"),
            f"keep {t.get('keep_checkpoints', 0)}",
        )
    )
    devices = f"{_plural(device_count, platform + ' device')} in "
    devices += f"{process_count} process" + "es" * (process_count != 1)
    lines = [
        "gpt2-jax train: run summary",
        _row("model", f"{params / 1e6:.1f}M parameters ({params:,}), {shape}"),
        _row("weights", weights),
        *([_row("lora", _lora(config["lora"], trainable, params))] if _lora_on(config) else []),
        _row("devices", f"{devices}; mesh {dict(mesh_shape)}"),
        _row("malloc", allocator.state() or "not tuned (allocator.tune() not called)"),
        _row("batch", _batch(t["batch_size"], o.get("accumulation_steps", 1), block)),
        _row("steps", steps),
        _row(*_rows_line(d, per_split, block)),
        *([_row("data", data)] if data else []),
        _row(
            "optimizer", f"lr {o['learning_rate']:g}, {o['schedule']}, warmup {o['warmup_steps']}"
        ),
        _row("cadence", cadence),
        _row("workdir", str(workdir)),
    ]
    return "\n".join(lines)


def _lora_on(config: dict) -> bool:
    return bool((config.get("lora") or {}).get("rank"))


def _lora(lo: dict, trainable: int | None, total: int) -> str:
    """``rank 16, alpha 32 on c_attn,c_proj,c_fc; trains 811,008 of 125,250,816 parameters
    (0.65%), the base frozen``."""
    text = f"rank {lo['rank']}, alpha {lo['alpha']:g} on {lo['targets']}"
    if lo.get("dropout"):
        text += f", dropout {lo['dropout']:g}"
    if trainable is not None and total:
        text += f"; trains {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
    return text + ", the base frozen"


def _rows_line(d: dict, per_split: str, block: int) -> tuple[str, str]:
    """The summary's row of examples a split: blocks of text, or the SFT formats' rows."""
    if d.get("format", "text") == "text":
        mask = ", attention within each document" if d.get("document_mask") else ""
        return "blocks", f"{per_split} (of {block} tokens{mask})"
    how = "packed, each example alone" if d.get("packing") else "one example each, right-padded"
    return "rows", f"{per_split} (of {block} tokens, {how}; loss on the completion tokens)"


def _batch(batch_size: int, accum: int, block: int) -> str:
    """``8 sequences x 64 tokens = 512 tokens a step (global; 2 microbatches of 4)``."""
    text = f"{batch_size:,} sequences x {block} tokens = {batch_size * block:,} tokens"
    if accum > 1:
        return text + f" a step (global; {accum} microbatches of {batch_size // accum})"
    return text + " a step (global)"


def end_summary(
    results: list[dict],
    *,
    harness: dict | None = None,
    start_step: int,
    end_step: int,
    wall_seconds: float,
    paths: dict[str, str | Path],
) -> str:
    """The end-of-run screen: final eval metrics, wall time, the files written.

    ``results``: eval records (``split``, ``loss``, ``perplexity``, ``tokens``);
    ``paths``: ``{"checkpoints": ..., "metrics": ...}`` in the order to print;
    ``harness``: the last harness eval's ``{"lm_eval/<task>/<metric>": value}``.
    """
    minutes, seconds = divmod(wall_seconds, 60)
    lines = [
        "gpt2-jax train: done",
        _row(
            "trained",
            f"steps {start_step:,} -> {end_step:,} in {int(minutes)} min {seconds:.0f} s wall "
            "(compilation, evals and checkpoints included)",
        ),
    ]
    for r in results:
        lines.append(
            _row(
                r["split"],
                f"loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f} "
                f"({r['tokens']:,} scored tokens)",
            )
        )
    by_task: dict[str, list[str]] = {}
    for key, value in (harness or {}).items():
        _, task, metric = key.split("/", 2)
        by_task.setdefault(task, []).append(f"{metric} {value:.4g}")
    for task, metrics in by_task.items():
        lines.append(_row("lm-eval", f"{task}: {', '.join(metrics)}"))
    for i, (name, path) in enumerate(paths.items()):
        lines.append(_row("wrote" if i == 0 else "", f"{name + ':':<12} {path}"))
    return "\n".join(lines)


def eval_table(results: list[dict]) -> str:
    """``gpt2-jax eval``'s closing table (split, loss, perplexity, tokens), one row a split."""
    header = ("split", "loss", "perplexity", "tokens")
    rows = [
        (r["split"], f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['tokens']:,}")
        for r in results
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]

    def fmt(cells):  # split left-aligned, numbers right-aligned
        first, *rest = cells
        return "  ".join(
            [first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)]
        )

    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


def write_tensorboard(
    logdir: str | Path, texts: dict[str, str], step: int, config: dict | None = None
) -> None:
    """Adds ``texts`` (``{tag: text}``) and the resolved ``config`` as TensorBoard text.

    A writer of its own (file suffix ``.summary``) beside the metrics writer: TensorBoard
    merges the event files of one directory, and the metric logger stays untouched.
    """
    from tensorboardX import SummaryWriter

    # The event file is named by the second it is opened in: a run's start and end
    # summaries can fall in the same second, and the second file would replace the first.
    label = "-".join(tag.replace("/", "_") for tag in texts) or "config"
    writer = SummaryWriter(str(logdir), filename_suffix=f".{label}.summary")
    try:
        # TensorBoard renders text as Markdown: 4-space indentation keeps it monospace.
        for tag, text in texts.items():
            writer.add_text(tag, _as_code(text), step)
        if config is not None:
            writer.add_text("run/config", _as_code(json.dumps(config, indent=2)), step)
    finally:
        writer.close()


def _as_code(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
