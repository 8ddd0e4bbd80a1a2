"""Supervised fine-tuning (issue #25): the prompt_completion and messages formats against TRL
1.16 and transformers, their losses against a Hugging Face model, packing, document masks,
gradient accumulation over uneven targets, a packed run end to end (kill -9 and resume, two
devices), and bad input.

The references: a random odd-shaped Hugging Face GPT2LMHeadModel (fp32, eval mode), TRL's
``SFTTrainer`` tokenized dataset, transformers' ``apply_chat_template`` assistant masks, and
Hugging Face's tokenizer built offline from the project's vocab files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.config import base as config_lib
from gpt2_jax.data import DataConfig, chat, load_splits, tokenizer
from gpt2_jax.data.examples import Examples, best_fit_decreasing
from gpt2_jax.evaluation import perplexity
from gpt2_jax.model import attention
from gpt2_jax.model import gpt2 as model_lib
from gpt2_jax.optim import optimizer as optim
from gpt2_jax.train import step as step_lib
from gpt2_jax.weights import checkpoint as ckpt_lib

from . import helpers
from .helpers import ROOT, checkpoint_params, cli_in_process, isolated, run_cli, train_losses

EOS = tokenizer.EOT_ID
SFT_TINY = f"{ROOT / 'configs' / 'sft.py'}:tiny"
BLOCK = 128  # the TRL / Hugging Face comparisons' max_length and block_size
# Odd sizes (n_embd 48 over 3 heads, n_inner 80) catch transposes; BLOCK positions.
HF_SHAPE = dict(n_layer=2, n_head=3, n_embd=48, n_inner=80, n_positions=BLOCK)

pytestmark = [
    # Many small PyTorch forwards: one thread is ~10x faster than 2 on a shared 2-core box.
    pytest.mark.usefixtures("torch_one_thread"),
    # checkpoint_params restores a checkpoint as saved (no target shardings): Orbax says so.
    pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring"),
    # transformers 5's TrainingArguments (under TRL's SFTConfig) about a field we never set.
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
]


# ---------------------------------------------------------------------- data and references


def sft_rows() -> list[dict]:
    """40 prompt/completion rows cut from the shipped wikitext at word boundaries, lengths
    from ~10 to 300+ tokens, with the cases tokenization gets wrong most easily (their
    indices: the constants below)."""
    paras = [x for x in helpers.wiki_lines() if x.strip() and not x.lstrip().startswith("=")]
    rows = []
    for k in range(40):
        text = paras[k][: 40 + (k * 131) % 400]
        spaces = [i for i, ch in enumerate(text) if ch == " " and 0 < i < len(text) - 1]
        cut = spaces[(k * 7) % len(spaces)] + (k % 3 == 1)  # every third prompt ends in " "
        rows.append({"prompt": text[:cut], "completion": text[cut:]})
    rows[3] = {"prompt": "The cat sa", "completion": "t down"}  # " sat" merges the two
    word = paras[4].index(" Boulter") + 4  # cut inside a word of the text, too
    rows[4] = {"prompt": paras[4][:word], "completion": paras[4][word:300]}
    rows[6] = {"prompt": "", "completion": paras[6][:200]}  # no prompt: all of it is a target
    rows[8]["completion"] += "<|endoftext|>"  # TRL appends no second one
    rows[34] = {"prompt": paras[34][:20], "completion": paras[34][20:]}  # > BLOCK tokens: cut
    rows[35] = {"prompt": paras[45], "completion": " The end."}  # the prompt alone > BLOCK: dropped
    return rows


PROMPT_ENDS_IN_SPACE, MERGED, MID_WORD, NO_PROMPT, OWN_EOS, CUT, DROPPED = 1, 3, 4, 6, 8, 34, 35


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def sft_data(path, **kw) -> DataConfig:
    """A local-file SFT data section: all rows in train (no hold-out), block_size BLOCK."""
    kw = {"format": "prompt_completion", "block_size": BLOCK, **kw}
    return DataConfig(train_files=str(path), validation_split_percentage=0, **kw)


def hf_nll(m, ids, labels) -> tuple[float, int]:
    """(sum of Hugging Face's token losses, how many) of one example: its mean CE over the
    shifted labels times their count."""
    import torch

    ids_t = torch.as_tensor(np.asarray(ids, np.int64))[None]
    labels_t = torch.as_tensor(np.asarray(labels, np.int64))[None]
    count = int((labels_t[:, 1:] != -100).sum())
    with torch.no_grad():
        loss = float(m(ids_t, labels=labels_t).loss)
    return loss * count, count


# The train step's loss of one microbatch, jitted (model_cfg and the flags are static).
loss_fn = jax.jit(step_lib.loss_fn, static_argnames=("model_cfg", "deterministic", "document_mask"))


@functools.partial(jax.jit, static_argnames="model_cfg")
def _hidden(model_cfg, params, batch):
    return model_lib.GPT2(model_cfg).apply(
        {"params": params},
        batch["input_ids"],
        return_hidden=True,
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
    )


@jax.jit
def _nll(wte, hidden, targets):
    logits = jnp.einsum("nc,vc->nv", hidden, wte, preferred_element_type=jnp.float32)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]


def example_nlls(model_cfg, params, examples: Examples) -> tuple[np.ndarray, np.ndarray]:
    """(NLL sum, target count) of each example, read out of the rows ``examples`` placed it
    in (the head formed here, at the targets only): a target's prediction is made at the
    token before it, which must be of the same example."""
    batch = examples[np.arange(len(examples))]
    example_of = np.full(batch["input_ids"].shape, -1)
    for r, row in enumerate(examples.rows):
        at = 0
        for i in row:
            example_of[r, at : at + examples.lengths[i]] = i
            at += examples.lengths[i]
    r, t = np.nonzero(batch["loss_mask"][:, 1:])  # the prediction at t of the token at t + 1
    owner = example_of[r, t + 1]
    assert (owner >= 0).all() and (example_of[r, t] == owner).all()
    hidden = np.asarray(_hidden(model_cfg, params, batch))[r, t]
    nll = np.asarray(_nll(params["wte"]["embedding"], hidden, batch["input_ids"][r, t + 1]))
    n = len(examples.lengths)
    return np.bincount(owner, nll, n), np.bincount(owner, minlength=n)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """Hugging Face's GPT-2 tokenizer over the project's vocab files (independent of
    tiktoken), padding with <|endoftext|> as TRL does for GPT-2."""
    import transformers

    directory = tmp_path_factory.mktemp("hf_tokenizer")
    encoder_json, vocab_bpe = tokenizer.vocab_files()
    shutil.copyfile(encoder_json, directory / "vocab.json")
    shutil.copyfile(vocab_bpe, directory / "merges.txt")
    tok = transformers.GPT2Tokenizer.from_pretrained(directory)
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(the random Hugging Face model, gpt2_jax's config and params of it via save_pretrained
    and weights.hf.load_pretrained)."""
    from gpt2_jax.weights import hf

    m = helpers.random_hf_model(0, **HF_SHAPE)
    directory = tmp_path_factory.mktemp("hf_model")
    m.save_pretrained(directory)
    model_cfg, params = hf.load_pretrained(directory)
    return m, model_cfg, jax.device_put(params)


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft_rows") / "rows.jsonl", sft_rows())


@pytest.fixture(scope="module")
def examples(rows_file, tmp_path_factory):
    """{packing: the rows as gpt2_jax loads them (load_splits, the train split)}."""
    with isolated(tmp_path_factory.getbasetemp()):
        return {
            p: load_splits(sft_data(rows_file, packing=p), ("train",))["train"]
            for p in (False, True)
        }


@pytest.fixture(scope="module")
def trl_dataset(hf_model, hf_tokenizer, tmp_path_factory):
    """TRL 1.16 SFTTrainer's tokenized train dataset of the same rows (completion-only loss,
    no packing, max_length BLOCK)."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        max_length=BLOCK,
        packing=False,
        completion_only_loss=True,
        dataset_num_proc=None,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
    )
    with isolated(tmp_path_factory.getbasetemp()):
        trainer = SFTTrainer(
            model=hf_model[0],
            args=args,
            train_dataset=datasets.Dataset.from_list(sft_rows()),
            processing_class=hf_tokenizer,
        )
    return trainer.train_dataset


# ---------------------------------------------------------------------- 1. TRL parity


def test_prompt_completion_tokens_and_targets_equal_trl(examples, trl_dataset, hf_tokenizer):
    ex = examples[False]
    trl_ids, trl_labels = trl_dataset["input_ids"], trl_dataset["labels"]
    rows = sft_rows()
    # TRL drops the example whose prompt alone fills max_length; gpt2_jax skips it too.
    assert len(trl_ids) == len(ex.lengths) == len(rows) - 1
    lengths = [len(hf_tokenizer(r["prompt"] + r["completion"])["input_ids"]) for r in rows]
    assert ex.stats.skipped == 1 and ex.stats.truncated == sum(n > BLOCK for n in lengths) >= 2
    kept = [r for i, r in enumerate(rows) if i != DROPPED]
    for i, (ids, labels) in enumerate(zip(trl_ids, trl_labels, strict=True)):
        our_ids, target = ex.example(i)
        np.testing.assert_array_equal(our_ids, ids, err_msg=f"row {i}: {kept[i]}")
        np.testing.assert_array_equal(
            np.where(target, our_ids, -100), labels, err_msg=f"row {i}: {kept[i]}"
        )
    # The cases the rows were made for are really there.
    at = {k: k - (k > DROPPED) for k in (PROMPT_ENDS_IN_SPACE, MERGED, MID_WORD, NO_PROMPT,
                                         OWN_EOS, CUT)}  # fmt: skip
    for k in (PROMPT_ENDS_IN_SPACE, MERGED, MID_WORD):  # the completion starts inside the prompt
        prompt_ids = hf_tokenizer(rows[k]["prompt"])["input_ids"]
        ids, target = ex.example(at[k])
        assert np.argmax(target) < len(prompt_ids), rows[k]
    assert ex.example(at[NO_PROMPT])[1].all()
    assert len(ex.example(at[CUT])[0]) == BLOCK
    own_eos = ex.example(at[OWN_EOS])[0]
    assert own_eos[-1] == EOS and own_eos[-2] != EOS  # no second <|endoftext|>
    assert all(ex.example(i)[0][-1] == EOS for i in range(len(ex.lengths)) if i != at[CUT])


# ---------------------------------------------------------------------- 2. eval loss = HF loss


def test_eval_loss_equals_hugging_face_packed_and_unpacked(hf_model, examples, trl_dataset):
    m, model_cfg, params = hf_model
    ref = np.array([hf_nll(m, r["input_ids"], r["labels"]) for r in trl_dataset])
    ref_sums, ref_counts = ref[:, 0], ref[:, 1].astype(np.int64)
    ref_loss = ref_sums.sum() / ref_counts.sum()
    per_example = {}
    for packing, ex in examples.items():
        assert (len(ex) < len(ex.lengths)) == packing  # packed: fewer rows than examples
        res = perplexity.eval_examples(model_cfg, params, ex, batch_size=8, progress=False)
        assert res["tokens"] == ex.num_targets == ref_counts.sum()
        np.testing.assert_allclose(res["loss"], ref_loss, rtol=1e-5, atol=0, err_msg=packing)
        sums, counts = example_nlls(model_cfg, params, ex)
        np.testing.assert_array_equal(counts, ref_counts)
        np.testing.assert_allclose(sums / counts, ref_sums / ref_counts, rtol=1e-5, atol=0)
        per_example[packing] = sums / counts
    np.testing.assert_allclose(per_example[True], per_example[False], rtol=1e-5, atol=0)

    # The training loss of 9 packed rows as one microbatch: 9 * (BLOCK - 1) predictions,
    # more than the head's chunk (losses.HEAD_CHUNK), so the weighted chunked head.
    packed = examples[True]
    batch = packed[np.arange(9)]
    count = step_lib.count_targets(batch)
    placed = [i for row in packed.rows[:9] for i in row]
    assert int(count) == ref_counts[placed].sum()
    loss = loss_fn(
        params,
        jax.tree.map(jnp.asarray, batch),
        jax.random.PRNGKey(0),
        model_cfg=model_cfg,
        deterministic=True,
        num_targets=count,
    )
    want = ref_sums[placed].sum() / ref_counts[placed].sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------- 3. messages


CHATS = [
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Who is Robert Boulter?"},
        {"role": "assistant", "content": "An English film, television and theatre actor."},
    ],
    [
        {"role": "user", "content": "Name a poet of the Tang dynasty."},
        {"role": "assistant", "content": "Du Fu."},
        {"role": "user", "content": "When did he live?"},
        {"role": "assistant", "content": " 712 to 770 , by most accounts ."},
    ],
    [
        {"role": "system", "content": "Terse."},
        {"role": "user", "content": "Ise-class battleships?"},
        {"role": "assistant", "content": "Two: Ise and Hyūga.\n\nBoth converted."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome!"},
    ],
]


def test_messages_tokens_and_targets_equal_transformers_assistant_masks(hf_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS])
    ex = load_splits(sft_data(path, format="messages"), ("train",))["train"]
    assert len(ex.lengths) == len(CHATS)
    for i, messages in enumerate(CHATS):
        ref = hf_tokenizer.apply_chat_template(
            messages,
            chat_template=chat.DEFAULT_CHAT_TEMPLATE,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids, target = ex.example(i)
        np.testing.assert_array_equal(ids, ref["input_ids"], err_msg=f"chat {i}")
        np.testing.assert_array_equal(target, np.asarray(ref["assistant_masks"], bool))
        turns = sum(t["role"] == "assistant" for t in messages)
        assert (ids[target] == EOS).sum() == turns  # each assistant turn ends, and learns, EOS
        assert not target[0] and target.any()


# ---------------------------------------------------------------------- 4. document masks


def test_document_segments_by_hand():
    ids = jnp.array([[5, EOS, 7, 8, EOS, EOS, 9], [EOS, 1, 2, 3, EOS, 4, 5]])
    positions, segments = attention.document_segments(ids, EOS)
    np.testing.assert_array_equal(positions, [[0, 0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 0, 1, 2]])
    np.testing.assert_array_equal(segments, [[0, 1, 1, 1, 2, 3, 3], [1, 1, 1, 1, 2, 2, 2]])
    assert positions.dtype == segments.dtype == jnp.int32


def hf_segmented_block_nll(m, block: np.ndarray) -> float:
    """Each segment of ``block`` (one starts at the block's start and at every EOS) run
    alone through the Hugging Face model; every prediction of the block counts, the one from
    a segment's last token to the next segment's first included. -> the block's mean NLL."""
    import torch

    T = len(block)
    starts = sorted({0, *np.flatnonzero(block == EOS).tolist()})
    total = 0.0
    for s, e in zip(starts, [*starts[1:], T], strict=True):
        with torch.no_grad():
            logits = m(torch.as_tensor(block[None, s:e], dtype=torch.long)).logits[0]
        logp = torch.log_softmax(logits.double(), -1).numpy()
        for t in range(s, min(e, T - 1)):
            total -= logp[t - s, block[t + 1]]
    return total / (T - 1)


def test_document_mask_loss_equals_each_segment_alone_through_hugging_face(hf_model, tmp_path):
    m, model_cfg, params = hf_model
    paras = [x for x in helpers.wiki_lines() if x.strip() and not x.lstrip().startswith("=")]
    docs = [" ".join(p.split()[: 3 + (k * 5) % 17]) + "\n" for k, p in enumerate(paras[:14])]
    (tmp_path / "docs.txt").write_text("".join(docs), encoding="utf-8")
    T = 48
    data_cfg = DataConfig(
        train_files=str(tmp_path / "docs.txt"),
        validation_split_percentage=0,
        block_size=T,
        append_eos=True,
        document_mask=True,
    )
    blocks = load_splits(data_cfg, ("train",))["train"]
    stream = np.asarray(blocks.tokens)
    assert len(blocks) >= 3
    cut = [k for k in range(1, len(blocks)) if EOS not in stream[blocks.starts[k] - 1 :][:2]]
    assert cut, "no document crosses a block boundary"  # it continues as a new segment
    ref = []
    for k in range(len(blocks)):
        block = blocks[np.array([k])]
        assert (block == EOS).sum() >= 2  # several documents a block
        got = perplexity.eval_blocks(
            model_cfg, params, block, batch_size=1, progress=False, document_mask=True
        )
        ref.append(hf_segmented_block_nll(m, block[0]))
        np.testing.assert_allclose(got["loss"], ref[-1], rtol=1e-5, atol=0, err_msg=k)
        plain = perplexity.eval_blocks(model_cfg, params, block, batch_size=1, progress=False)
        assert abs(plain["loss"] - ref[-1]) > 1e-3  # the mask changes the numbers
    # The training loss (loss_fn, the text format) with the document mask: the same mean.
    loss = loss_fn(
        params,
        jnp.asarray(blocks[np.arange(len(blocks))]),
        jax.random.PRNGKey(0),
        model_cfg=model_cfg,
        deterministic=True,
        document_mask=True,
    )
    np.testing.assert_allclose(float(loss), np.mean(ref), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------- 5. accumulation


ACCUM_T = 32


def accum_batch() -> dict:
    """8 packed rows of uneven targets; rows 2 and 3 (microbatch 1 of 4) have no target."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 20, 24)
    ids = [rng.integers(0, 50000, n).astype(np.int32) for n in lengths]
    targets = [np.arange(n) >= rng.integers(0, n) for n in lengths]
    ex = Examples(ids, targets, ACCUM_T, packing=True)
    assert len(ex) >= 8
    batch = ex[np.arange(8)]
    batch["loss_mask"][2:4] = False
    counts = batch["loss_mask"].sum(axis=1)
    assert len(set(counts.tolist())) > 3 and counts[[0, 1, 4, 5, 6, 7]].all()
    return batch


def test_accumulation_1_and_4_give_the_same_update_and_no_target_is_finite(hf_model):
    _, model_cfg, params = hf_model
    model_cfg = dataclasses.replace(model_cfg, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    optim_cfg = config_lib.base_config().optim
    # eps 1e-3, not 1e-8: the key bias's gradient is 0 but for rounding (softmax ignores a
    # shift of every score), and Adam would turn that noise into a full step of +-lr.
    optim_cfg.update(learning_rate=1e-2, warmup_steps=0, schedule="constant", eps=1e-3)
    tx, _ = optim.make_optimizer(optim_cfg, 10)
    state = step_lib.init_state(jax.random.PRNGKey(0), model_cfg=model_cfg, tx=tx, params=params)
    step = jax.jit(lambda s, b: step_lib.train_step(s, b, model_cfg=model_cfg, tx=tx))
    batch = accum_batch()

    def shaped(batch, accum):
        return {k: jnp.asarray(v.reshape(accum, 8 // accum, ACCUM_T)) for k, v in batch.items()}

    one, m1 = step(state, shaped(batch, 1))
    four, m4 = step(state, shaped(batch, 4))
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5, atol=0)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5, atol=0)
    assert helpers.tree_max_abs_diff(one["params"], state["params"]) > 1e-3  # it moved
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        four["params"],
        one["params"],
    )

    # A whole batch without a target: loss 0, no NaN, params finite.
    empty = batch | {"loss_mask": np.zeros_like(batch["loss_mask"])}
    after, m0 = step(state, shaped(empty, 1))
    assert float(m0["loss"]) == 0.0 and np.isfinite(float(m0["grad_norm"]))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(after["params"]))


# ---------------------------------------------------------------------- 6. packing


def textbook_bfd(lengths, capacity) -> list[list[int]]:
    """Textbook best-fit decreasing, O(n * rows): each length, longest first, into the
    fullest row it fits."""
    rows, room = [], []
    for n in sorted(lengths, reverse=True):
        fits = [r for r in range(len(rows)) if room[r] >= n]
        if fits:
            r = min(fits, key=lambda r: room[r])
        else:
            r = len(rows)
            rows.append([])
            room.append(capacity)
        rows[r].append(n)
        room[r] -= n
    return rows


def test_pack_is_best_fit_decreasing():
    assert best_fit_decreasing(np.array([5, 4, 3, 3, 1]), 8) == [[0, 2], [1, 3, 4]]
    rng = np.random.default_rng(1)
    for trial in range(30):
        capacity = int(rng.integers(8, 200))
        lengths = rng.integers(1, capacity + 1, int(rng.integers(1, 300)))
        if trial % 3 == 0:  # many ties
            lengths = rng.choice([1, 2, capacity // 3, capacity // 2, capacity], len(lengths))
        rows = best_fit_decreasing(lengths, capacity)
        placed = sorted(i for row in rows for i in row)
        assert placed == list(range(len(lengths)))  # each example once
        assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
        assert best_fit_decreasing(lengths, capacity) == rows  # deterministic
        # Which of several rows with the same room takes an example is a free choice; the
        # rows' fill levels are not.
        got = sorted(sum(int(lengths[i]) for i in row) for row in rows)
        want = sorted(sum(row) for row in textbook_bfd(lengths.tolist(), capacity))
        assert got == want, (capacity, lengths.tolist())


# ---------------------------------------------------------------------- 7. end to end


E2E_STEPS = 12


def sft_train_args(workdir, *extra) -> list[str]:
    """`train` of configs/sft.py:tiny (packed, completion-only loss) for E2E_STEPS steps."""
    return [
        "train",
        f"--config={SFT_TINY}",
        f"--config.train.steps={E2E_STEPS}",
        "--config.train.report_to=none",
        "--config.eval.max_batches=1",
        f"--workdir={workdir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """The packed SFT run three ways: in this process (the reference; checkpoint at the
    end), on 2 devices (a process of its own, started first: the longest), and killed with
    SIGKILL mid-run while checkpointing every step, then resumed by the same command (in
    this process). The killed run starts once the reference has compiled the step, so that
    it finds its programs in the session's compilation cache (conftest.py)."""
    root = tmp_path_factory.mktemp("sft_runs")
    killed = sft_train_args(root / "killed", "--config.train.checkpoint_every=1")
    with isolated(tmp_path_factory.getbasetemp()), ThreadPoolExecutor(1) as pool:
        two = pool.submit(
            run_cli, sft_train_args(root / "two", "--config.train.checkpoint_every=0"), devices=2
        )
        one = cli_in_process(sft_train_args(root / "one", "--config.train.checkpoint_every=0"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpt2_jax", *killed],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        ckpts = root / "killed" / "checkpoints"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if len([p for p in ckpts.glob("*") if p.name.isdigit()]) >= 3:
                break
            time.sleep(0.02)
        proc.kill()
        proc.wait(timeout=60)
        saved = ckpt_lib.Checkpointer(ckpts, read_only=True).latest_step()
        resumed = cli_in_process(killed)
        two = two.result()
    return {
        "root": root,
        "one": one,
        "two": two,
        "kill_returncode": proc.returncode,
        "saved": saved,
        "resumed": resumed,
    }


def test_kill_9_mid_run_then_the_same_command_resumes_the_packed_run(sft_runs):
    root, resumed = sft_runs["root"], sft_runs["resumed"]
    assert sft_runs["one"].returncode == 0, sft_runs["one"].stderr[-3000:]
    assert sft_runs["kill_returncode"] == -signal.SIGKILL
    saved = sft_runs["saved"]
    assert saved is not None and saved < E2E_STEPS
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ckpts = root / "killed" / "checkpoints"
    assert f"resumed from {ckpts / str(saved)}" in resumed.stdout + resumed.stderr
    assert not list(ckpts.glob("*.orbax-checkpoint-tmp*"))
    ref = train_losses(root / "one")
    assert sorted(ref) == list(range(1, E2E_STEPS + 1))
    assert train_losses(root / "killed") == ref  # bitwise: same device count
    jax.tree.map(
        np.testing.assert_array_equal,
        checkpoint_params(root / "killed"),
        checkpoint_params(root / "one"),
    )
    assert "(packed" in sft_runs["one"].stdout  # the run summary's data line


def test_two_devices_match_one_device_packed(sft_runs):
    root, two = sft_runs["root"], sft_runs["two"]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "'data': 2" in two.stdout + two.stderr
    ref, got = train_losses(root / "one"), train_losses(root / "two")
    assert sorted(got) == sorted(ref)
    np.testing.assert_allclose(
        [got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-5, atol=0
    )
    evals = [helpers.last_json(p.stdout)[0] for p in (sft_runs["one"], two)]
    assert evals[0]["tokens"] == evals[1]["tokens"] > 0
    np.testing.assert_allclose(evals[1]["loss"], evals[0]["loss"], rtol=1e-5, atol=0)


# ---------------------------------------------------------------------- 8. bad input


def assert_refused(proc, workdir, *needles: str) -> None:
    """Exit 2, one 'gpt2-jax train: error:' line naming the thing, no traceback, and the
    workdir never created."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("gpt2-jax train: error: "), err[-3000:]
    for needle in needles:
        assert needle in err, (needle, err[-3000:])
    assert not workdir.exists()


def bad_train(tmp_path, rows, *overrides: str):
    """`train` of configs/sft.py:tiny on ``rows`` (written as jsonl; all of them train, and
    train is the eval split) in this process."""
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    return cli_in_process(
        ["train", f"--config={SFT_TINY}", f"--workdir={tmp_path / 'run'}",
         f"--config.data.train_files={path}", "--config.data.validation_split_percentage=0",
         "--config.eval.splits=train", *overrides]
    )  # fmt: skip


GOOD = [{"prompt": f"Question {i}:", "completion": f" answer {i}."} for i in range(8)]


@pytest.mark.parametrize(
    "rows, overrides, needles",
    [
        (
            [{"question": "Q", "completion": " A"}],
            (),
            ("data.prompt_column='prompt'", "['question', 'completion']"),
        ),
        ([*GOOD[:3], {"prompt": "Q", "completion": None}, *GOOD[3:]], (), ("row 3", "None")),
        pytest.param(
            [*GOOD[:3], {"prompt": "Q", "completion": 5}, *GOOD[3:]],
            (),
            ("row 3", "int 5"),
        ),
        (
            [{"prompt": "word " * 80, "completion": " A"} for _ in range(4)],
            (),
            ("no example with a completion token", "data.block_size=64", "4 skipped"),
        ),
        (
            GOOD,
            (
                "--config.data.format=text",
                "--config.data.packing=false",
                "--config.data.document_mask=true",
            ),
            ("data.document_mask=true needs data.append_eos=true",),
        ),
        (GOOD, ("--config.data.format=text",), ("data.packing", "data.document_mask=true")),
        (GOOD, ("--config.eval.stride=16",), ("eval.stride", "'prompt_completion'")),
    ],
    ids=[
        "missing_column",
        "null_value",
        "number_among_strings",
        "every_example_empty",
        "document_mask_without_eos",
        "packing_with_text",
        "stride_with_sft",
    ],
)
def test_bad_input_is_one_error_line_and_nothing_written(tmp_path, rows, overrides, needles):
    proc = bad_train(tmp_path, rows, *overrides)
    assert_refused(proc, tmp_path / "run", *needles)
