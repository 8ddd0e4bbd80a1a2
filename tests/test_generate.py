"""KV-cache generation: cached = uncached logits, greedy = transformers, sampling, buckets."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.cli import main as cli
from gpt2_jax.data import tokenizer
from gpt2_jax.evaluation import buckets as bucket_lib
from gpt2_jax.evaluation import generate as g
from gpt2_jax.model import decode as decode_lib
from gpt2_jax.model import gpt2 as m
from gpt2_jax.weights import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("torch_one_thread")

EOS = 50256
# Odd sizes catch shape bugs: 3 heads of 16, n_inner 80, 96 positions.
ODD = dict(n_layer=3, n_head=3, n_embd=48, n_inner=80, n_positions=96)
PROMPTS = [[464, 2068, 7586], [15496, 11, 616, 1438, 318, 1757, 13, 314, 588], [50, 51]]


def random_hf_model(seed: int, **sizes) -> transformers.GPT2LMHeadModel:
    """GPT2LMHeadModel with every parameter random (biases, LayerNorms too), spread wide
    enough (0.1) that greedy decoding has no near-ties for float rounding to flip."""
    torch.manual_seed(seed)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**sizes)).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            is_ln_scale = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if is_ln_scale else 0.1 * torch.randn_like(p))
    return hf_model


def hf_greedy(hf_model, prompt: list[int], n: int, **kwargs) -> tuple[list[int], float]:
    """transformers' greedy continuation (stops at <|endoftext|>) and the smallest
    top-1 / top-2 gap of the processed scores along it; kwargs go to ``generate``."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.as_tensor([prompt]),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=EOS,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    gaps = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
    return out.sequences[0, len(prompt) :].tolist(), min(gaps)


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """Odd-shaped random HF model: (torch model, directory)."""
    hf_model = random_hf_model(5, **ODD)  # seed: every greedy step's top-2 gap > 9e-3
    path = tmp_path_factory.mktemp("odd")
    hf_model.save_pretrained(path)
    return hf_model, path


def full_logits(cfg, params, ids: list[int]) -> np.ndarray:
    """The uncached forward of one unpadded row: [len(ids), V]."""
    return np.asarray(jax.jit(m.GPT2(cfg).apply)({"params": params}, jnp.asarray([ids])))[0]


