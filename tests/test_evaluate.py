"""Block loss and sliding-window perplexity against PyTorch / Hugging Face references."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpt2_jax.evaluation import perplexity as evaluate
from gpt2_jax.weights import hf

from .helpers import ROOT, random_hf_model, torch_sliding_window, wiki_ids

# Many small PyTorch forwards: one thread is ~10x faster than 2 on a shared 2-core box.
pytestmark = pytest.mark.usefixtures("torch_one_thread")

SMALL = dict(n_layer=3, n_head=4, n_embd=64, n_positions=96, n_inner=96, vocab_size=50257)
BLOCK = 64


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(torch GPT2LMHeadModel with random weights, our cfg, our params) of the same model."""
    m = random_hf_model(0, **SMALL)
    path = tmp_path_factory.mktemp("eval_model")
    m.save_pretrained(path)
    cfg, params = hf.load_pretrained(path)
    return m, cfg, params


def torch_loss(m, ids: np.ndarray, labels: np.ndarray | None = None) -> float:
    ids_t = torch.as_tensor(ids, dtype=torch.long)[None]
    labels_t = ids_t if labels is None else torch.as_tensor(labels, dtype=torch.long)[None]
    with torch.no_grad():
        return float(m(ids_t, labels=labels_t).loss)


# ---------------------------------------------------------------------- blocks


def test_eval_blocks_matches_pytorch(pair):
    m, cfg, params = pair
    blocks = wiki_ids(37 * BLOCK).reshape(37, BLOCK)  # batch 8: the last batch holds 5
    got = evaluate.eval_blocks(cfg, params, blocks, batch_size=8, progress=False)
    # All blocks have BLOCK - 1 predictions: the token-weighted mean is the mean of means.
    expected = np.mean([torch_loss(m, b) for b in blocks])
    np.testing.assert_allclose(got["loss"], expected, rtol=1e-5)
    assert got["tokens"] == 37 * (BLOCK - 1)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)


def test_eval_blocks_compiles_once(pair):
    _, cfg, params = pair
    blocks = wiki_ids(20 * BLOCK).reshape(20, BLOCK)
    evaluate.eval_blocks(cfg, params, blocks[:16], batch_size=8, progress=False)
    compiled = evaluate._blocks_nll_sum._cache_size()
    for n in (1, 7, 13, 20):  # partial last batches of every size: padded, not recompiled
        evaluate.eval_blocks(cfg, params, blocks[:n], batch_size=8, progress=False)
    assert evaluate._blocks_nll_sum._cache_size() == compiled


def test_eval_blocks_padding_does_not_count(pair):
    _, cfg, params = pair
    blocks = wiki_ids(9 * BLOCK).reshape(9, BLOCK)
    one_by_one = [
        evaluate.eval_blocks(cfg, params, blocks[i : i + 1], batch_size=4, progress=False)["loss"]
        for i in range(9)
    ]
    together = evaluate.eval_blocks(cfg, params, blocks, batch_size=4, progress=False)
    np.testing.assert_allclose(together["loss"], np.mean(one_by_one), rtol=1e-6)


# Runs with 2 simulated devices (XLA_FLAGS must be set before jax starts, hence a process).
# The jitted pieces are wrapped to record how their input_ids arrive: split over 2 devices.
_SHARDED_EVAL = """
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from gpt2_jax.evaluation import perplexity as evaluate
from gpt2_jax.model import gpt2 as model

from gpt2_jax.model import config as gpt2_config
assert jax.device_count() == 2, jax.devices()
cfg = gpt2_config.GPT2Config(**json.loads(sys.argv[1]))
params = model.init_params(cfg, jax.random.PRNGKey(0))
ids = np.load(sys.argv[2])
seen = []
for name in ("_blocks_nll_sum", "_windows_nll"):
    def spy(cfg, params, input_ids, *rest, _real=getattr(evaluate, name), **kw):
        seen.append([len(input_ids.sharding.device_set), input_ids.shape[0],
                     input_ids.addressable_shards[0].data.shape[0]])
        return _real(cfg, params, input_ids, *rest, **kw)
    setattr(evaluate, name, spy)
batch = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
blocks = ids[: 11 * 64].reshape(11, 64)  # batch 4: 3 batches, the last one padded
out = {}
for placed, sh in (("sharded", batch), ("plain", None)):
    seen.clear()
    out[placed] = {
        "blocks": evaluate.eval_blocks(cfg, params, blocks, 4, batch_sharding=sh, progress=False),
        "window": evaluate.eval_sliding_window(
            cfg, params, ids, 64, 24, 4, batch_sharding=sh, progress=False
        ),
        "seen": list(seen),
    }
print(json.dumps(out))
"""


