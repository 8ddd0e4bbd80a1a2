"""Run summaries: the start screen of a tiny run, the end screen, TensorBoard text, eval table."""

import json
import re

from gpt2_jax.cli import main as cli
from gpt2_jax.train import summary

# tiny_run (conftest.py): the tiny config's 6-step run, its stdout with the progress bar off.


def test_start_summary_lists_what_the_run_will_do(tiny_run):
    workdir, stdout = tiny_run.workdir, tiny_run.stdout
    start = stdout.split("gpt2-jax train: done")[0]
    expected = [
        r"model +1\.6M parameters \(1,6\d\d,\d{3}\), 1 layer x 2 heads x n_embd 32",
        r"weights +scratch \(random init, train\.seed=0\)",
        r"devices +1 cpu device in 1 process; mesh \{'data': 1, 'fsdp': 1\}",
        r"batch +4 sequences x 32 tokens = 128 tokens a step",
        r"steps +0 -> 6, \d+ steps an epoch = 0\.\d\d epochs",
        r"blocks +train \d[\d,]*, validation \d[\d,]* \(of 32 tokens\)",
        # how the tokens came: tokenized in how long, or the cache reused (session cache)
        r"data +(tokenized train \+ validation in [\d.]+ s \(1 process, |"
        r"train \+ validation from the token cache \()",
        r"cadence +log every step, eval at the end, checkpoint every 3 steps, keep 3",
        rf"workdir +{re.escape(str(workdir))}",
    ]
    for pattern in expected:
        assert re.search(pattern, start), f"{pattern!r} not in:\n{start}"
    assert start.index("run summary") < start.index("step=1 ")  # before the first step


def test_end_summary_gives_metrics_wall_time_and_paths(tiny_run):
    workdir, stdout = tiny_run.workdir, tiny_run.stdout
    end = stdout.split("gpt2-jax train: done")[1]
    assert re.search(r"trained +steps 0 -> 6 in \d+ min \d+ s wall", end), end
    assert re.search(r"validation +loss \d+\.\d{4}, perplexity \d+\.\d\d \(\d+ scored", end)
    for name in ("checkpoints/6", "metrics.jsonl", "tensorboard", "config.json"):
        assert str(workdir / name) in end, name


def test_summaries_and_config_go_to_tensorboard(tiny_run):
    workdir = tiny_run.workdir
    events = b"".join(p.read_bytes() for p in (workdir / "tensorboard").glob("*.summary"))
    for tag in (b"run/start", b"run/end", b"run/config"):
        assert tag in events, tag
    assert b"run summary" in events and b'"block_size": 32' in events


def test_weights_source_names_each_origin(tmp_path):
    assert summary.weights_source(tmp_path / "7", "hf:gpt2", 0).startswith(f"checkpoint {tmp_path}")
    assert summary.weights_source(None, "hf:gpt2", 0).startswith("hf:gpt2")
    assert summary.weights_source(None, "", 3) == "scratch (random init, train.seed=3)"


def test_eval_table_has_a_row_per_split_aligned():
    rows = [
        {"split": "validation", "loss": 5.29672, "perplexity": 199.68, "tokens": 6015},
        {"split": "test", "loss": 5.4, "perplexity": 221.406, "tokens": 123456},
    ]
    lines = summary.eval_table(rows).splitlines()
    assert lines[0].split() == ["split", "loss", "perplexity", "tokens"]
    assert lines[1].split() == ["validation", "5.2967", "199.68", "6,015"]
    assert lines[2].split() == ["test", "5.4000", "221.41", "123,456"]
    assert len({len(line) for line in lines}) == 1  # columns line up


def test_eval_prints_json_on_stdout_and_the_table_on_stderr(tiny_run, capsys):
    workdir = tiny_run.workdir
    assert cli.main(["eval", f"--workdir={workdir}", "--config.train.progress=false"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out.strip().splitlines()[-1])
    table = captured.err.strip().splitlines()[-2:]
    assert table[0].split() == ["split", "loss", "perplexity", "tokens"]
    assert table[1].split() == [
        "validation",
        f"{record['loss']:.4f}",
        f"{record['perplexity']:.2f}",
        f"{record['tokens']:,}",
    ]
