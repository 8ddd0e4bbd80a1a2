"""Writes the harness tests' small local tasks from the shipped WikiText-2 slice.

    python tests/data/harness/make_tasks.py     # from the repository root

Deterministic (a seeded numpy generator): rerunning it rewrites the same bytes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WIKI = HERE.parent / "wiki.test.head.raw"


def articles() -> list[str]:
    """The slice's 8 articles: heading line, then paragraphs, joined by newlines."""
    out: list[list[str]] = []
    for line in WIKI.read_text(encoding="utf-8").splitlines(keepends=True):
        if re.match(r"^ = [^=].* = \n$", line):
            out.append([])
        out[-1].append(line)
    return ["".join(a) for a in out]


def sentences() -> list[str]:
    text = WIKI.read_text(encoding="utf-8")
    found = []
    for line in text.splitlines():
        if line.startswith(" ="):
            continue
        for s in line.strip().split(" . "):
            s = s.strip().rstrip(" .")
            if 8 <= len(s.split()) <= 40 and s.split()[-1].isalpha():
                found.append(s)
    return found


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    rng = np.random.default_rng(2026)
    sents = sentences()
    pick = [sents[i] for i in rng.choice(len(sents), 64, replace=False)]
    paragraphs = [
        line.strip()
        for line in WIKI.read_text(encoding="utf-8").splitlines()
        if not line.startswith(" =") and len(line.split()) > 120
    ]
    # loglikelihood (lambada-style: predict the last word): 20 sentences, and 4 whole
    # paragraphs longer than the test model's context (left truncation).
    long_ones = [p.rstrip(" .") for p in paragraphs[:4]]
    write("tiny_lambada.jsonl", [{"text": s} for s in pick[:20] + long_ones])
    # multiple_choice (arc-style): a sentence's start, its true ending and 3 others.
    mc = []
    for i, s in enumerate(pick[20:36]):
        words = s.split()
        cut = len(words) // 2
        others = [pick[(20 + i + k * 7) % 64].split() for k in (1, 2, 3)]
        endings = [" ".join(words[cut:])] + [" ".join(o[len(o) // 2 :]) for o in others]
        order = rng.permutation(4)
        mc.append(
            {
                "query": " ".join(words[:cut]),
                "choices": [endings[j] for j in order],
                "gold": int(np.flatnonzero(order == 0)[0]),
            }
        )
    write("tiny_mc.jsonl", mc)
    # loglikelihood_rolling (wikitext-style): whole articles and shorter cuts of them.
    arts = articles()
    docs = [arts[0], arts[2], arts[4][:2000], arts[5][:600], arts[6][:150]]
    write("tiny_wikitext.jsonl", [{"page": d} for d in docs])
    # generate_until: a sentence's first words; the target is the rest up to the period.
    gen = []
    for s in pick[36:48]:
        words = s.split()
        gen.append({"context": " ".join(words[:6]), "answer": " " + " ".join(words[6:])})
    write("tiny_gen.jsonl", gen)


if __name__ == "__main__":
    main()
