"""The lm-evaluation-harness backend: the same per-sample results as lm-eval's own hf
backend on the same weights, on 1 and 2 devices; bounded compiles; the CLI; training."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt2_jax.data import tokenizer
from gpt2_jax.evaluation import harness
from gpt2_jax.model import losses as losses_lib
from gpt2_jax.weights import hf

from . import helpers

TASK_DIR = helpers.TEST_DATA / "harness"
TASKS = ["tiny_lambada", "tiny_mc", "tiny_wikitext", "tiny_gen", "tiny_greedy"]
# Odd sizes, n_positions not a power of two (the last length bucket is 80), and wikitext
# documents of up to ~1,900 tokens: many rolling windows.
SHAPE = dict(n_layer=2, n_head=3, n_embd=48, n_positions=80, n_inner=80, vocab_size=50257)
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _write_hf_dir(m, out: Path) -> Path:
    m.save_pretrained(out)
    encoder_json, vocab_bpe = tokenizer.vocab_files()
    shutil.copyfile(encoder_json, out / "vocab.json")  # what lm-eval's hf backend reads
    shutil.copyfile(vocab_bpe, out / "merges.txt")
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random GPT-2 in Hugging Face format (large weights: log-probabilities that vary
    and greedy tokens that differ by row), and the shipped tasks with absolute paths,
    plus ``tiny_greedy``: continuations that are the model's own greedy tokens, so that
    is-greedy is true for some requests."""
    import torch

    root = tmp_path_factory.mktemp("harness")
    m = helpers.random_hf_model(0, **SHAPE)
    with torch.no_grad():
        m.transformer.wte.weight.mul_(3.0)  # tied: sharper next-token distributions
    model_dir = _write_hf_dir(m, root / "model")
    tasks = root / "tasks"
    tasks.mkdir()
    for y in TASK_DIR.glob("*.yaml"):
        text = y.read_text().replace("tests/data/harness/", f"{TASK_DIR}/")
        (tasks / y.name).write_text(text)
    enc = tokenizer.get_tokenizer()
    rows = []
    for line in (TASK_DIR / "tiny_gen.jsonl").read_text().splitlines()[:8]:
        context = json.loads(line)["context"]
        ids = torch.tensor([enc.encode_ordinary(context)])
        with torch.no_grad():
            out = m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=50256)
        rows.append({"context": context, "cont": enc.decode(out[0, ids.shape[1] :].tolist())})
    (root / "tiny_greedy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_greedy.yaml").write_text(
        (tasks / "tiny_lambada.yaml")
        .read_text()
        .replace("task: tiny_lambada", "task: tiny_greedy")
        .replace(f"{TASK_DIR}/tiny_lambada.jsonl", str(root / "tiny_greedy.jsonl"))
        .replace(
            """doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}\"""", 'doc_to_text: "{{context}}"'
        )
        .replace("""doc_to_target: "{{' '+text.split(' ')[-1]}}\"""", 'doc_to_target: "{{cont}}"')
    )
    manager = harness.task_manager(str(tasks), include_defaults=False)
    return {"root": root, "model": model_dir, "tasks": tasks, "manager": manager}


def _evaluate(model, setup, tasks=TASKS, **kwargs):
    import lm_eval

    from gpt2_jax.evaluation.harness import results as results_lib

    # lm-eval's own backend in this (JAX, multithreaded) process: no forked bootstrap pool.
    with results_lib.bootstrap_in_process():
        return lm_eval.simple_evaluate(
            model=model,
            tasks=list(tasks),
            task_manager=setup["manager"],
            log_samples=True,
            **kwargs,
        )


@pytest.fixture(scope="module")
def reference(setup):
    """lm-eval's own hf backend on the same directory (PyTorch, fp32, batch 8)."""
    return _evaluate(
        "hf", setup, model_args=f"pretrained={setup['model']}", batch_size=8, device="cpu"
    )


@pytest.fixture(scope="module")
def ours(setup):
    lm = harness.GPT2JaxLM.from_hf(setup["model"], batch_size=8, progress=False)
    results = harness.run(lm, TASKS, setup["manager"], log_samples=True)
    return lm, results