def test_eval_on_two_devices_splits_each_batch_and_matches_one(tmp_path):
    """Batch-sharded eval (blocks and sliding window) really runs split over 2 devices."""
    # A small vocabulary keeps the 4 compilations cheap; the check is about placement.
    small = dict(n_layer=1, n_head=2, n_embd=32, n_positions=BLOCK, vocab_size=1000)
    ids = np.random.default_rng(0).integers(0, 1000, 11 * BLOCK).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_EVAL, json.dumps(small), str(tmp_path / "ids.npy")],
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    # [devices holding the batch, batch rows, rows on the first device] per jitted call
    sharded, plain = out["sharded"], out["plain"]
    assert len(sharded["seen"]) > 3 and all(s == [2, 4, 2] for s in sharded["seen"])
    assert all(s == [1, 4, 4] for s in plain["seen"])
    for kind in ("blocks", "window"):
        assert sharded[kind]["tokens"] == plain[kind]["tokens"] > 0
        # One device vs two differ only in reduction order (~1e-6 relative).
        np.testing.assert_allclose(sharded[kind]["loss"], plain[kind]["loss"], rtol=1e-5)


def test_eval_blocks_rejects_bad_input(pair):
    _, cfg, params = pair
    with pytest.raises(ValueError, match="no blocks"):
        evaluate.eval_blocks(cfg, params, np.zeros((0, BLOCK), np.int32), 4, progress=False)
    with pytest.raises(ValueError, match="n_positions=96"):
        evaluate.eval_blocks(cfg, params, np.zeros((2, 97), np.int32), 4, progress=False)


# ---------------------------------------------------------------------- sliding window


@pytest.mark.parametrize(
    "n_tokens, max_length, stride",
    [
        (2000, 64, 32),
        (1000, 64, 64),  # disjoint chunks
        (1001, 64, 48),  # a last window with a single label
        (777, 96, 40),  # max_length == n_positions
        (50, 64, 32),  # one window shorter than max_length
    ],
)
def test_sliding_window_matches_hf_reference(pair, n_tokens, max_length, stride):
    m, cfg, params = pair
    ids = wiki_ids(n_tokens)
    got = evaluate.eval_sliding_window(
        cfg, params, ids, max_length, stride, batch_size=4, progress=False
    )
    loss, n_counted = torch_sliding_window(m, ids, max_length, stride)
    np.testing.assert_allclose(got["perplexity"], math.exp(loss), rtol=1e-5)
    assert got["tokens"] == n_counted


def test_sliding_window_exact_loss(pair):
    """exact_loss is the plain mean NLL of each token, scored once, given its window."""
    m, cfg, params = pair
    ids = wiki_ids(300)
    got = evaluate.eval_sliding_window(cfg, params, ids, 64, 24, batch_size=3, progress=False)
    total, count = 0.0, 0
    for begin, end, trg_len in evaluate.window_plan(len(ids), 64, 24):
        labels = ids[begin:end].copy()
        labels[: end - begin - trg_len] = -100
        n = int(np.sum(labels[1:] != -100))
        total += torch_loss(m, ids[begin:end], labels) * n
        count += n
    assert got["scored_tokens"] == count == len(ids) - 1
    np.testing.assert_allclose(got["exact_loss"], total / count, rtol=1e-5)


@pytest.mark.parametrize(
    "seq_len, max_length, stride",
    [
        (2, 64, 32),
        (1000, 64, 32),
        (1001, 64, 48),
        (1000, 64, 1),
        (63, 64, 64),
        (1000, 64, 64),
    ],
)
def test_window_plan_scores_every_token_once(seq_len, max_length, stride):
    plan = evaluate.window_plan(seq_len, max_length, stride)
    times = np.zeros(seq_len, int)
    for begin, end, trg_len in plan:
        assert 0 < end - begin <= max_length and trg_len >= 1
        first = max(end - trg_len, begin + 1)  # a window's position 0 has no prediction
        times[first:end] += 1
        if stride < max_length and begin > 0:
            assert first - begin >= max_length - stride  # full context except at the end
    assert plan[-1, 1] == seq_len and plan[:, 2].sum() == seq_len
    if stride < max_length:
        np.testing.assert_array_equal(times[1:], 1)
    else:  # disjoint chunks: each chunk's first token has no context and is not scored
        assert set(times[plan[:, 0]]) == {0} and times.sum() == seq_len - len(plan)


def test_sliding_window_rejects_bad_arguments(pair):
    _, cfg, params = pair
    ids = np.arange(500, dtype=np.int32)
    with pytest.raises(ValueError, match="stride=65"):
        evaluate.eval_sliding_window(cfg, params, ids, 64, 65, 2, progress=False)
    with pytest.raises(ValueError, match="n_positions=96"):
        evaluate.eval_sliding_window(cfg, params, ids, 128, 64, 2, progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate.eval_sliding_window(cfg, params, ids[:1], 64, 32, 2, progress=False)
