"""Tokenizing a corpus: nanoGPT's prepare.py pipeline vs gpt2_jax's, side by side, one run.

    .venv/bin/python experiments/corpus/bench.py                  # >= 1 GiB (the issue's size)
    .venv/bin/python experiments/corpus/bench.py --size_mb=20 --validation_fraction=0.01  # smoke

The corpus: WikiText-2 (raw, test split, ``../shared/data`` or ``$GPT2_JAX_SHARED_DATA``)
repeated to ``--size_mb`` of text, cut into documents of ~4.5 KB (consecutive paragraphs;
OpenWebText and FineWeb documents average about that), written once as one parquet file
(``--format=parquet``, FineWeb's format) or as a text file, one row a line
(``--format=text``, run_clm's). Then, each in its own subprocess, in this order:

- ``nanogpt``: nanoGPT's ``data/openwebtext/prepare.py`` logic verbatim on that file:
  ``load_dataset`` (to Arrow), ``train_test_split(test_size=0.0005, seed=2357,
  shuffle=True)``, ``map(process, num_proc=N)`` with ``encode_ordinary(text) + [eot]``, then
  the uint16 ``np.memmap`` written in 1024 shards (fewer for a split of fewer rows).
  (tiktoken's ``get_encoding("gpt2")`` needs the network; the same Encoding is built
  offline by ``gpt2_jax.tokenizer``.)
- ``gpt2_jax``: ``data.load_splits`` on the same file, ``append_eos=true``,
  ``validation_fraction=0.0005``, ``num_proc=N``: ``load_dataset`` to Arrow, then the token
  cache.
- ``gpt2_jax_stream``: the same with ``data.streaming=true``: no Arrow copy.

Measured for each: wall time from start to the finished token files (Python start and
imports included), tokens/s over it, the peak of the process tree's memory (the sum of
PSS over the process and its children, sampled every 0.2 s: shared pages counted once,
memory-mapped files included), the largest single process's peak RSS (``ru_maxrss``), and
the peak disk use of what it writes (Arrow copies, map caches, token files; sampled
every 0.5 s; allocated blocks). The token totals and the sum of all token ids must agree
between the pipelines (they hold out different rows, so the splits differ, not the
union); the script stops if they do not. Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ("nanogpt", "gpt2_jax", "gpt2_jax_stream")


# ---------------------------------------------------------------- the corpus


def make_corpus(out_dir: Path, size_mb: float, fmt: str) -> Path:
    shared = Path(os.environ.get("GPT2_JAX_SHARED_DATA", ROOT.parent / "shared" / "data"))
    source = shared / "wikitext-2-raw" / "wiki.test.raw"
    if not source.is_file():
        sys.exit(f"{source} not found: set GPT2_JAX_SHARED_DATA to the shared corpora")
    text = source.read_text(encoding="utf-8")
    path = out_dir / f"corpus-{size_mb:g}MB.{'parquet' if fmt == 'parquet' else 'txt'}"
    if path.exists():
        return path
    target = int(size_mb * (1 << 20))
    tmp = path.with_suffix(path.suffix + ".tmp")
    if fmt == "text":
        with open(tmp, "w", encoding="utf-8") as f:
            written = 0
            while written < target:
                f.write(text)
                written += len(text.encode())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        docs, doc = [], ""
        for line in text.splitlines(keepends=True):
            doc += line
            if len(doc) >= 4500:
                docs.append(doc)
                doc = ""
        docs.append(doc)
        one_pass = sum(len(d.encode()) for d in docs)
        table = pa.table({"text": docs})
        with pq.ParquetWriter(tmp, table.schema) as writer:
            for _ in range(-(-target // one_pass)):
                writer.write_table(table)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- the pipelines (children)


def run_nanogpt(corpus: Path, work: Path, num_proc: int, fraction: float) -> dict:
    """nanoGPT data/openwebtext/prepare.py, its logic verbatim (paths and loader adapted)."""
    import numpy as np
    from datasets import load_dataset
    from tqdm import tqdm

    from gpt2_jax.data import tokenizer

    t0 = time.perf_counter()
    enc = tokenizer.get_tokenizer()  # = tiktoken.get_encoding("gpt2"), offline
    # Text: the same rows as gpt2_jax (and run_clm) read, line breaks kept.
    kwargs = {"keep_linebreaks": True} if corpus.suffix == ".txt" else {}
    dataset = load_dataset(
        "parquet" if corpus.suffix == ".parquet" else "text",
        data_files={"train": str(corpus)},
        cache_dir=str(work / "hf"),
        num_proc=num_proc,
        **kwargs,
    )
    t_load = time.perf_counter()
    split_dataset = dataset["train"].train_test_split(test_size=fraction, seed=2357, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")

    def process(example):
        ids = enc.encode_ordinary(example["text"])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids)}

    tokenized = split_dataset.map(
        process, remove_columns=["text"], desc="tokenizing the splits", num_proc=num_proc
    )
    t_map = time.perf_counter()
    for split, dset in tokenized.items():
        arr_len = np.sum(dset["len"], dtype=np.uint64)
        filename = work / f"{split}.bin"
        arr = np.memmap(filename, dtype=np.uint16, mode="w+", shape=(arr_len,))
        total_batches = min(1024, len(dset))  # prepare.py: 1024 (its val split has 4,007 rows)
        idx = 0
        for batch_idx in tqdm(range(total_batches), desc=f"writing {filename}"):
            batch = dset.shard(
                num_shards=total_batches, index=batch_idx, contiguous=True
            ).with_format("numpy")
            arr_batch = np.concatenate(batch["ids"])
            arr[idx : idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()
    t_end = time.perf_counter()
    return dict(phases=dict(load=t_load - t0, map=t_map - t_load, write=t_end - t_map))


def run_gpt2_jax(corpus: Path, work: Path, num_proc: int, fraction: float, streaming: bool) -> dict:
    from gpt2_jax import data

    cfg = data.DataConfig(
        train_files=str(corpus),
        cache_dir=str(work),
        append_eos=True,
        validation_fraction=fraction,
        num_proc=num_proc,
        streaming=streaming,
        block_size=1024,
    )
    t0 = time.perf_counter()
    info = data.load_splits(cfg)["train"].cache
    phases = dict(total=time.perf_counter() - t0, tokenizing=info.seconds)
    return dict(phases=phases, processes=info.processes)


def child(args) -> None:
    work = Path(args.work)
    if args.child == "nanogpt":
        result = run_nanogpt(Path(args.corpus), work, args.num_proc, args.validation_fraction)
    else:
        streaming = args.child == "gpt2_jax_stream"
        fraction = args.validation_fraction
        result = run_gpt2_jax(Path(args.corpus), work, args.num_proc, fraction, streaming)
    result["ru_maxrss_self_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- measuring (parent)


def _tree(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def _kb(pid: int, path: str, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _disk_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def token_stats(work: Path) -> tuple[int, int]:
    """(tokens, sum of the ids) over a pipeline's token files, read here in pieces (so that
    the check does not count in the pipeline's memory)."""
    import numpy as np

    files = sorted(work.glob("*.bin")) or sorted((work / "tokens").glob("*.tokens"))
    total = id_sum = 0
    for path in files:
        with open(path, "rb") as f:
            while piece := f.read(1 << 24):
                ids = np.frombuffer(piece, dtype=np.uint16)
                total, id_sum = total + len(ids), id_sum + int(ids.sum(dtype=np.uint64))
    return total, id_sum


