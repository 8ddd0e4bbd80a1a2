"""GPT-2 124M pretraining recipes: llm.c's on FineWeb-Edu (default), nanoGPT's on OpenWebText.

    gpt2-jax train --config=configs/gpt2_124m.py --workdir=runs/gpt2_124m
    gpt2-jax train --config=configs/gpt2_124m.py:owt --workdir=runs/gpt2_124m_owt

Default: llm.c's GPT-2 (124M) reproduction (karpathy/llm.c discussion #481): FineWeb-Edu
``sample-10BT`` (HuggingFaceFW/fineweb-edu, ~10B GPT-2 tokens), one epoch:
19,073 steps of 512 x 1024 = 524,288 tokens, AdamW 6e-4 peak, betas 0.9/0.95, weight decay
0.1 on kernels, 700 warmup steps, cosine to 0, clip 1.0. The rows are streamed from the Hub
straight into the token cache (``data.streaming``): the disk used is the cache, ~2 bytes a
token (~20 GB), not the parquet files. 0.05% of the documents are held out for validation
(``data.validation_fraction``, a seeded draw: ~5M tokens).

``:owt``: nanoGPT's OpenWebText run (``data/openwebtext/prepare.py`` + ``train.py``):
Skylion007/openwebtext from the Hub's parquet copy (``refs/convert/parquet``; the dataset's
loading script no longer runs with datasets >= 4), 8,013,769 documents, ~9B tokens (~18 GB
of cache), 0.05% held out; batch 480 x 1024 via 40 x 12-sequence microbatches, 600k steps,
2000 warmup, cosine to 6e-5. Expected: validation loss near 2.85 after the full run
(nanoGPT's reported number, not reproduced here). Not checked from the development
machines (no Hub access there): whether that parquet copy holds all 8,013,769 documents;
the build prints the rows it read.

Both take a multi-accelerator machine for days (not this CPU); one device runs them with
``optim.accumulation_steps`` microbatches, more devices with ``mesh.data``. ``:local``
shrinks the default to something a laptop can start, offline.
"""

from gpt2_jax.config.base import base_config


def get_config(arg=None):
    c = base_config()
    c.model.size = "gpt2"
    c.model.dropout = 0.0
    c.model.dtype = "bfloat16"
    c.data.dataset = "HuggingFaceFW/fineweb-edu"
    c.data.dataset_config = "sample-10BT"
    c.data.streaming = True  # no Arrow copy of the parquet files on disk
    c.data.validation_fraction = 0.0005  # 0.05% of the documents, drawn by a seeded shuffle
    c.data.block_size = 1024
    c.data.append_eos = True  # <|endoftext|> between documents (llm.c, nanoGPT)
    c.train.batch_size = 512  # x 1024 = 524,288 tokens a step
    c.train.steps = 19_073  # ~10B tokens: one epoch of sample-10BT
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.checkpoint_every = 2000
    c.optim.learning_rate = 6e-4
    c.optim.warmup_steps = 700
    c.optim.schedule = "cosine"
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.1
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.grad_clip = 1.0
    c.optim.accumulation_steps = 32  # 16-sequence microbatches on one device
    c.eval.batch_size = 16
    c.eval.max_batches = 200
    if arg == "owt":
        c.data.dataset = "Skylion007/openwebtext"
        c.data.dataset_config = ""
        c.data.revision = "refs/convert/parquet"
        c.data.data_dir = "plain_text"  # the parquet copy's config directory
        c.train.batch_size = 480
        c.train.steps = 600_000
        c.train.eval_every = 2000
        c.optim.warmup_steps = 2000
        c.optim.min_lr_ratio = 0.1
        c.optim.accumulation_steps = 40
        c.eval.batch_size = 12
    elif arg == "local":
        c.model.dtype = "float32"
        c.data.dataset = "pydoc_topics"
        c.data.dataset_config = ""
        c.data.streaming = False
        c.data.validation_fraction = 0.05
        c.data.block_size = 256
        c.train.batch_size = 8
        c.train.steps = 50
        c.optim.warmup_steps = 10
        c.optim.accumulation_steps = 2
        c.train.eval_every = 25
        c.train.checkpoint_every = 25
        c.eval.max_batches = 4
        c.eval.batch_size = 4
    elif arg:
        raise ValueError(f"configs/gpt2_124m.py: unknown variant {arg!r} (known: owt, local)")
    return c
