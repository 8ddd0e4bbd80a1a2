"""Tiny Shakespeare from scratch: a small GPT-2 on one 1.1 MB text file, ~15 min on 2 CPU cores.

Data: Karpathy's ``tinyshakespeare/input.txt`` (40K lines, ~338K GPT-2 tokens), passed as
the config argument; the first 5% of its lines (the opening scenes of Coriolanus) are held
out for validation, as run_clm does. Get the file with

    curl -o input.txt https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt

Model: 4 layers, 4 heads, n_embd 128, context 128, the GPT-2 tokenizer and vocabulary
(7.2M parameters, 6.4M of them the tied embedding), dropout 0.1; batch 16 x 128 tokens,
1000 steps (~6.4 epochs).

    gpt2-jax train --config=configs/tinyshakespeare.py:input.txt --workdir=runs/shakespeare
    gpt2-jax plot runs/shakespeare
    gpt2-jax generate --workdir=runs/shakespeare --prompt="ROMEO:" --top_k=0 --top_p=0.9

Expected (experiments/tinyshakespeare/README.md): validation loss from ~10.8 at init
(ln 50257) to 4.93 (perplexity 138) after 1000 steps, 15 min 12 s on 2 idle Xeon cores;
top-p samples with speaker names, verse lines, Early Modern English words and punctuation,
not yet sense.

The argument is the path to input.txt (default ``data/tinyshakespeare/input.txt``,
relative to the current directory); a missing file is reported as ``data.train_files``.
"""

from gpt2_jax.config.base import base_config

DEFAULT_PATH = "data/tinyshakespeare/input.txt"


def get_config(arg=None):
    c = base_config()
    c.data.dataset = ""
    c.data.train_files = arg or DEFAULT_PATH
    c.data.validation_split_percentage = 5
    c.data.block_size = 128
    c.model.n_layer, c.model.n_head, c.model.n_embd = 4, 4, 128
    c.model.n_positions = 128
    c.model.dropout = 0.1  # 6.4 passes over 338K tokens: enough repetition to overfit
    c.train.batch_size = 16
    c.train.steps = 1000
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 30
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.1
    c.optim.b2 = 0.99
    c.eval.batch_size = 32
    return c
