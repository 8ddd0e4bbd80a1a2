import sys

from gpt2_jax.cli import entry

sys.exit(entry())
