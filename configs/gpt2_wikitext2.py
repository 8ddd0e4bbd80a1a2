"""run_clm.py's experiment: GPT-2 (124M) on WikiText-2 (raw), block 1024, batch 8, 3 epochs.

The Hugging Face equivalent:

    python run_clm.py --model_name_or_path openai-community/gpt2 \
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \
        --per_device_train_batch_size 8 --num_train_epochs 3 --learning_rate 5e-5 \
        --do_train --do_eval --output_dir /tmp/test-clm

Here (needs the Hugging Face hub for the dataset; offline, point data.train_files /
data.validation_files at local copies of wiki.train.raw / wiki.valid.raw):

    gpt2-jax train --config=configs/gpt2_wikitext2.py --workdir=runs/gpt2_wikitext2

Same data pipeline as run_clm (rows tokenized without an end-of-text token, grouped into
1024-token blocks per 1000-row chunk, remainder dropped; loss over each block's 1023
shifted predictions), same optimizer (AdamW 5e-5, betas 0.9/0.999, eps 1e-8, no weight
decay, linear decay to 0 without warmup, global-norm clip 1.0).

Until the Hugging Face import lands this trains from scratch (``init_from=''``): expect a
far higher perplexity than fine-tuning the pretrained model. ``:local`` reads the
wikitext files from ``data.train_files``/``data.validation_files`` instead of the hub.
"""

from gpt2_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.model.size = "gpt2"
    c.model.dropout = 0.1
    c.data.dataset = "wikitext"
    c.data.dataset_config = "wikitext-2-raw-v1"
    c.data.block_size = 1024
    c.train.batch_size = 8
    c.train.epochs = 3
    c.train.log_every = 10
    c.train.eval_every = 0
    c.train.checkpoint_every = 200
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
    elif arg:
        raise ValueError(f"configs/gpt2_wikitext2.py: unknown variant {arg!r} (known: local)")
    return c
