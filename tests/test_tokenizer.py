"""The offline tokenizer gives tiktoken's own "gpt2" ids; HF-style dirs; hash checks."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from gpt2_jax.data import tokenizer

from .helpers import WIKI_HEAD, require_shared_file

# The URLs tiktoken_ext/openai_public.py downloads for "gpt2"; its file cache is keyed by
# sha1(url), so copies under those names make tiktoken's own loader work offline.
URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}

TRICKY = [
    "Hello, world!",
    "héllo wörld, naïve café — “quotes” ‘single’",
    "日本語のテキストと한국어 텍스트",
    "emoji 🤖🎉 family 👩‍👩‍👧 flags 🇫🇷",
    "text <|endoftext|> more text<|endoftext|>",
    "   leading spaces\n\n\n\ttabs\t\t and   runs   \r\n trailing   ",
    "\u00a0nbsp and zero\u200bwidth, combining e\u0301",
    "I'm you're we've they'll she'd IT'S",
    "numbers 1234567890 3.14159 -42 1e-5",
    "",
    " ",
    "\n",
]

# Runs in a fresh interpreter so TIKTOKEN_CACHE_DIR applies to tiktoken's registry.
_TIKTOKEN_SCRIPT = """
import json, sys, tiktoken
enc = tiktoken.get_encoding("gpt2")
strings = json.loads(sys.stdin.read())
json.dump([enc.encode_ordinary(s) for s in strings], sys.stdout)
"""


def tiktoken_ids(texts: list[str], cache_dir) -> list[list[int]]:
    """``tiktoken.get_encoding("gpt2").encode_ordinary`` of each text, in a fresh process
    (TIKTOKEN_CACHE_DIR only applies to tiktoken's registry before it is first used)."""
    enc_json, vocab_bpe = tokenizer.vocab_files()
    for name, src in (("encoder.json", enc_json), ("vocab.bpe", vocab_bpe)):
        shutil.copy(src, cache_dir / hashlib.sha1(URLS[name].encode()).hexdigest())
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(cache_dir))
    out = subprocess.run(
        [sys.executable, "-c", _TIKTOKEN_SCRIPT],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def reference_ids(tmp_path_factory):
    """tiktoken's own ids of [*TRICKY, the shipped wikitext slice]."""
    wiki = WIKI_HEAD.read_text(encoding="utf-8")
    return tiktoken_ids([*TRICKY, wiki], tmp_path_factory.mktemp("tiktoken_cache"))


def test_ids_match_tiktoken_on_tricky_strings(reference_ids):
    enc = tokenizer.get_tokenizer()
    for text, want in zip(TRICKY, reference_ids, strict=False):
        assert enc.encode_ordinary(text) == want, text
    assert (
        tokenizer.EOT_ID
        not in reference_ids[TRICKY.index("text <|endoftext|> more text<|endoftext|>")]
    )


def test_ids_match_tiktoken_on_wikitext(reference_ids):
    enc = tokenizer.get_tokenizer()
    want = reference_ids[-1]
    assert len(want) > 35_000
    assert enc.encode_ordinary(WIKI_HEAD.read_text(encoding="utf-8")) == want


@pytest.mark.slow
def test_ids_match_tiktoken_on_the_whole_wikitext_test_split(tmp_path):
    """The whole 1.3 MB split from the shared corpora (fails, not skips, without them)."""
    text = require_shared_file("wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")
    (want,) = tiktoken_ids([text], tmp_path)
    assert len(want) > 250_000
    assert tokenizer.get_tokenizer().encode_ordinary(text) == want


def test_encoding_constants():
    enc = tokenizer.get_tokenizer()
    assert enc.n_vocab == tokenizer.VOCAB_SIZE == 50257
    assert enc.eot_token == tokenizer.EOT_ID == 50256
    assert enc.max_token_value < 2**16  # data.py stores uint16


def test_hf_style_dir_gives_same_encoding(tmp_path):
    enc_json, vocab_bpe = tokenizer.vocab_files()
    shutil.copy(enc_json, tmp_path / "vocab.json")
    shutil.copy(vocab_bpe, tmp_path / "merges.txt")
    hf_enc = tokenizer.get_tokenizer(str(tmp_path))
    enc = tokenizer.get_tokenizer()
    for text in TRICKY:
        assert hf_enc.encode_ordinary(text) == enc.encode_ordinary(text)


def test_modified_or_missing_vocab_raises(tmp_path):
    enc_json, vocab_bpe = tokenizer.vocab_files()
    shutil.copy(enc_json, tmp_path / "vocab.json")
    merges = tmp_path / "merges.txt"
    merges.write_bytes(vocab_bpe.read_bytes() + b"x y\n")  # one extra merge
    with pytest.raises(tokenizer.TokenizerError, match=str(merges)):
        tokenizer.get_tokenizer(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(tokenizer.TokenizerError, match="neither encoder.json"):
        tokenizer.get_tokenizer(str(empty))


def test_decode_round_trip():
    enc = tokenizer.get_tokenizer()
    for text in TRICKY:
        assert tokenizer.decode(enc, enc.encode_ordinary(text)) == text
    # A lone token can be half a UTF-8 character: decode replaces instead of raising.
    ids = enc.encode_ordinary("🤖")
    assert len(ids) > 1
    assert "\ufffd" in tokenizer.decode(enc, ids[:1])
