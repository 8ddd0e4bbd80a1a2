# `make demo` and `make test` each work on a fresh clone: they create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
# Every install takes the exact tested versions (requirements/constraints.txt); pyproject.toml
# only declares compatible ranges. The lock pins the CPU torch: any other is a multi-GB CUDA build.
LOCK := requirements/constraints.txt
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c $(LOCK)

.PHONY: demo test test-all lint setup clean lock gpu-bundle

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test,dev,eval,wandb]'
	touch $@

setup: $(VENV)/.installed-test

demo: $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	$(PY) -m gpt2_jax train --config=configs/quickstart.py --workdir=$(DEMO_DIR)
	$(PY) -m gpt2_jax eval --workdir=$(DEMO_DIR)
	@echo "--- greedy sample (--temperature=0 --repetition_penalty=1.3) ---"
	$(PY) -m gpt2_jax generate --workdir=$(DEMO_DIR) --prompt="The if statement is" --max_new_tokens=60 --temperature=0 --repetition_penalty=1.3
	@echo "--- top-p sample (--temperature=0.8 --top_p=0.9) ---"
	$(PY) -m gpt2_jax generate --workdir=$(DEMO_DIR) --prompt="The if statement is" --max_new_tokens=60 --temperature=0.8 --top_k=0 --top_p=0.9 --seed=0
	@echo "demo run: $(DEMO_DIR)/checkpoints (Orbax), $(DEMO_DIR)/metrics.jsonl, $(DEMO_DIR)/tensorboard (tensorboard --logdir $(DEMO_DIR))"
	@echo "training curves:"
	$(PY) -m gpt2_jax plot $(DEMO_DIR)

# -rs lists any skip; tests/conftest.py turns a skip into a failure, so a green run checked all.
# `gpu` tests need a GPU: experiments/gpu/run.sh runs them there (and its --dry-run here).
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -rs -m "not slow and not gpu"

# Adds the `slow` tests: the benchmark's smoke run, malloc keeping a 3 GiB block, and checks over the full shared corpora (../shared/data, or
# GPT2_JAX_SHARED_DATA), which fail rather than skip where that directory is missing.
test-all: $(VENV)/.installed-test
	$(PY) -m pytest -q -rs -m "not gpu"

# The wheels the lent GPU's image lacks (experiments/gpu/bundle.txt), for Python 3.12 /
# manylinux, into experiments/gpu/wheels (git-ignored; a device run carries it).
gpu-bundle:
	PYTHON=$(PYTHON) bash experiments/gpu/bundle.sh

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check gpt2_jax tests configs

# Rewrites the lock from the current .venv (after a tested upgrade).
lock: $(VENV)/.installed-test
	{ sed -n '/^#/p' $(LOCK); $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) runs .pytest_cache
