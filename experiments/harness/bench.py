"""``gpt2-jax lm-eval`` against ``lm_eval --model hf``, whole commands, side by side.

    .venv/bin/python experiments/harness/bench.py                  # GPT-2 124M shape, fp32
    .venv/bin/python experiments/harness/bench.py --quick          # tiny model, few requests
    .venv/bin/python experiments/harness/bench.py --smoke          # the least: make test's run

Both commands score the same random GPT-2 (Hugging Face format, in a temporary directory)
on the same two local tasks, built from WikiText-2's test split (../shared/data, or
``--wiki``), at the same batch size:

  lambada   ``loglikelihood``: one request a sentence, the context the sentence but its
            last word, the continuation `` word`` (lm-eval's lambada_openai prompt);
            ``--sentences`` requests
  wikitext  ``loglikelihood_rolling``: whole WikiText articles (``--articles``), each in
            lm-eval's disjoint windows of n_positions tokens (its wikitext task, without
            the detokenizer)

Each command is timed from start to exit, as a user feels it: Python start, lm-eval's task
index, model loading, compiles (gpt2_jax) and scoring. The two alternate (jax, hf, jax,
hf, ...) ``--repeats`` times and the medians are compared. lm-eval's ``hf`` backend runs as
its users run it on a CPU (``--device cpu``, fp32, torch's default threads and malloc); the
gpt2-jax command as it always runs (its tuned glibc malloc). Both write their samples, and
the script checks the two agree (log-likelihoods to rtol 1e-4) before it reports a speed.

Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------ inputs


def articles(wiki: Path) -> list[str]:
    """WikiText's articles: a ` = Title = ` line, then its paragraphs."""
    out: list[list[str]] = []
    for line in wiki.read_text(encoding="utf-8").splitlines(keepends=True):
        if re.match(r"^ = [^=].* = \n$", line):
            out.append([])
        if out:
            out[-1].append(line)
    return ["".join(a) for a in out]


def sentences(wiki: Path, n: int) -> list[str]:
    found = []
    for line in wiki.read_text(encoding="utf-8").splitlines():
        if line.startswith(" ="):
            continue
        for s in line.strip().split(" . "):
            s = s.strip().rstrip(" .")
            if 6 <= len(s.split()) <= 60 and s.split()[-1].isalpha():
                found.append(s)
    if len(found) < n:
        raise SystemExit(f"{wiki} has only {len(found)} usable sentences, {n} asked for")
    return found[:n]


def write_tasks(directory: Path, wiki: Path, n_sentences: int, n_articles: int) -> None:
    directory.mkdir(parents=True)
    rows = [{"text": s} for s in sentences(wiki, n_sentences)]
    docs = [{"page": a} for a in articles(wiki)[:n_articles]]
    for name, data in (("bench_lambada", rows), ("bench_wikitext", docs)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (directory / "bench_lambada.yaml").write_text(
        "task: bench_lambada\n" + common + "dataset_kwargs:\n  data_files:\n"
        f"    test: {directory / 'bench_lambada.jsonl'}\noutput_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n"
        "    higher_is_better: false\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    (directory / "bench_wikitext.yaml").write_text(
        "task: bench_wikitext\n" + common + "dataset_kwargs:\n  data_files:\n"
        f"    test: {directory / 'bench_wikitext.jsonl'}\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{page}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    )


def write_model(directory: Path, quick: bool) -> dict:
    import torch
    import transformers

    from gpt2_jax.data import tokenizer

    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=4, n_embd=128) if quick else {}
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    m.save_pretrained(directory)
    encoder_json, vocab_bpe = tokenizer.vocab_files()
    shutil.copyfile(encoder_json, directory / "vocab.json")
    shutil.copyfile(vocab_bpe, directory / "merges.txt")
    c = m.config
    return dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.n_positions,
                params=sum(p.numel() for p in m.parameters()))  # fmt: skip


# ------------------------------------------------------------------ the commands


def command(backend: str, model: Path, tasks: Path, task: str, batch: int, out: Path):
    common = [f"--tasks={task}", f"--include_path={tasks}", f"--batch_size={batch}",
              "--log_samples", f"--output_path={out}"]  # fmt: skip
    if backend == "jax":
        return [str(VENV_BIN / "gpt2-jax"), "lm-eval", f"--init_from=hf:{model}", *common]
    return [str(VENV_BIN / "lm_eval"), "--model=hf", f"--model_args=pretrained={model}",
            "--device=cpu", *common]  # fmt: skip


def run_timed(argv: list[str], log: Path, cache: Path) -> float:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "GPT2_JAX_CACHE": str(cache)}  # fmt: skip
    t0 = time.perf_counter()
    with log.open("w") as f:
        r = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {r.returncode}); see {log}")
    return seconds