# ---------------------------------------------------------------------- cache = no cache


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_logits_equal_full_forward_at_every_position(odd, scan_layers):
    """Left-padded batch, prefill then one token per call: every real position of every
    row equals the full forward of that row alone."""
    cfg, params = hf.load_pretrained(odd[1], scan_layers=scan_layers)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (10, 15)]
    prompt_lens, steps = [4, 9], 6
    Pb, S = 9, 16
    prompt = np.zeros((2, Pb), np.int32)
    for b, (seq, n) in enumerate(zip(seqs, prompt_lens, strict=True)):
        prompt[b, Pb - n :] = seq[:n]
    key_start = jnp.asarray([Pb - n for n in prompt_lens], jnp.int32)
    positions = jnp.maximum(jnp.arange(Pb)[None] - key_start[:, None], 0)
    step = jax.jit(
        lambda p, ids, pos, c, t, ks: decode_lib.cached_forward(cfg, p, ids, pos, c, t, ks)
    )
    logits, cache = step(params, prompt, positions, decode_lib.init_cache(cfg, 2, S), 0, key_start)
    got = [[np.asarray(logits[b, Pb - n :])] for b, n in enumerate(prompt_lens)]
    for i in range(steps):
        tok = jnp.asarray([[seq[n + i]] for seq, n in zip(seqs, prompt_lens, strict=True)])
        t = Pb + i
        logits, cache = step(params, tok, t - key_start[:, None], cache, t, key_start)
        for b in range(2):
            got[b].append(np.asarray(logits[b]))
    for b, (seq, n) in enumerate(zip(seqs, prompt_lens, strict=True)):
        expected = full_logits(cfg, params, seq[: n + steps])
        np.testing.assert_allclose(np.concatenate(got[b]), expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------- = transformers


@pytest.mark.parametrize("scan_layers", [True, False])
def test_greedy_batch_equals_transformers_each_prompt_alone(odd, scan_layers):
    hf_model, path = odd
    cfg, params = hf.load_pretrained(path, scan_layers=scan_layers)
    rows = g.generate_batch(cfg, params, PROMPTS, 48, temperature=0.0, stop_token=EOS)
    for prompt, row in zip(PROMPTS, rows, strict=True):
        expected, gap = hf_greedy(hf_model, prompt, 48)
        assert gap > 1e-3, f"near-tie {gap}: pick another seed"
        assert row == expected
    # The single-prompt API is row 0 of a batch of one.
    assert g.generate(cfg, params, PROMPTS[1], 48, temperature=0.0, stop_token=EOS) == rows[1]


def test_repetition_penalty_equals_transformers(odd):
    hf_model, path = odd
    cfg, params = hf.load_pretrained(path)
    plain = g.generate_batch(cfg, params, PROMPTS, 48, temperature=0.0, stop_token=EOS)
    rows = g.generate_batch(
        cfg, params, PROMPTS, 48, temperature=0.0, stop_token=EOS, repetition_penalty=1.6
    )
    for prompt, row in zip(PROMPTS, rows, strict=True):
        expected, gap = hf_greedy(hf_model, prompt, 48, repetition_penalty=1.6)
        # fp32 rounding differs between the stacks by ~1e-5 at these logit sizes
        assert gap > 2e-4, f"near-tie {gap}: pick another seed or penalty"
        assert row == expected  # the prompt's tokens count too, padding does not
    assert rows != plain  # the penalty changed the continuations
    # Fewer repeated tokens than plain greedy in every row that repeated at all.
    for a, b in zip(rows, plain, strict=True):
        assert len(set(a)) / len(a) >= len(set(b)) / len(b)


def test_penalize_repeats_and_seen_ignore_padding():
    logits = jnp.asarray([[2.0, -2.0, 1.0, -1.0]])
    seen = jnp.asarray([[True, True, False, False]])
    np.testing.assert_allclose(
        g.penalize_repeats(logits, seen, 2.0), [[1.0, -4.0, 1.0, -1.0]], rtol=0, atol=0
    )
    tokens = jnp.asarray([[3, 3, 1, 2, 0], [0, 1, 1, 1, 1]], jnp.int32)
    # row 0: slots 2..3 real (1, 2); row 1: slots 0..3 real (0, 1); slot 4 not yet written
    seen = g._seen(tokens, jnp.asarray([2, 0]), jnp.int32(3), 4)
    np.testing.assert_array_equal(seen, [[False, True, True, False], [True, True, False, False]])


@pytest.fixture(scope="module")
def gpt2_shape(tmp_path_factory):
    """GPT-2 124M shape, random weights, saved in HF format: (torch model, directory)."""
    with torch.device("meta"):  # HF's own init of 124M parameters is slow
        hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    hf_model = hf_model.to_empty(device="cpu").eval()
    hf_model.tie_weights()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.1)  # wider than GPT-2's 0.02: clear argmax margins
            else:
                p.copy_(float(name.endswith(".weight")) + 0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("gpt2_shape")
    hf_model.save_pretrained(path)
    return hf_model, path


def test_greedy_equals_transformers_on_gpt2_124m_shape(gpt2_shape):
    hf_model, path = gpt2_shape
    cfg, params = hf.load_pretrained(path)
    assert m.count_params(params) == 124_439_808
    prompts = PROMPTS[:2]
    rows = g.generate_batch(cfg, params, prompts, 48, temperature=0.0, stop_token=EOS)
    for prompt, row in zip(prompts, rows, strict=True):
        expected, gap = hf_greedy(hf_model, prompt, 48)
        assert gap > 1e-3, f"near-tie {gap}: pick another seed"
        assert row == expected


# ---------------------------------------------------------------------- sampling


def test_filter_logits_top_p_keeps_smallest_set_reaching_p():
    probs = np.array([0.15, 0.05, 0.5, 0.1, 0.2])  # sorted: 0.5, 0.2, 0.15, 0.1, 0.05
    logits = jnp.log(jnp.asarray([probs], jnp.float32))
    for top_p, kept in [(0.45, {2}), (0.6, {2, 4}), (0.8, {2, 4, 0}), (0.97, {0, 1, 2, 3, 4})]:
        out = np.asarray(g.filter_logits(logits, 1.0, 0, top_p))[0]
        assert set(np.flatnonzero(np.isfinite(out))) == kept, top_p
        np.testing.assert_allclose(out[list(kept)], np.log(probs[list(kept)]), rtol=1e-6)


def test_filter_logits_temperature_and_top_k():
    logits = jnp.asarray([[1.0, 3.0, -2.0, 2.5, 0.0]])
    np.testing.assert_allclose(g.filter_logits(logits, 0.5, 0, 1.0), logits / 0.5, rtol=1e-6)
    out = np.asarray(g.filter_logits(logits, 2.0, 2, 1.0))[0]
    assert set(np.flatnonzero(np.isfinite(out))) == {1, 3}
    np.testing.assert_allclose(out[[1, 3]], [1.5, 1.25], rtol=1e-6)


def test_filter_logits_equals_a_sort_on_random_rows():
    """The bisection cut equals numpy's sort-based top-k and top-p on wide random rows
    (with repeated values, so ties at the cut occur)."""
    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=(6, 5000)) * 4, 1).astype(np.float32)  # many ties
    for top_k, top_p in [(7, 1.0), (1, 1.0), (0, 0.3), (0, 0.9), (50, 0.5)]:
        out = np.asarray(g.filter_logits(jnp.asarray(logits), 1.0, top_k, top_p))
        for row, got in zip(logits, out, strict=True):
            keep = np.ones_like(row, bool)
            if top_k:
                keep &= row >= np.sort(row)[-top_k]
            if top_p < 1:
                z = np.where(keep, row, -np.inf)
                probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                order = np.sort(probs)[::-1]
                cut = order[np.searchsorted(np.cumsum(order), top_p)]
                keep &= probs >= cut
            np.testing.assert_array_equal(np.isfinite(got), keep, err_msg=f"{top_k} {top_p}")


