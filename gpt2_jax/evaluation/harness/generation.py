"""``generate_until`` for the harness: lm-eval's generation kwargs, normalized as its hf
backend does, and the KV-cache decoder (``generate.generate_batch``) on padded batches."""

from __future__ import annotations

from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from gpt2_jax.data import tokenizer as tok_lib
from gpt2_jax.evaluation import generate as gen_lib
from gpt2_jax.evaluation.harness_args import HarnessError
from gpt2_jax.model import config as gpt2_config

SUPPORTED = "until, max_gen_toks, do_sample, temperature, top_k, top_p"


def settings(gen_kwargs: dict, eos: str, max_gen_toks: int, max_length: int) -> dict:
    """A request's generation kwargs -> {until, max_gen_toks, temperature, top_k, top_p}
    (greedy: temperature 0); ``max_gen_toks``: the default budget, ``max_length``: the
    context (n_positions). A HarnessError names an unsupported or bad kwarg."""
    if not isinstance(gen_kwargs, dict):
        raise HarnessError(f"generation kwargs must be a dict, got {gen_kwargs!r}")
    kw = normalize_gen_kwargs(gen_kwargs, max_gen_toks)
    until = handle_stop_sequences(kw.pop("until", None), eos=eos)
    budget = int(kw.pop("max_gen_toks"))
    do_sample = bool(kw.pop("do_sample", False))
    temperature = float(kw.pop("temperature", 0.0))
    # transformers' generate samples with top_k=50 unless told otherwise: the same here.
    top_k, top_p = int(kw.pop("top_k", 50)), float(kw.pop("top_p", 1.0))
    kw.pop("max_length", None)  # the hf backend's alias, superseded by max_gen_toks
    if kw:
        raise HarnessError(
            f"generation kwarg {next(iter(kw))!r} is not supported by gpt2_jax (it takes "
            f"{SUPPORTED})"
        )
    if not 1 <= budget < max_length:
        raise HarnessError(f"max_gen_toks={budget}: must be in [1, n_positions={max_length})")
    greedy = not do_sample or temperature == 0.0
    return dict(
        until=tuple(until),
        max_gen_toks=budget,
        temperature=0.0 if greedy else (temperature or 1.0),
        top_k=0 if greedy else top_k,
        top_p=1.0 if greedy else top_p,
    )


def decode_texts(
    model_cfg: gpt2_config.GPT2Config,
    decode_params: dict,
    prompts: list[list[int]],
    s: dict,
    *,
    batch_size: int,
    seed: int,
    enc,
) -> list[str]:
    """Decodes ``prompts`` (padded to ``batch_size`` rows: one executable per bucket) with
    the settings ``s``; each row's text up to <|endoftext|>, cut at the first ``until``."""
    rows = prompts + [prompts[0]] * (batch_size - len(prompts))
    new = gen_lib.generate_batch(
        model_cfg,
        decode_params,
        rows,
        s["max_gen_toks"],
        temperature=s["temperature"],
        top_k=s["top_k"],
        top_p=s["top_p"],
        seed=seed,
        stop_token=tok_lib.EOT_ID,
    )
    out = []
    for ids in new[: len(prompts)]:
        text = tok_lib.decode(enc, [t for t in ids if t != tok_lib.EOT_ID])
        out.append(postprocess_generated_text(text, list(s["until"]), None))
    return out