def samples(out: Path, task: str) -> dict[int, float]:
    """doc_id -> the first response's log-likelihood, from a run's samples file."""
    files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    if not files:
        raise SystemExit(f"no samples of {task} under {out}")
    result = {}
    for line in files[-1].read_text().splitlines():
        s = json.loads(line)
        resp = s["resps"][0][0]
        result[s["doc_id"]] = float(resp[0] if isinstance(resp, list) else resp)
    return result


def agree(a: dict, b: dict, rtol: float = 1e-4) -> float:
    assert sorted(a) == sorted(b), "the two backends scored different documents"
    worst = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-30) for k in a)
    if worst > rtol:
        raise SystemExit(f"the backends disagree: max relative difference {worst:.2e}")
    return worst


TASKS = (("bench_lambada", "requests"), ("bench_wikitext", "documents"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wiki", default=str(ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw"))
    p.add_argument("--sentences", type=int, default=600)
    p.add_argument("--articles", type=int, default=12)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny model, few requests")
    p.add_argument(
        "--smoke", action="store_true",
        help="the script end to end at the least cost (tests/test_experiments.py): --quick's "
        "model, 8 requests of bench_lambada alone, no first-command run",
    )  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "experiments/harness/results"))
    a = p.parse_args()
    if a.quick or a.smoke:
        a.sentences, a.articles, a.repeats = 40, 2, 1
    if a.smoke:
        a.sentences, a.articles = 8, 1
    return a


def time_task(a, work: Path, task: str, unit: str, cache: Path) -> dict:
    """``--repeats`` runs of each command on ``task``, alternating; their samples agree."""
    times: dict[str, list[float]] = {"jax": [], "hf": []}
    for rep in range(a.repeats):
        for backend in ("jax", "hf"):
            run_out = work / f"{task}_{backend}_{rep}"
            argv = command(backend, work / "model", work / "tasks", task, a.batch_size, run_out)
            seconds = run_timed(argv, work / f"{task}_{backend}_{rep}.log", cache)
            times[backend].append(seconds)
            print(f"{task} {backend} run {rep + 1}: {seconds:.1f} s", flush=True)
    worst = agree(samples(work / f"{task}_jax_0", task), samples(work / f"{task}_hf_0", task))
    n = a.sentences if task == "bench_lambada" else a.articles
    jax_s, hf_s = statistics.median(times["jax"]), statistics.median(times["hf"])
    return dict(task=task, unit=unit, n=n, jax_seconds=times["jax"], hf_seconds=times["hf"],
                jax_median=jax_s, hf_median=hf_s, speedup=hf_s / jax_s,
                max_rel_diff=worst)  # fmt: skip


def markdown(record: dict, a) -> str:
    shape, rows, cold = record["model"], record["rows"], record["jax_first_command_seconds"]
    lines = [
        f"{record['date']}, {record['cpu']}, {record['cores']} cores; GPT-2 "
        f"{shape['params'] / 1e6:.0f}M shape (n_positions {shape['n_positions']}), fp32, "
        f"batch {a.batch_size}; medians of {a.repeats} whole-command runs",
        "",
        "| task | requests | gpt2-jax lm-eval (s) | lm_eval --model hf (s) | speedup "
        "| max rel. diff |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['n']} {r['unit']} | {r['jax_median']:.1f} | "
            f"{r['hf_median']:.1f} | {r['speedup']:.2f}x | {r['max_rel_diff']:.1e} |"
        )
    if cold is not None:
        hf_lambada = rows[0]["hf_median"]
        lines += ["", f"gpt2-jax's first command after an install (it builds the task-index "
                  f"cache), bench_lambada: {cold:.1f} s, {hf_lambada / cold:.2f}x"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    a = parse_args()
    work = Path(tempfile.mkdtemp(prefix="harness_bench_"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_tasks(work / "tasks", Path(a.wiki), a.sentences, a.articles)
    shape = write_model(work / "model", a.quick or a.smoke)
    # gpt2-jax's first lm-eval command after an install builds its cache of lm-eval's task
    # index (~9 s); every later one reads it. Timed once here, apart from the medians.
    cache, cold = work / "cache", None
    if not a.smoke:
        argv = command("jax", work / "model", work / "tasks", "bench_lambada", a.batch_size,
                       work / "cold")  # fmt: skip
        cold = run_timed(argv, work / "cold.log", cache)
        print(f"bench_lambada jax, first command (empty cache): {cold:.1f} s", flush=True)
    rows = [time_task(a, work, task, unit, cache) for task, unit in TASKS[: 1 if a.smoke else 2]]
    record = dict(
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        cpu=cpu_model(),
        cores=os.cpu_count(),
        model=shape,
        batch_size=a.batch_size,
        argv=sys.argv[1:],
        jax_first_command_seconds=cold,
        rows=rows,
    )
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(record, a)
    (out / "results.md").write_text(text)
    print(text, end="")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
