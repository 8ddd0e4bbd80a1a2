"""GPT-2 124M pretraining recipe (GPT-3 paper / nanoGPT hyperparameters).

    gpt2-jax train --config=configs/gpt2_124m.py --workdir=runs/gpt2_124m \
        --config.data.train_files='/data/owt/*.txt'

AdamW peak 6e-4, betas 0.9/0.95, weight decay 0.1 on kernels, 2000 warmup steps, cosine to
6e-5 at 600k steps, clip 1.0, ~0.5M tokens per step (batch 480 x 1024 via 40 x 12-sequence
microbatches on one device; scale mesh.data to spread it). Expected: validation loss near
2.85 on OpenWebText after the full run (nanoGPT's reported number, not reproduced here);
that takes a multi-accelerator pod for days, not this CPU. ``:local`` shrinks it to
something a laptop can start.
"""

from gpt2_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.model.size = "gpt2"
    c.model.dropout = 0.0
    c.model.dtype = "bfloat16"
    c.data.dataset = "openwebtext"
    c.data.block_size = 1024
    c.data.append_eos = True
    c.train.batch_size = 480
    c.train.steps = 600_000
    c.train.log_every = 10
    c.train.eval_every = 2000
    c.train.checkpoint_every = 2000
    c.optim.learning_rate = 6e-4
    c.optim.warmup_steps = 2000
    c.optim.schedule = "cosine"
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.grad_clip = 1.0
    c.optim.accumulation_steps = 40
    c.eval.batch_size = 12
    c.eval.max_batches = 200
    if arg == "local":
        c.model.dtype = "float32"
        c.data.dataset = "pydoc_topics"
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
        raise ValueError(f"configs/gpt2_124m.py: unknown variant {arg!r} (known: local)")
    return c