def _responses(samples: list[dict]) -> dict[int, list]:
    """doc_id -> the raw responses, as lm-eval's samples files hold them (strings)."""
    return {s["doc_id"]: harness_json(s["resps"]) for s in samples}


def harness_json(x):
    """lm-eval writes a response (logprob, is_greedy) as ["-17.2", "False"]; in memory it
    is a tuple. One form for both."""
    if isinstance(x, (list, tuple)):
        return [harness_json(v) for v in x]
    return str(x)


def assert_same_samples(mine: list[dict], ref: list[dict], rtol: float) -> int:
    """Every per-request response equal: log-likelihoods to rtol, flags and strings exactly.
    Returns how many responses were compared."""
    a, b = _responses(mine), _responses(ref)
    assert sorted(a) == sorted(b)
    n = 0
    for doc in a:
        for x, y in zip(np.ravel(np.array(a[doc], dtype=object)),
                        np.ravel(np.array(b[doc], dtype=object)), strict=True):  # fmt: skip
            try:
                fx, fy = float(x), float(y)
            except ValueError:  # a flag or a generated string
                assert x == y, (doc, x, y)
            else:
                np.testing.assert_allclose(fx, fy, rtol=rtol, atol=0, err_msg=str(doc))
            n += 1
    return n


def _close(a, b, rtol):
    for key, value in a.items():
        if isinstance(value, float):
            np.testing.assert_allclose(value, b[key], rtol=rtol, atol=1e-12, err_msg=key)
        else:
            assert value == b[key], key


# ---------------------------------------------------------------------- parity with hf


def test_every_sample_matches_lm_eval_hf_backend(ours, reference):
    _, mine = ours
    for task in TASKS:
        n = assert_same_samples(mine["samples"][task], reference["samples"][task], rtol=1e-5)
        assert n >= 5, task
    # The tasks exercise what they are meant to: long documents (several rolling windows),
    # left truncation, greedy flags both ways, and generated text.
    flags = [r[0][1] for s in mine["samples"]["tiny_greedy"] for r in [s["resps"][0]]]
    assert any(flags)
    lambada = [s["resps"][0][0][1] for s in mine["samples"]["tiny_lambada"]]
    assert not all(lambada)
    texts = [s["resps"][0][0] for s in mine["samples"]["tiny_gen"]]
    assert len(set(texts)) > 3 and all("." not in t and "\n" not in t for t in texts)


def test_aggregated_metrics_match_lm_eval_hf_backend(ours, reference):
    _, mine = ours
    for task in TASKS:
        _close(mine["results"][task], reference["results"][task], rtol=1e-5)


def test_rolling_documents_are_longer_than_the_context(ours, setup):
    enc = tokenizer.get_tokenizer()
    docs = [
        json.loads(x)["page"]
        for x in (TASK_DIR / "tiny_wikitext.jsonl").read_text().split("\n")
        if x
    ]
    lengths = [len(enc.encode_ordinary(d)) for d in docs]
    assert max(lengths) > 10 * SHAPE["n_positions"] and min(lengths) < SHAPE["n_positions"]
    lambada = [
        json.loads(x)["text"]
        for x in (TASK_DIR / "tiny_lambada.jsonl").read_text().split("\n")
        if x
    ]
    assert max(len(enc.encode_ordinary(t)) for t in lambada) > SHAPE["n_positions"] + 1


# ---------------------------------------------------------------------- task index


def _closure_entries(manager, names) -> dict:
    """The index entries of ``names`` and of everything they load (group members, tag
    tasks), followed to the end."""
    from gpt2_jax.evaluation.harness import task_scope

    out, todo = {}, list(names)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out[name] = manager.task_index.get(name)
        if out[name] is not None:
            todo += task_scope._members(out[name])
    return out


