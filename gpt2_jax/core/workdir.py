"""The files of a run's workdir, named here once (every module that reads or writes one
takes its name from here)."""

CONFIG = "config.json"  # the resolved config
CHECKPOINTS = "checkpoints"  # Orbax: <step>/
METRICS = "metrics.jsonl"  # one JSON record a line; what `gpt2-jax plot` reads
TENSORBOARD = "tensorboard"  # event files (train.report_to tensorboard)
WANDB_RUN_ID = "wandb_run_id"  # the W&B run a resume continues (train.report_to wandb)
LM_EVAL = "lm_eval"  # harness results: step_<N>.json
# What train.fresh moves aside (never deletes): a fresh start is a new run everywhere.
MOVED_ON_FRESH = (CHECKPOINTS, METRICS, TENSORBOARD, WANDB_RUN_ID)
