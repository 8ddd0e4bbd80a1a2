import sys

from gpt2_jax.cli import main

sys.exit(main())
