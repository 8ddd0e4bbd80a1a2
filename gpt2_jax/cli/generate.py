"""``gpt2-jax generate``: sample text with the KV-cache decoder, streamed for one prompt."""

from __future__ import annotations

import sys
from pathlib import Path

from gpt2_jax.cli.args import UsageError
from gpt2_jax.cli.common import model_and_params, with_adapter


def cmd_generate(args, overrides) -> int:
    from gpt2_jax.data import tokenizer
    from gpt2_jax.evaluation import generate as gen_lib

    _check_flags(args)
    prompts = _read_prompts(args)
    overrides = with_adapter(args, overrides)
    cfg = gen_lib.command_config(args.config, args.workdir, args.init_from, overrides)
    model_cfg, params, source = model_and_params(cfg, args, announce=False)
    enc = tokenizer.get_tokenizer()
    prompt_ids = [enc.encode_ordinary(text) for text in prompts]
    try:  # the API's own check, each prompt named by its flag
        gen_lib.check_request(
            model_cfg, prompt_ids, args.max_new_tokens, args.temperature, args.top_k,
            args.top_p, args.repetition_penalty, names=_prompt_flags(args, len(prompts)),
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"loaded {source.describe()}", file=sys.stderr)  # after the checks: errors stay one line
    rows = [ids for ids in prompt_ids for _ in range(args.num_samples)]
    stop = tokenizer.EOT_ID if args.stop_at_eos else None
    stats = gen_lib.Stats()
    stream = gen_lib.stream_batch(
        model_cfg,
        params,
        rows,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_token=stop,
        chunk_size=16,  # a jitted call per 16 tokens: text appears as it is made
        stats=stats,
        repetition_penalty=args.repetition_penalty,
    )
    if len(rows) == 1:
        _print_streamed(enc, rows[0], stream, stop)
    else:
        _print_rows(enc, rows, stream, stop, args.num_samples)
    print(
        f"prompt tokens: {stats.prompt_tokens}, new tokens: {stats.new_tokens}, "
        f"compile: {stats.compile_seconds:.1f} s, {stats.tokens_per_second:.1f} tokens/s "
        f"({stats.run_seconds:.2f} s)",
        file=sys.stderr,
    )
    return 0


def _check_flags(args) -> None:
    """The flags' own checks, before any weights load (errors stay one line)."""
    from gpt2_jax.config import base as config_lib
    from gpt2_jax.evaluation import generate as gen_lib

    if not (args.workdir or args.init_from or args.config):
        raise UsageError("give --workdir=DIR (a trained run) or --init_from=hf:<dir or hub id>")
    if args.init_from:
        try:
            config_lib.init_from_spec(args.init_from)
        except config_lib.ConfigError:
            raise UsageError(f"--init_from={args.init_from!r} must be hf:<dir or hub id>") from None
    if args.prompt == "":
        raise UsageError("--prompt: must not be empty")
    if args.num_samples < 1:
        raise UsageError(f"--num_samples={args.num_samples}: must be >= 1")
    try:  # the API's own checks, before any weights load
        gen_lib.check_sampling(
            args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty
        )
    except ValueError as e:
        raise UsageError(f"--{e}") from None


def _read_prompts(args) -> list[str]:
    """The prompt texts from --prompt or --prompt_file (one a line)."""
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give --prompt or --prompt_file, not both")
    if args.prompt_file is None:
        return ["\n" if args.prompt is None else args.prompt]
    path = Path(args.prompt_file)
    if not path.is_file():
        raise UsageError(f"--prompt_file={args.prompt_file}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise UsageError(f"--prompt_file={args.prompt_file}: the file is empty")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise UsageError(f"--prompt_file={args.prompt_file}: line {i} is empty")
    return lines


def _prompt_flags(args, n: int) -> list[str]:
    """How to name each prompt in an error message."""
    if args.prompt_file is None:
        return ["--prompt"]
    return [f"--prompt_file={args.prompt_file} line {i}" for i in range(1, n + 1)]


def _print_streamed(enc, prompt_ids: list[int], stream, stop) -> None:
    """One sample: the text as it comes, chunk by chunk (a chunk can end inside a UTF-8
    character: the trailing replacement characters wait for the next chunk)."""
    from gpt2_jax.data import tokenizer

    ids, printed = list(prompt_ids), ""
    for chunk in stream:
        for tok in chunk[0].tolist():
            if tok == stop:
                break
            ids.append(tok)
        text = tokenizer.decode(enc, ids).rstrip("\ufffd")
        if text.startswith(printed):
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
        if stop in chunk[0]:
            break
    text = tokenizer.decode(enc, ids)
    sys.stdout.write(text[len(printed) :] + "\n")
    sys.stdout.flush()


def _print_rows(enc, rows: list[list[int]], stream, stop, num_samples: int) -> None:
    """Several samples: each printed whole, as soon as it has ended."""
    from gpt2_jax.data import tokenizer

    new: list[list[int]] = [[] for _ in rows]
    ended = [False] * len(rows)

    def show(b: int) -> None:
        i, j = divmod(b, num_samples)
        print(f"--- prompt {i + 1}, sample {j + 1} ---")
        print(tokenizer.decode(enc, rows[b] + new[b]), flush=True)

    for chunk in stream:
        for b, part in enumerate(chunk.tolist()):
            if ended[b]:
                continue
            if stop in part:
                new[b] += part[: part.index(stop)]
                ended[b] = True
                show(b)
            else:
                new[b] += part
    for b in range(len(rows)):
        if not ended[b]:
            show(b)
