"""Makes ``pydoc_sft.jsonl``: the offline prompt/completion set of ``configs/sft.py:local``.

Source: Python's bundled help topics (``pydoc_data.topics`` of CPython 3.11.7, under the
Python Software Foundation License; the text ``data.dataset=pydoc_topics`` trains on), laid
out by gpt2_jax's ``normalize_layout`` (one paragraph a line). Each example asks for the paragraph that follows one
paragraph of a topic:

    prompt:     "Python topic: <the topic's title>\\n\\n<paragraph i>\\n\\nNext paragraph:"
    completion: " <paragraph i + 1>"

Pairs with a paragraph under 40 or over 700 characters are left out (code lines, long
tables), so the examples run from ~40 to ~400 tokens: varied lengths, what packing is for.

    python configs/data/make_pydoc_sft.py > configs/data/pydoc_sft.jsonl
"""

import json
import sys

from pydoc_data.topics import topics

from gpt2_jax.data.pydoc import normalize_layout

MIN_CHARS, MAX_CHARS = 40, 700


def paragraphs(text: str) -> list[str]:
    # normalize_layout leaves one paragraph a line (a code line is a line too)
    return [line.strip() for line in normalize_layout(text).splitlines() if line.strip()]


def main() -> None:
    for key in sorted(topics):
        paras = paragraphs(topics[key])
        title = paras[0]
        for a, b in zip(paras[1:], paras[2:]):
            if all(MIN_CHARS <= len(p) <= MAX_CHARS for p in (a, b)):
                prompt = f"Python topic: {title}\n\n{a}\n\nNext paragraph:"
                sys.stdout.write(json.dumps({"prompt": prompt, "completion": " " + b}) + "\n")


if __name__ == "__main__":
    main()
