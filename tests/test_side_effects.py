"""The library changes nothing process-wide: importing any gpt2_jax module, and training,
evaluating, generating and scoring through the Python API, leave the environment, the
unraisable hook, logging filters and levels, signal handlers, the multiprocessing start
method and malloc as they were. Only the ``gpt2-jax`` entry point sets such things
(``cli/main.py: configure_process``). Checked in a fresh process, which nothing else touched.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from . import helpers

SCRIPT = textwrap.dedent(
    """
    import importlib, json, logging, multiprocessing, os, pkgutil, signal, sys, tempfile

    # What gpt2_jax builds on comes first: its own habits are not gpt2_jax's. tensorboardX's
    # crc32c sets CRC32C_SW_MODE when imported; tqdm's first bar makes a multiprocessing
    # lock, which fixes the default start method.
    import datasets, flax, jax, lm_eval.api.instance, optax, orbax.checkpoint, tiktoken
    import tensorboardX.crc32c, tqdm
    tqdm.tqdm(disable=True).close()

    def state():
        loggers = [logging.getLogger()] + [
            v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)
        ]
        return {
            "environ": dict(os.environ),
            "unraisablehook": repr(sys.unraisablehook),
            "excepthook": repr(sys.excepthook),
            "filters": sorted(f"{l.name}:{f!r}" for l in loggers for f in l.filters),
            "levels": {l.name: l.level for l in loggers if l.name in known},
            "handlers": {l.name: len(l.handlers) for l in loggers if l.name in known},
            "signals": {s.name: repr(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT)},
            "start_method": multiprocessing.get_start_method(allow_none=True),
        }

    known = set(logging.Logger.manager.loggerDict) | {"root"}
    before = state()
    import gpt2_jax
    for m in pkgutil.walk_packages(gpt2_jax.__path__, "gpt2_jax."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
    after_import = state()

    from gpt2_jax.config import base as config_lib
    from gpt2_jax.config import plan
    from gpt2_jax.core import allocator
    from gpt2_jax.evaluation import perplexity
    from gpt2_jax.train import loop
    from gpt2_jax.weights import resolve
    import gpt2_jax as g

    work = tempfile.mkdtemp()
    cfg = config_lib.load_config_file(sys.argv[1])
    config_lib.apply_overrides(cfg, {"train.steps": "2", "train.progress": "false"})
    loop.train(cfg, work)
    perplexity.run_command(config_lib.for_command(None, work, {}), work, progress=False)
    source = plan.resolve_weights(config_lib.for_command(None, work, {}), work)
    g.generate(source.model_cfg, resolve.params_of(source), [1, 2, 3], max_new_tokens=3)
    lm = g.GPT2JaxLM.from_workdir(work, batch_size=2, progress=False)
    Instance = lm_eval.api.instance.Instance
    lm.loglikelihood([Instance("loglikelihood", {}, ("The cat", " sat"), 0)])
    after_use = state()
    print(json.dumps({"before": before, "import": after_import, "use": after_use,
                      "malloc": allocator.state()}))
    """
)


def _diff(a: dict, b: dict) -> dict:
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def test_importing_and_using_the_library_changes_nothing_process_wide(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    env["GPT2_JAX_CACHE"] = str(tmp_path / "cache")
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, helpers.TINY],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert _diff(out["before"], out["import"]) == {}
    changed = _diff(out["before"], out["use"])
    if "environ" in changed:  # name the variables, not two whole environments
        old, new = changed.pop("environ")
        changed["environ"] = {k: (old.get(k), new.get(k)) for k in old.keys() | new.keys()
                              if old.get(k) != new.get(k)}  # fmt: skip
    assert changed == {}
    assert out["malloc"] is None  # only the gpt2-jax command tunes malloc


def test_the_public_api_is_lazy_and_complete():
    code = (
        "import sys, gpt2_jax as g\n"
        "assert 'jax' not in sys.modules, 'import gpt2_jax loaded jax'\n"
        "for n in g.__all__:\n"
        "    obj = getattr(g, n)\n"
        "    assert obj.__module__ == g._API[n], (n, obj.__module__)\n"
        "print(' '.join(g.__all__))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    names = set(r.stdout.split())
    assert {"GPT2", "GPT2Config", "load_pretrained", "save_pretrained", "generate",
            "generate_batch", "GPT2JaxLM", "get_tokenizer"} <= names  # fmt: skip