def test_scoped_task_manager_holds_the_full_index_entries(setup, tmp_path, monkeypatch):
    """A task, a group and a tag of lm-eval's own, with --include_path: the entries the
    command's manager holds for them (and for what they load) are the full index's, and
    nothing is written under the cache root. (load_tasks then loads each task's data.)"""
    from lm_eval.tasks import TaskManager

    from gpt2_jax.evaluation.harness import task_scope

    monkeypatch.setenv("GPT2_JAX_CACHE", str(tmp_path / "cache"))
    theirs = TaskManager(include_path=[str(setup["tasks"])])
    scope = task_scope.Scope([str(setup["tasks"])])
    for names in (["lambada_openai", "tiny_mc"], ["lambada"], ["ai2_arc", "tiny_gen"]):
        ours = scope.manager_for(names)  # (their data is on the hub: not loaded here)
        assert len(ours.all_tasks) < len(theirs.all_tasks) / 10  # a few directories
        assert _closure_entries(ours, names) == _closure_entries(theirs, names), names
    assert len(_closure_entries(theirs, ["lambada"])) == 3  # the group and its 2 tasks
    assert not (tmp_path / "cache").exists()


def test_unknown_task_is_named_without_the_full_index(setup, monkeypatch):
    from lm_eval.tasks import manager as lm_manager

    def full(*args, **kwargs):
        if kwargs.get("include_defaults", True):
            raise AssertionError("the full index was built")
        return real(*args, **kwargs)

    real = lm_manager.TaskManager
    from gpt2_jax.evaluation.harness import task_scope, tasks

    monkeypatch.setattr(tasks, "TaskManager", full)
    monkeypatch.setattr(task_scope, "TaskManager", full)
    with pytest.raises(harness.HarnessError, match="unknown task 'tiny_mcc'; did you mean tiny_mc"):
        harness.load_tasks("tiny_mcc", str(setup["tasks"]))
    with pytest.raises(harness.HarnessError, match="did you mean lambada_openai"):
        harness.load_tasks("lambada_opnai", "")


def test_include_scan_follows_scalar_flow_and_block_includes(tmp_path):
    from gpt2_jax.evaluation.harness import task_scope

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "_t.yaml").write_text("task: shared_name\n")
    (tmp_path / "a" / "x.yaml").write_text("include: ../b/_t.yaml\ntask: x\n")
    (tmp_path / "a" / "y.yaml").write_text("include: ['../b/_t.yaml']\n")
    (tmp_path / "a" / "z.yaml").write_text("include:\n  - ../b/_t.yaml\n  - other\ntask: z\n")
    scan = task_scope._Scan(tmp_path)
    assert scan.dirs_mentioning("shared_name") == {tmp_path / "a", tmp_path / "b"}
    assert scan.dirs_mentioning("x") == {tmp_path / "a"}
    assert scan.dirs_mentioning("shared") == set()  # tokens, not substrings
    (tmp_path / "top.yaml").write_text("task: x\n")
    assert task_scope._Scan(tmp_path).dirs_mentioning("x") is None  # no directory to narrow to


def test_bootstrap_switch_is_scoped_to_the_call(monkeypatch):
    import multiprocessing
    import os

    from gpt2_jax.evaluation.harness import results

    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    forks = multiprocessing.get_start_method(allow_none=True) in (None, "fork")
    with results.bootstrap_in_process():
        assert os.environ.get("DISABLE_MULTIPROC") == ("1" if forks else None)
    assert "DISABLE_MULTIPROC" not in os.environ


# ---------------------------------------------------------------------- compiles


def test_compiles_are_bounded_by_the_buckets_used(ours):
    lm, _ = ours
    s = lm.stats
    assert s.compiles == len(s.trunk_buckets) + len(s.head_buckets), s
    lengths = {T for _, T in s.trunk_buckets}
    assert lengths <= {16, 24, 32, 48, 64, 80}, s  # 2^k and 3 * 2^(k-1), capped at 80
    assert {B for B, _ in s.trunk_buckets} <= {1, 2, 4, 8}, s  # batch 8, or a tail's pow2


def test_length_buckets():
    got = {n: harness.length_bucket(n) for n in (1, 16, 17, 24, 25, 33, 48, 49, 65, 97, 1000)}
    assert got == {1: 16, 16: 16, 17: 24, 24: 24, 25: 32, 33: 48, 48: 48, 49: 64, 65: 96,
                   97: 128, 1000: 1024}  # fmt: skip
    assert all(harness.length_bucket(n) < 1.5 * n for n in range(16, 1025))  # pow2 alone: 2x