def test_sample_frequencies_follow_temperature():
    """Many rows of one 5-way distribution: the frequencies are softmax(logits / T), so
    the entropy grows with T."""
    logits = jnp.tile(jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0]]), (20000, 1))
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(0), jnp.arange(20000))
    entropies = []
    for temperature in (0.5, 1.0, 2.0):
        draws = np.asarray(g._sample(logits, keys, 0, g.Sampling(temperature, 0, 1.0)))
        freq = np.bincount(draws, minlength=5) / len(draws)
        expected = np.asarray(jax.nn.softmax(logits[0] / temperature))
        np.testing.assert_allclose(freq, expected, atol=0.015)
        entropies.append(-(freq * np.log(freq)).sum())
    assert entropies[0] < entropies[1] < entropies[2]


def test_seed_top_k_and_low_temperature(odd):
    cfg, params = hf.load_pretrained(odd[1])
    params = g.decode_params(cfg, params)
    greedy = g.generate_batch(cfg, params, PROMPTS, 20, temperature=0.0)
    a = g.generate_batch(cfg, params, PROMPTS, 20, temperature=1.0, seed=3)
    assert a == g.generate_batch(cfg, params, PROMPTS, 20, temperature=1.0, seed=3)
    assert a != g.generate_batch(cfg, params, PROMPTS, 20, temperature=1.0, seed=4)
    assert a != greedy
    assert g.generate_batch(cfg, params, PROMPTS, 20, temperature=1.0, top_k=1) == greedy
    assert g.generate_batch(cfg, params, PROMPTS, 20, temperature=1e-4, seed=5) == greedy
    # A row's samples do not depend on its batch-mates (their lengths change the bucket).
    assert g.generate(cfg, params, PROMPTS[0], 20, temperature=1.0, seed=3) == a[0]
    # Chunked decoding (the CLI's streaming) draws the same tokens.
    chunks = g.stream_batch(cfg, params, PROMPTS, 20, 1.0, seed=3, chunk_size=6)
    assert np.concatenate(list(chunks), axis=1).tolist() == a


def test_stop_token_ends_each_row_on_its_own(odd):
    cfg, params = hf.load_pretrained(odd[1])
    free = g.generate_batch(cfg, params, PROMPTS, 30, temperature=1.0, seed=1)
    stop = free[0][4]
    rows = g.generate_batch(cfg, params, PROMPTS, 30, temperature=1.0, seed=1, stop_token=stop)
    for before, after in zip(free, rows, strict=True):
        expected = before[: before.index(stop) + 1] if stop in before else before
        assert after == expected
    assert len(rows[0]) <= 5


# ---------------------------------------------------------------------- buckets


_COMPILES = []


