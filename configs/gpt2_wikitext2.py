"""run_clm.py's experiment: fine-tune GPT-2 (124M) on WikiText-2 (raw), block 1024, batch 8.

The Hugging Face equivalent:

    python run_clm.py --model_name_or_path openai-community/gpt2 \\
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \\
        --per_device_train_batch_size 8 --num_train_epochs 3 --learning_rate 5e-5 \\
        --do_train --do_eval --output_dir /tmp/test-clm

Here (with the Hugging Face hub reachable):

    gpt2-jax train --config=configs/gpt2_wikitext2.py --workdir=runs/gpt2_wikitext2
    gpt2-jax eval --config=configs/gpt2_wikitext2.py \\
        --config.init_from=hf:openai-community/gpt2        # the pretrained model, untuned

Offline, download once elsewhere and pass local copies:
``--config.init_from=hf:/path/to/gpt2`` (a directory with config.json + model.safetensors)
and ``:local`` with ``--config.data.train_files=.../wiki.train.raw
--config.data.validation_files=.../wiki.valid.raw``.

Same data pipeline as run_clm (rows tokenized without an end-of-text token, grouped into
1024-token blocks per 1000-row chunk, remainder dropped; loss = mean over each block's 1023
shifted predictions), same optimizer (AdamW 5e-5, betas 0.9/0.999, eps 1e-8, no weight
decay, linear decay to 0 without warmup, global-norm clip 1.0, dropout 0.1), 3 epochs.

What to expect: the transformers language-modeling example's README says this fine-tuning
reaches a validation perplexity of about 20 (not reproduced here: the development machine
has no hub access, so neither the weights nor the dataset could be fetched). These are
perplexities per GPT-2 BPE token over 1024-token blocks of wikitext-2-raw. The GPT-2 paper's
29.41 for the 117M model on WikiText-2 is a different quantity: it is normalized per
original word-level token of the (tokenized, <unk>-bearing) WikiText-2 test set, with
de-tokenizers and overlapping context, so it cannot be compared with these numbers.
"""

from gpt2_jax.config.base import base_config


def get_config(arg=None):
    c = base_config()
    c.init_from = "hf:openai-community/gpt2"
    c.model.size = "gpt2"
    c.model.dropout = 0.1
    # Without remat, the backward pass of 8 x 1024 tokens keeps ~26 GB of activations
    # (XLA's memory analysis on CPU: attention probabilities and the 50257-way logits);
    # with it ~5.5 GB, for ~1/3 more compute. Set false where memory allows.
    c.model.remat = True
    c.data.dataset = "wikitext"
    c.data.dataset_config = "wikitext-2-raw-v1"
    c.data.block_size = 1024
    c.train.batch_size = 8
    c.train.epochs = 3
    c.train.log_every = 10
    c.train.eval_every = 0
    c.train.checkpoint_every = 100
    c.optim.learning_rate = 5e-5
    c.optim.schedule = "linear"
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.grad_clip = 1.0
    c.eval.batch_size = 8
    if arg == "local":
        c.data.dataset = ""
        c.data.dataset_config = ""
        c.data.train_files = "wikitext-2-raw/wiki.train.raw"
        c.data.validation_files = "wikitext-2-raw/wiki.valid.raw"
    elif arg == "scratch":
        c.init_from = ""
    elif arg:
        raise ValueError(f"configs/gpt2_wikitext2.py: unknown variant {arg!r} (local, scratch)")
    return c
