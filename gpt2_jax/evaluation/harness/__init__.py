"""EleutherAI's lm-evaluation-harness backend: gpt2_jax's GPT-2 as an ``lm_eval`` model.

``GPT2JaxLM`` is an ``lm_eval.api.model.LM`` (through ``TemplateLM``, which splits
context and continuation as every lm-eval backend does), registered as ``"gpt2_jax"``
when this package is imported::

    from gpt2_jax.evaluation import harness
    import lm_eval
    lm = harness.GPT2JaxLM.from_workdir("runs/x")      # or from_hf(dir), or (model_cfg, params)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])
    lm_eval.simple_evaluate(model="gpt2_jax", model_args="init_from=hf:DIR", tasks=[...])

One job per module:

- ``lm``: the backend class and lm-eval's hooks (what is scored, and how it matches the
  ``hf`` backend);
- ``scoring``: packed rows, length buckets, the jitted trunk, bounded executables;
- ``head``: the scoring head (log-probabilities of given tokens, a chunk of rows at once);
- ``generation``: ``generate_until``'s kwargs and decoding;
- ``loading``: weights through the one config path and resolver;
- ``tasks`` / ``task_scope``: the TaskManager (only the task directories a command
  needs), the task checks and their errors;
- ``results``: running lm-eval, scalars, the results JSON and samples, the table;
- ``command``: ``gpt2-jax lm-eval``; ``hook``: the harness during training.

The buckets and ``pack`` are in ``evaluation/buckets.py``; the model arguments and
``HarnessError`` in ``evaluation/harness_args.py`` (importable without lm-eval).
"""

from gpt2_jax.evaluation.buckets import length_bucket, pack
from gpt2_jax.evaluation.harness.command import evaluate_command
from gpt2_jax.evaluation.harness.hook import TrainingHook
from gpt2_jax.evaluation.harness.lm import GPT2JaxLM
from gpt2_jax.evaluation.harness.loading import check_weights, load_weights
from gpt2_jax.evaluation.harness.results import (
    results_path,
    run,
    scalars,
    table,
    write_results,
)
from gpt2_jax.evaluation.harness.scoring import Row, ScoringStats
from gpt2_jax.evaluation.harness.tasks import check_tasks, load_tasks, task_manager
from gpt2_jax.evaluation.harness_args import MODEL_ARGS, HarnessError, parse_seed

__all__ = [
    "GPT2JaxLM", "HarnessError", "MODEL_ARGS", "Row", "ScoringStats",
    "TrainingHook", "check_tasks", "check_weights",
    "evaluate_command", "length_bucket", "load_tasks", "load_weights", "pack", "parse_seed",
    "results_path", "run", "scalars", "table", "task_manager", "write_results",
]  # fmt: skip
