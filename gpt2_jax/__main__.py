import sys

from gpt2_jax.cli.main import entry

sys.exit(entry())
