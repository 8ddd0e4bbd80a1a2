"""Supervised fine-tuning (SFT) of GPT-2 on prompt/completion pairs: loss on the completion
only, examples packed into rows, each attending only to itself (docs/finetuning.md).

The default fine-tunes ``hf:openai-community/gpt2`` (124M) on ``trl-lib/tldr`` (Reddit posts
and their TL;DR summaries; columns ``prompt`` and ``completion``), with the hub reachable:

    gpt2-jax train --config=configs/sft.py --workdir=runs/sft
    gpt2-jax generate --workdir=runs/sft --temperature=0 \\
        --prompt="SUBREDDIT: r/... POST: ... TL;DR:"

The TRL equivalent (what this reproduces, token for token: tests/test_sft.py):

    trl sft --model_name_or_path openai-community/gpt2 --dataset_name trl-lib/tldr \\
        --max_length 1024 --packing --learning_rate 2e-5 --per_device_train_batch_size 16

Tokenization is TRL 1.16's (``<|endoftext|>`` appended to each completion; the completion
starts where encode(prompt) and encode(prompt + completion) stop agreeing); packing is
best-fit decreasing with positions restarting and attention kept within each example
(TRL's ``padding_free`` packing). The loss is the mean over the completion tokens of the
whole batch (``num_items_in_batch``), whatever ``optim.accumulation_steps``.

``:local`` runs offline: ``configs/data/pydoc_sft.jsonl`` (2,456 pairs made from Python's
bundled help text by configs/data/make_pydoc_sft.py; PSF License), held out 5%, on the
quickstart's model shape with a 256-token context, from scratch unless
``--config.init_from=hf:DIR`` names a GPT-2 to fine-tune (a Hugging Face directory, e.g.
``gpt2-jax export``'s). ``:tiny`` is the variant the tests use.

``:lora`` is the default run with LoRA (docs/finetuning.md#lora): rank 16, alpha 32 on every
target (``c_attn``, both ``c_proj``, ``c_fc``), learning rate 2e-4 as PEFT's recipes use;
only the adapters train (2.36M, 1.9% of gpt2's parameters), the base stays as it was:

    gpt2-jax train --config=configs/sft.py:lora --workdir=runs/sft_lora
    gpt2-jax export --workdir=runs/sft_lora --out=runs/sft_lora_adapter   # a PEFT adapter

The TRL + PEFT equivalent adds ``--use_peft --lora_r 16 --lora_alpha 32
--lora_target_modules c_attn c_proj c_fc --learning_rate 2e-4``. ``:local_lora`` is
``:local`` with the same adapters (learning rate 1e-3: a short run), on the GPT-2 that
``--config.init_from=hf:DIR`` names (LoRA needs pretrained weights to adapt);
``--config.lora.rank=16`` on any variant does the same with its own learning rate.
"""

from pathlib import Path

from gpt2_jax.config.base import base_config

PYDOC_SFT = Path(__file__).resolve().parent / "data" / "pydoc_sft.jsonl"


def get_config(arg=None):
    c = base_config()
    c.init_from = "hf:openai-community/gpt2"
    c.model.size = "gpt2"
    c.model.dropout = 0.1
    c.model.remat = True  # 16 x 1024 tokens of gpt2: activations otherwise ~50 GB
    c.data.dataset = "trl-lib/tldr"
    c.data.format = "prompt_completion"
    c.data.block_size = 1024
    c.data.packing = True
    c.train.batch_size = 16
    c.train.epochs = 1
    c.train.log_every = 10
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.optim.learning_rate = 2e-5  # TRL's SFTConfig default
    c.optim.schedule = "linear"
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.accumulation_steps = 4
    c.eval.batch_size = 8
    c.eval.max_batches = 50  # 400 of tldr's 6,447 validation rows at each eval
    if arg in ("lora", "local_lora"):
        c.lora.rank = 16
        c.lora.alpha = 32.0
        c.lora.dropout = 0.05  # TRL's --use_peft default
        c.lora.targets = "c_attn,c_proj,c_fc"
        c.optim.learning_rate = 2e-4
    if arg in ("local", "tiny", "local_lora"):
        c.init_from = ""
        c.model.size = ""
        c.model.n_layer, c.model.n_head, c.model.n_embd = 4, 4, 128
        c.model.n_positions = 256
        c.model.dropout = 0.0
        c.model.remat = False
        c.data.dataset = ""
        c.data.train_files = str(PYDOC_SFT)
        c.data.block_size = 256
        c.train.batch_size = 8
        c.train.epochs = 0
        c.train.steps = 500
        c.train.log_every = 25
        c.train.eval_every = 100
        c.train.checkpoint_every = 100
        c.optim.learning_rate = 1e-3 if arg == "local_lora" else 3e-3
        c.optim.warmup_steps = 20
        c.optim.schedule = "cosine"
        c.optim.accumulation_steps = 1
        c.eval.batch_size = 16
        c.eval.max_batches = 0
    if arg == "tiny":
        c.model.n_layer, c.model.n_head, c.model.n_embd = 1, 2, 32
        c.model.n_positions = 64
        c.data.block_size = 64
        c.data.max_rows = 400
        c.train.batch_size = 4
        c.train.steps = 6
        c.train.log_every = 1
        c.train.eval_every = 0
        c.train.checkpoint_every = 3
        c.optim.warmup_steps = 2
        c.eval.batch_size = 8
    elif arg not in (None, "local", "lora", "local_lora"):
        raise ValueError(f"configs/sft.py: unknown variant {arg!r} (local, tiny, lora, local_lora)")
    return c