def test_pack_fills_rows_best_fit_decreasing():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 120, 500).tolist() + [100, 100, 300]
    bins = harness.pack(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each once
    fill = [sum(lengths[i] for i in b) for b in bins]
    assert all(f <= 100 or len(b) == 1 for b, f in zip(bins, fill, strict=True))
    assert all(len(b) == 1 for b in bins if lengths[b[0]] >= 100)  # long ones: alone
    short = sum(n for n in lengths if n < 100)
    assert sum(1 for b in bins if lengths[b[0]] < 100) <= 1.05 * short / 100 + 1  # ~full
    assert harness.pack(lengths, 100) == bins  # deterministic
    assert harness.pack([30, 50, 20, 40], 100) == [[1, 3], [0, 2]]


def test_same_buckets_compile_nothing_new(setup):
    cfg, params = hf.load_pretrained(setup["model"])
    lm = harness.GPT2JaxLM(cfg, params, batch_size=4, progress=False)
    rng = np.random.default_rng(0)

    def rows(lengths):
        out = []
        for n in lengths:
            ids = rng.integers(0, 50257, n + 1).tolist()
            out.append(harness.Row(tuple(ids[:-1]), tuple(ids[-3:])))
        return out

    # Packed into rows of at most 80 tokens (PACK capped at n_positions): 79 | 60+9+5 |
    # 33+30+17 (T 80, 80, 80); then 5+9 | 30 | 17+5 (T 16, 32, 24).
    first = lm.score(rows([5, 9, 17, 30, 33, 60, 79]))
    assert {T for _, T in lm.stats.trunk_buckets} == {80}
    lm.score(rows([5, 9]))
    lm.score(rows([30]))
    lm.score(rows([17, 5]))
    assert {T for _, T in lm.stats.trunk_buckets} == {16, 24, 32, 80}
    compiles = lm.stats.compiles
    assert compiles == len(lm.stats.trunk_buckets) + len(lm.stats.head_buckets)
    lm.score(rows([4, 73, 11, 61, 35, 28, 8]))  # new lengths, the same buckets and rows
    lm.score(rows([10, 3]))
    assert lm.stats.compiles == compiles
    assert all(lp < 0 for lp, _ in first)


def test_bounded_executables_evict_the_oldest_and_recompile_it(setup, monkeypatch):
    from gpt2_jax.evaluation.harness import scoring

    monkeypatch.setattr(scoring, "SCORING_EXECUTABLES_KEPT", 2)  # one trunk and one head
    cfg, params = hf.load_pretrained(setup["model"])
    lm = harness.GPT2JaxLM(cfg, params, batch_size=4, progress=False)
    short = [harness.Row(tuple(range(1, 6)), (7, 8))]  # T 16
    longer = [harness.Row(tuple(range(1, 41)), (7, 8))]  # T 48
    first = lm.score(short)
    assert lm.stats.compiles == 2 and len(lm.scorer._exes) == 2
    assert lm.score(short) == first and lm.stats.compiles == 2  # kept
    lm.score(longer)
    assert lm.stats.compiles == 4 and len(lm.scorer._exes) == 2  # the short ones evicted
    assert lm.score(short) == first and lm.stats.compiles == 6  # compiled again, same result


def test_scanned_layers_score_as_unrolled(setup, ours):
    """A model trained with model.scan_layers=True (params stacked under h): the same."""
    cfg, params = hf.load_pretrained(setup["model"], scan_layers=True)
    assert cfg.scan_layers and "h" in params
    lm = harness.GPT2JaxLM(cfg, params, batch_size=8, progress=False)
    res = harness.run(lm, ["tiny_mc"], setup["manager"], log_samples=True)
    assert_same_samples(res["samples"]["tiny_mc"], ours[1]["samples"]["tiny_mc"], rtol=1e-6)


def test_head_holds_only_a_chunk_of_logits():
    """The head's temporaries grow with its head_rows (losses.SCORE_CHUNK), not with
    batch x positions x vocab."""
    B, T, C, E, V = 4, 64, 64, 16, 50257
    args = (
        jax.ShapeDtypeStruct((V, E), np.float32),
        jax.ShapeDtypeStruct((B, T, E), np.float32),
        jax.ShapeDtypeStruct((B, C), np.int32),
        jax.ShapeDtypeStruct((B, C), np.int32),
    )
    full = B * C * V * 4

    def temp_bytes(rows):
        head = functools.partial(losses_lib.scored_logprobs, head_rows=rows)
        return jax.jit(head).lower(*args).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(B * C) >= full  # all scored positions at once
    assert temp_bytes(32) < full / 4  # 8 positions of each row at a time


def test_head_scores_as_log_softmax(setup):
    cfg, params = hf.load_pretrained(setup["model"])
    from gpt2_jax.model import gpt2 as model

    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50257, (3, 20)).astype(np.int32)
    logits = np.asarray(model.GPT2(cfg).apply({"params": params}, ids), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    hidden = model.GPT2(cfg).apply({"params": params}, ids, return_hidden=True)
    first = np.array([0, 10, 18], np.int32)
    n = np.array([19, 5, 1], np.int32)
    targets, positions = np.zeros((3, 32), np.int32), np.zeros((3, 32), np.int32)
    want, greedy_want = [], []
    for b in range(3):
        pos = np.arange(first[b], first[b] + n[b])
        positions[b, : n[b]] = pos
        targets[b, : n[b]] = ids[b, pos + 1]
        want.append(logp[b, pos, ids[b, pos + 1]].sum())
        greedy_want.append(bool(np.all(logits[b, pos].argmax(-1) == ids[b, pos + 1])))
    targets[2, 0] = logits[2, 18].argmax()  # a row that is greedy
    want[2], greedy_want[2] = logp[2, 18, targets[2, 0]], True
    got, greedy = losses_lib.scored_logprobs(params["wte"]["embedding"], hidden, positions, targets)
    got, greedy = np.asarray(got), np.asarray(greedy)
    scored = np.arange(32)[None, :] < n[:, None]  # positions beyond n: padding
    np.testing.assert_allclose(np.where(scored, got, 0).sum(-1), want, rtol=1e-5)
    assert np.all(greedy | ~scored, axis=-1).tolist() == greedy_want


# ---------------------------------------------------------------------- generation


def test_sampled_generation_is_seeded_and_cut_at_until(setup):
    lm = harness.GPT2JaxLM.from_hf(setup["model"], batch_size=4, progress=False)
    sample = {"until": ["."], "max_gen_toks": 10, "do_sample": True, "temperature": 1.0}

    def gen(kwargs, seed):
        lm.seed = seed
        reqs = [_Req((f"The {w} was", dict(kwargs))) for w in ("ship", "song", "army", "war")]
        return lm.generate_until(reqs, disable_tqdm=True)

    a, b = gen(sample, 0), gen(sample, 0)
    assert a == b  # the same seed, the same text
    assert gen(sample, 1) != a
    greedy = gen({"until": ["."], "max_gen_toks": 10}, 0)
    assert greedy != a
    assert all("." not in t for t in a + greedy)
    with pytest.raises(harness.HarnessError, match="num_beams"):
        gen({"num_beams": 2}, 0)
    with pytest.raises(harness.HarnessError, match="max_gen_toks=80"):
        gen({"max_gen_toks": 80}, 0)


class _Req:
    def __init__(self, args):
        self.args = args


def test_generation_ends_at_endoftext(setup):
    """A model whose every next token is <|endoftext|>: nothing is generated."""
    cfg, params = hf.load_pretrained(setup["model"])
    params = jax.tree.map(np.array, params)
    u = np.zeros(cfg.n_embd, np.float32)
    u[0] = 1.0
    params["ln_f"]["scale"][:] = 0.0
    params["ln_f"]["bias"][:] = 10 * u
    params["wte"]["embedding"][tokenizer.EOT_ID] = 10 * u
    lm = harness.GPT2JaxLM(cfg, params, batch_size=2, progress=False)
    out = lm.generate_until([_Req(("Hello", {"until": ["zzz"], "max_gen_toks": 5}))])
    assert out == [""]


# ---------------------------------------------------------------------- registry, args


def test_registered_model_name_and_model_args(setup, ours):
    lm, mine = ours
    res = _evaluate(
        "gpt2_jax",
        setup,
        tasks=["tiny_mc"],
        model_args=f"init_from=hf:{setup['model']},batch_size=4",
    )
    assert_same_samples(res["samples"]["tiny_mc"], mine["samples"]["tiny_mc"], rtol=1e-6)
    with pytest.raises(harness.HarnessError, match="unknown key 'pretrained'"):
        harness.GPT2JaxLM.create_from_arg_string(f"pretrained={setup['model']}")
    with pytest.raises(harness.HarnessError, match="init_from=hf:"):
        harness.GPT2JaxLM.create_from_arg_string("batch_size=4")


def test_scalars_and_merged_results_file(ours, tmp_path):
    _, mine = ours
    scal = harness.scalars(mine)
    assert scal["lm_eval/tiny_mc/acc"] == mine["results"]["tiny_mc"]["acc,none"]
    assert "lm_eval/tiny_wikitext/word_perplexity" in scal
    assert not any("stderr" in k or "sample_len" in k or "alias" in k for k in scal)
    path = tmp_path / "step_5.json"
    one = {k: v for k, v in mine.items() if k != "samples"}
    first = json.loads(json.dumps(one, default=str))
    first["results"] = {"tiny_mc": first["results"]["tiny_mc"]}
    harness.write_results(first, path)
    second = json.loads(json.dumps(one, default=str))
    second["results"] = {"tiny_gen": second["results"]["tiny_gen"]}
    harness.write_results(second, path, merge=True)
    assert sorted(json.loads(path.read_text())["results"]) == ["tiny_gen", "tiny_mc"]


# ---------------------------------------------------------------------- the command


def _lm_eval_cli(setup, out: Path, *extra, devices=1, tasks="tiny_mc,tiny_wikitext,tiny_gen"):
    return helpers.run_cli(
        [
            "lm-eval",
            f"--init_from=hf:{setup['model']}",
            f"--tasks={tasks}",
            f"--include_path={setup['tasks']}",
            f"--output_path={out}",
            "--batch_size=8",
            "--log_samples",
            *extra,
        ],
        devices=devices,
    )


def _samples_files(directory: Path) -> dict[str, list[dict]]:
    out = {}
    for p in directory.glob("samples_*.jsonl"):
        task = p.name.removeprefix("samples_").rsplit("_", 1)[0]
        out[task] = [json.loads(x) for x in p.read_text().splitlines()]
    return out


def test_cli_on_two_devices_gives_the_same_samples(setup, ours, tmp_path):
    _, mine = ours
    out = tmp_path / "r" / "results.json"
    r = _lm_eval_cli(setup, out, devices=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "|tiny_mc" in r.stdout and "acc_norm" in r.stdout  # the harness's table
    saved = json.loads(out.read_text())
    assert sorted(saved["results"]) == ["tiny_gen", "tiny_mc", "tiny_wikitext"]
    files = _samples_files(out.parent)
    assert sorted(files) == ["tiny_gen", "tiny_mc", "tiny_wikitext"]
    for task, samples in files.items():
        assert_same_samples(samples, mine["samples"][task], rtol=1e-6)
    _close(saved["results"]["tiny_mc"], mine["results"]["tiny_mc"], rtol=1e-6)


def test_cli_workdir_default_path_under_launch(setup, tmp_path):
    """A trained run's checkpoint, scored by 2 processes: WORKDIR/lm_eval/step_<N>.json,
    the same numbers as one process."""
    workdir = tmp_path / "run"
    r = helpers.run_cli(["train", f"--config={helpers.TINY}", f"--workdir={workdir}"])
    assert r.returncode == 0, r.stderr[-2000:]
    args = ["--workdir", str(workdir), "--tasks=tiny_mc,tiny_lambada", "--limit=6",
            f"--include_path={setup['tasks']}", "--batch_size=4"]  # fmt: skip
    lm = harness.GPT2JaxLM.from_workdir(workdir, batch_size=4, progress=False)
    one = harness.run(lm, ["tiny_mc", "tiny_lambada"], setup["manager"], limit=6)
    r = helpers.run_cli(
        ["launch", "--processes=2", "--devices_per_process=1", "--", "lm-eval", *args]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((workdir / "lm_eval" / "step_6.json").read_text())
    for task in ("tiny_mc", "tiny_lambada"):
        _close(two["results"][task], one["results"][task], rtol=1e-6)


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--tasks=tiny_mcc"], ["unknown task 'tiny_mcc'", "did you mean tiny_mc"]),
        (
            ["--tasks=lambada_openai"],
            ["'lambada_openai'", "EleutherAI/lambada_openai", "--include_path"],
        ),  # fmt: skip
        (["--tasks=tiny_mc", "--model_args=pretrained=x"], ["unknown key 'pretrained'"]),
        (["--tasks=tiny_mc", "--init_from=hf:/no/such/dir"], ["/no/such/dir"]),
        (["--tasks=tiny_mc", "--workdir=/no/such/run"], ["/no/such/run"]),
        (["--tasks=tiny_mc", "--include_path=/no/such/tasks"], ["/no/such/tasks"]),
    ],
    ids=["unknown-task", "hub-offline", "model-arg", "hf-dir", "workdir", "include-path"],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(setup, tmp_path, extra, needles):
    out = tmp_path / "out"
    args = ["lm-eval", f"--output_path={out}", "--log_samples"]
    if not any(a.startswith(("--init_from", "--workdir")) for a in extra):
        args.append(f"--init_from=hf:{setup['model']}")
    if not any(a.startswith("--include_path") for a in extra):
        args.append(f"--include_path={setup['tasks']}")
    r = helpers.run_cli(args + extra)
    lines = [x for x in r.stderr.splitlines() if x.startswith("gpt2-jax lm-eval: error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_without_lm_eval_the_command_says_how_to_install():
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "from gpt2_jax.cli import main as cli\n"
        "sys.exit(cli.main(['lm-eval', '--init_from=hf:x', '--tasks=a']))\n"
    )
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "gpt2-jax lm-eval: error: lm-eval needs EleutherAI's lm-evaluation-harness: "
        "pip install 'gpt2_jax[eval]'"
    )


def test_model_args_import_without_lm_eval():
    """The CLI's --model_args help reads MODEL_ARGS without the [eval] extra."""
    import subprocess

    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "from gpt2_jax.evaluation import harness_args\n"
        "print(','.join(harness_args.MODEL_ARGS))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().split(",") == list(harness.MODEL_ARGS)
    assert "workdir" in harness.MODEL_ARGS and "init_from" in harness.MODEL_ARGS


# ---------------------------------------------------------------------- during training


def test_training_writes_harness_metrics_at_the_set_steps(setup, tmp_path):
    workdir = tmp_path / "run"
    r = helpers.run_cli(
        [
            "train",
            f"--config={helpers.TINY}",
            f"--workdir={workdir}",
            "--config.eval.harness_tasks=tiny_mc,tiny_wikitext",
            "--config.eval.harness_every=4",
            f"--config.eval.harness_include_path={setup['tasks']}",
            "--config.train.steps=8",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    harness_lines = [x for x in lines if x["split"] == "lm_eval"]
    assert [x["step"] for x in harness_lines] == [4, 8]
    for x in harness_lines:
        assert 0 <= x["lm_eval/tiny_mc/acc"] <= 1 and x["lm_eval/tiny_wikitext/bits_per_byte"] > 0
        saved = json.loads((workdir / "lm_eval" / f"step_{x['step']}.json").read_text())
        assert saved["results"]["tiny_mc"]["acc,none"] == x["lm_eval/tiny_mc/acc"]
    # The weights changed between the two evals, and the numbers with them.
    a, b = harness_lines
    assert a["lm_eval/tiny_wikitext/bits_per_byte"] != b["lm_eval/tiny_wikitext/bits_per_byte"]
    assert "lm-eval" in r.stdout and "tiny_wikitext: word_perplexity" in r.stdout
    events = b"".join(p.read_bytes() for p in (workdir / "tensorboard").glob("events*"))
    assert b"lm_eval/tiny_mc/acc" in events and b"lm_eval/lm_eval" not in events
    from gpt2_jax.cli import plot

    png = plot.plot_runs([str(workdir)])
    assert png.stat().st_size > 10_000


def test_training_refuses_unknown_harness_task_before_writing(setup, tmp_path):
    workdir = tmp_path / "run"
    r = helpers.run_cli(
        [
            "train",
            f"--config={helpers.TINY}",
            f"--workdir={workdir}",
            "--config.eval.harness_tasks=tiny_mcc",
            f"--config.eval.harness_include_path={setup['tasks']}",
        ]
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "eval.harness_tasks: unknown task 'tiny_mcc'; did you mean tiny_mc" in r.stderr
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