def _count_compiles(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(duration)


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def test_no_recompile_within_a_bucket(odd):
    cfg, params = hf.load_pretrained(odd[1])
    params = g.decode_params(cfg, params)
    assert bucket_lib.decode_buckets(96, 3, 20) == (8, 32) and bucket_lib.decode_buckets(
        96, 5, 24
    ) == (8, 32)
    g.generate_batch(cfg, params, [[1, 2, 3], [4, 5]], 20, temperature=0.0)
    before = len(_COMPILES)
    for prompts, n in [([[1, 2, 3, 4, 5], [6]], 24), ([[7] * 8, [8, 9, 10]], 17)]:
        g.generate_batch(cfg, params, prompts, n, temperature=0.0)
    assert len(_COMPILES) == before
    g.generate_batch(cfg, params, [[1] * 9, [2]], 20, temperature=0.0)  # Pb 16: new bucket
    assert len(_COMPILES) > before  # the counter does see compiles
    # Near the context limit the prompt is not rounded up: the cache never exceeds it.
    assert bucket_lib.decode_buckets(96, 40, 50) == (40, 96)


def test_executable_cache_is_bounded_and_recompiles_an_evicted_entry(odd, monkeypatch):
    """At most ``DECODE_EXECUTABLES_KEPT`` compiled programs: the least recently used goes, and
    is compiled again (to the same tokens) when asked for again."""
    from gpt2_jax.core.cache import LRU

    cfg, params = hf.load_pretrained(odd[1])
    params = g.decode_params(cfg, params)
    monkeypatch.setattr(g, "_EXECUTABLES", LRU(2))  # one prefill and one decode

    def run(prompts):
        stats = g.Stats()
        rows = list(g.stream_batch(cfg, params, prompts, 6, temperature=0.0, stats=stats))
        return np.concatenate(rows, axis=1).tolist(), stats.compile_seconds

    short, compiled = run([[1, 2, 3]])  # prompt bucket 8
    assert compiled > 0 and len(g._EXECUTABLES) == 2
    assert run([[1, 2, 3]]) == (short, 0.0)  # both kept
    _, compiled = run([[1] * 9])  # prompt bucket 16: two new programs, the old two out
    assert compiled > 0 and len(g._EXECUTABLES) == 2
    again, compiled = run([[1, 2, 3]])
    assert again == short and compiled > 0


def test_params_placed_elsewhere_get_their_own_executable(odd):
    """One process, params on device 0, then device 1, then replicated over both: the
    executable cache keys the placement, so each decodes (the same tokens) instead of
    failing on a sharding mismatch."""
    import os
    import subprocess
    import sys

    code = f"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from gpt2_jax.evaluation import generate as g
from gpt2_jax.weights import hf
cfg, params = hf.load_pretrained({str(odd[1])!r})
params = g.decode_params(cfg, params)
mesh = Mesh(np.array(jax.devices()), ("data",))
for place in [*jax.devices(), NamedSharding(mesh, PartitionSpec())]:
    out = g.generate_batch(cfg, jax.device_put(params, place), {PROMPTS!r}, 6, temperature=0.0)
    print(np.asarray(out).tolist())
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = r.stdout.strip().splitlines()
    assert len(rows) == 3 and len(set(rows)) == 1, rows


def test_api_rejects_bad_requests(odd):
    cfg, params = hf.load_pretrained(odd[1])
    for kwargs, needle in [
        (dict(prompts=[[1], []]), "prompt 1 is empty"),
        (dict(prompts=[[1] * 50], max_new_tokens=47), "97 > n_positions=96"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(temperature=-0.5), "temperature=-0.5"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
        (dict(prompts=[[50257]]), "outside [0, 50257)"),
    ]:
        args = {"prompts": [[1, 2]], "max_new_tokens": 4, **kwargs}
        with pytest.raises(ValueError, match=re.escape(needle)):
            g.generate_batch(cfg, params, **args)


# ---------------------------------------------------------------------- CLI


def test_cli_streams_greedy_text_equal_to_the_api(odd, capsys):
    cfg, params = hf.load_pretrained(odd[1])
    enc = tokenizer.get_tokenizer()
    args = ["generate", f"--init_from=hf:{odd[1]}", "--temperature=0", "--max_new_tokens=40"]
    assert cli.main([*args, "--prompt=Hello world"]) == 0
    out = capsys.readouterr()
    ids = enc.encode_ordinary("Hello world")
    new = g.generate(cfg, params, ids, 40, temperature=0.0, stop_token=EOS)
    assert out.out == tokenizer.decode(enc, ids + new) + "\n"
    assert "new tokens" in out.err and "compile" in out.err and "tokens/s" in out.err


def test_cli_prompt_file_and_num_samples(odd, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world\nThe cat sat on\n")
    args = ["generate", f"--init_from=hf:{odd[1]}", f"--prompt_file={prompts}"]
    assert cli.main([*args, "--max_new_tokens=8", "--num_samples=2", "--seed=1"]) == 0
    out = capsys.readouterr().out
    assert out.count("Hello world") == 2 and out.count("The cat sat on") == 2
    assert "prompt 2, sample 2" in out


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--prompt="], "--prompt"),
        (["--max_new_tokens=0"], "--max_new_tokens=0"),
        (["--temperature=-1"], "--temperature=-1.0"),
        (["--top_k=-1"], "--top_k=-1"),
        (["--top_p=1.5"], "--top_p=1.5"),
        (["--num_samples=0"], "--num_samples=0"),
        (["--repetition_penalty=-1"], "--repetition_penalty=-1.0"),
        (["--prompt_file=/nonexistent/p.txt"], "--prompt_file=/nonexistent/p.txt"),
        (["--prompt=" + "word " * 80, "--max_new_tokens=40"], "n_positions=96"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(odd, flags, needle, capsys):
    assert cli.main(["generate", f"--init_from=hf:{odd[1]}", *flags]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt2-jax generate: error: "), out.err
    assert needle in lines[0] and out.out == ""