def measure(name: str, corpus: Path, work: Path, num_proc: int, fraction: float) -> dict:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    argv = [sys.executable, __file__, f"--child={name}", f"--corpus={corpus}"]
    argv += [f"--work={work}", f"--num_proc={num_proc}", f"--validation_fraction={fraction}"]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    log = open(work.parent / f"{name}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    peak_pss = peak_rss = peak_disk = 0
    last_disk = 0.0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        peak_pss = max(peak_pss, sum(_kb(p, "smaps_rollup", "Pss") for p in pids))
        peak_rss = max(peak_rss, sum(_kb(p, "status", "VmRSS") for p in pids))
        if time.perf_counter() - last_disk > 0.5:
            peak_disk, last_disk = max(peak_disk, _disk_bytes(work)), time.perf_counter()
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    out, _ = proc.communicate()
    log.close()
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}); see {work.parent / f'{name}.log'}")
    result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    result["tokens"], result["id_sum"] = token_stats(work)
    result.update(
        name=name,
        wall_s=wall,
        tokens_per_s=result["tokens"] / wall,
        peak_tree_pss_mb=peak_pss / 1024,
        peak_tree_rss_sum_mb=peak_rss / 1024,
        peak_disk_mb=max(peak_disk, _disk_bytes(work)) / (1 << 20),
        final_disk_mb=_disk_bytes(work) / (1 << 20),
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size_mb", type=float, default=1024, help="text in the corpus (MiB)")
    p.add_argument("--format", choices=("parquet", "text"), default="parquet")
    p.add_argument("--num_proc", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--validation_fraction", type=float, default=0.0005, help="held out (nanoGPT: 0.0005)"
    )
    p.add_argument("--workdir", default="/tmp/gpt2_jax_corpus_bench")
    p.add_argument("--pipelines", default=",".join(PIPELINES))
    p.add_argument("--out", default="")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--corpus", default="", help=argparse.SUPPRESS)
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(root, args.size_mb, args.format)
    size = corpus.stat().st_size
    print(f"corpus: {corpus} ({size / (1 << 20):,.0f} MiB on disk), num_proc={args.num_proc}")
    results = []
    for name in args.pipelines.split(","):
        r = measure(name, corpus, root / name, args.num_proc, args.validation_fraction)
        results.append(r)
        print(
            f"{name:>16}: {r['tokens']:,} tokens in {r['wall_s']:.1f} s = "
            f"{r['tokens_per_s'] / 1e6:.2f}M tokens/s; peak PSS {r['peak_tree_pss_mb']:,.0f} MB "
            f"(largest process {r['ru_maxrss_self_mb']:,.0f} MB RSS); peak disk "
            f"{r['peak_disk_mb']:,.0f} MB; phases {json.dumps(r['phases'])}",
            flush=True,
        )
    sums = {(r["tokens"], r["id_sum"]) for r in results}
    if len(sums) != 1:
        sys.exit(f"the pipelines disagree on the tokens: {sums}")
    base = next((r for r in results if r["name"] == "nanogpt"), None)
    print()
    print("| pipeline | tokens/s | vs nanoGPT | wall | peak memory (PSS, tree) | peak disk |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        print(
            f"| {r['name']} | {r['tokens_per_s'] / 1e6:.2f}M | {ratio} | {r['wall_s']:.0f} s "
            f"| {r['peak_tree_pss_mb']:,.0f} MB | {r['peak_disk_mb']:,.0f} MB |"
        )
    record = dict(
        corpus=str(corpus),
        corpus_bytes=size,
        format=args.format,
        num_proc=args.num_proc,
        validation_fraction=args.validation_fraction,
        cpus=os.cpu_count(),
        when=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        load_average_at_end=os.getloadavg(),
        results=results,
    )
    out = Path(args.out) if args.out else root / "results.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
