"""Quickstart: a small GPT-2 that learns Python-doc English in ~8 minutes on 2 CPU cores, offline.

Data: Python's own bundled help text (``pydoc_data.topics``, ~465K characters, in every
CPython install; layout normalised by ``data.normalize_layout``, ~108K tokens), 5% held out
for validation. Model: 4 layers, 4 heads, n_embd 128, context 64, the real GPT-2 tokenizer
and vocabulary.

    gpt2-jax train --config=configs/quickstart.py --workdir=runs/quickstart
    gpt2-jax eval --workdir=runs/quickstart
    gpt2-jax generate --workdir=runs/quickstart --prompt="The if statement is" \
        --temperature=0 --repetition_penalty=1.3
    gpt2-jax plot runs/quickstart

Batch 8 x 64 tokens, 2000 steps (~10 epochs): for the same tokens, more and smaller steps
learn more here than fewer, larger ones (the comparison: experiments/quickstart/README.md).

Expected: validation loss from ~10.8 at init (ln 50257) to ~4.44 (perplexity ~85) after
2000 steps, ~7.5 min of training on 2 idle Xeon cores (2026-11-26); the greedy sample reads
as Python-doc sentences, grammatical in stretches, not yet correct.

``:tiny`` is the variant the tests use (1 layer, n_embd 32, a few steps).
"""

from gpt2_jax.config.base import base_config


def get_config(arg=None):
    c = base_config()
    c.data.dataset = "pydoc_topics"
    c.data.block_size = 64
    c.model.n_layer, c.model.n_head, c.model.n_embd = 4, 4, 128
    c.model.n_positions = 64
    c.model.dropout = 0.0
    # Layers scanned (params under h): the init of the recorded runs. Unrolled layers (the
    # default since) draw each layer's init from other rng streams: another seed in effect.
    c.model.scan_layers = True
    c.train.batch_size = 8
    c.train.steps = 2000
    c.train.log_every = 50
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 20
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.1
    c.optim.b2 = 0.99
    c.eval.batch_size = 32
    if arg == "tiny":
        c.model.scan_layers = False  # the default layout, which the tests exercise
        c.model.n_layer, c.model.n_head, c.model.n_embd = 1, 2, 32
        c.model.n_positions = 32
        c.data.block_size = 32
        c.data.max_rows = 3000
        c.train.batch_size = 4
        c.train.steps = 6
        c.train.log_every = 1
        c.train.eval_every = 0
        c.train.checkpoint_every = 3
        c.optim.warmup_steps = 2
        c.eval.batch_size = 8
        c.eval.max_batches = 2
        c.train.progress = False
    elif arg:
        raise ValueError(f"configs/quickstart.py: unknown variant {arg!r} (known: tiny)")
    return c
