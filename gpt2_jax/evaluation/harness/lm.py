"""``GPT2JaxLM``: gpt2_jax's GPT-2 behind lm-eval's model interface, registered with
lm-eval as ``"gpt2_jax"`` when this module is imported.

Its results are lm-eval's ``hf`` backend's on the same weights (tests/test_harness.py):

- ``loglikelihood``: the request's context + continuation tokens, left-truncated to the
  last ``n_positions + 1`` and minus the last, scored on the continuation's positions;
  (summed log-probability, whether every continuation token is the argmax).
- ``loglikelihood_rolling``: the harness's own disjoint windows
  (``lm_eval.utils.get_rolling_token_windows`` + ``make_disjoint_window``, ``<|endoftext|>``
  prefix), each scored as a loglikelihood request, summed per document.
- ``generate_until``: the KV-cache decoder (generation.py), greedy or sampled,
  ``max_gen_toks`` new tokens, ended by ``<|endoftext|>`` and cut at the first ``until``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from gpt2_jax.data import tokenizer as tok_lib
from gpt2_jax.evaluation import generate as gen_lib
from gpt2_jax.evaluation import harness_args
from gpt2_jax.evaluation.harness import generation, loading, scoring
from gpt2_jax.evaluation.harness_args import HarnessError
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import gpt2 as model_lib


@register_model("gpt2_jax")
class GPT2JaxLM(TemplateLM):
    """gpt2_jax's GPT-2 behind lm-eval's model interface.

    ``model_cfg``/``params``: a model config and its params (either layer layout, host or
    device arrays). ``batch_size``: rows per scoring or decoding batch (rounded up to a
    multiple of the device count). ``max_gen_toks``: generate_until's default new-token
    budget. ``seed``: sampled generation's seed. ``progress``: a tqdm bar on stderr.
    """

    def __init__(
        self,
        model_cfg: gpt2_config.GPT2Config,
        params: dict,
        *,
        batch_size: int = 16,
        max_gen_toks: int = harness_args.MAX_GEN_TOKS,
        seed: int = 0,
        progress: bool = True,
        devices: Sequence[jax.Device] | None = None,
        description: str = "gpt2_jax",
    ):
        super().__init__()
        if batch_size < 1:
            raise HarnessError(f"batch_size={batch_size}: must be >= 1")
        if max_gen_toks < 1:  # (and < n_positions: checked per request, as lm-eval's hf)
            raise HarnessError(f"max_gen_toks={max_gen_toks}: must be >= 1")
        # The params are kept unrolled (h_<i>, see set_params): the trunk runs that layout.
        self.model_cfg = dataclasses.replace(model_cfg, scan_layers=False)
        self.description = description
        self.source = None  # the weights.Source, when built from a workdir or hf weights
        self.enc = tok_lib.get_tokenizer()
        self.progress = progress
        self.seed = int(seed)
        self._max_gen_toks = int(max_gen_toks)
        devices = list(jax.devices() if devices is None else devices)
        mesh = Mesh(np.asarray(devices).reshape(-1, 1), ("data", "fsdp"))
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.scorer = scoring.Scorer(self.model_cfg, mesh, self.batch_size)
        self.set_params(params)

    @property
    def stats(self) -> scoring.ScoringStats:
        return self.scorer.stats

    def set_params(self, params: dict) -> None:
        """New weights of the same model config (training's periodic harness eval): the
        compiled executables are kept."""
        # Unrolled layers on the host: the decoder reads them as is, and the trunk gets
        # them replicated over the mesh once.
        self._host_params = loading.host_tree(params)
        self.scorer.set_params(self._host_params)
        self._decode_params = None  # built on the next generate_until

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_workdir(cls, workdir, step=None, dtype: str | None = None, **kwargs) -> GPT2JaxLM:
        """The model of a gpt2-jax run: its latest checkpoint, step N, or "best"."""
        return cls._from_weights(loading.load_weights(workdir=workdir, step=step, dtype=dtype),
                                 **kwargs)  # fmt: skip

    @classmethod
    def from_hf(
        cls, path_or_hub_id, dtype: str | None = None, adapter: str = "", **kwargs
    ) -> GPT2JaxLM:
        """Hugging Face GPT-2 weights: a local directory or a hub id; ``adapter``: a PEFT
        LoRA adapter directory merged into them once."""
        init_from = str(path_or_hub_id)
        init_from = init_from if init_from.startswith("hf:") else f"hf:{init_from}"
        loaded = loading.load_weights(init_from=init_from, dtype=dtype, adapter=adapter)
        return cls._from_weights(loaded, **kwargs)

    @classmethod
    def _from_weights(cls, loaded, **kwargs) -> GPT2JaxLM:
        model_cfg, params, source = loaded
        lm = cls(model_cfg, params, description=source.describe(), **kwargs)
        lm.source = source
        return lm

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """``model_args="init_from=hf:DIR"`` or ``"workdir=DIR,step=best"``, plus lm-eval's
        ``batch_size`` (``device`` and ``max_batch_size`` are ignored: JAX picks devices)."""
        args = lm_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "batch_size" in extra and "batch_size" not in args:
            args["batch_size"] = extra["batch_size"]
        return cls.from_args(args)

    @classmethod
    def from_args(cls, args: dict) -> GPT2JaxLM:
        """From ``MODEL_ARGS`` keys; one of ``init_from`` / ``workdir`` names the weights."""
        harness_args.check_model_args(args)
        args = dict(args)
        init_from, workdir = args.pop("init_from", ""), args.pop("workdir", "")
        step = args.pop("step", None)
        dtype = args.pop("dtype", None)
        adapter = str(args.pop("adapter", "") or "")
        if args.get("batch_size") in ("auto", None):
            args.pop("batch_size", None)  # lm-eval's auto-detection: our default instead
        kwargs = {k: int(v) for k, v in args.items()}
        if bool(init_from) == bool(workdir):
            raise HarnessError("model_args: give init_from=hf:<dir or hub id> or workdir=DIR")
        if workdir:
            if adapter:
                raise HarnessError("model_args: adapter= goes with init_from=, not workdir=")
            step = harness_args.parse_step_arg(step)
            return cls.from_workdir(workdir, step=step, dtype=dtype, **kwargs)
        return cls.from_hf(str(init_from), dtype=dtype, adapter=adapter, **kwargs)

    # ---------------------------------------------------------------- lm-eval's hooks

    @property
    def eot_token_id(self) -> int:
        return tok_lib.EOT_ID

    @property
    def max_length(self) -> int:
        return self.model_cfg.n_positions

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        # As Hugging Face's GPT-2 tokenizer: a literal <|endoftext|> is the special token.
        return self.enc.encode(string, allowed_special={tok_lib.EOT_TOKEN})

    def tok_decode(self, tokens) -> str:
        return tok_lib.decode(self.enc, tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``((context, continuation), context_enc, continuation_enc)`` ->
        [(summed log-probability, is-greedy)] in the same order."""
        L = self.max_length
        rows = []
        for _, context_enc, continuation_enc in requests:
            whole = (list(context_enc) + list(continuation_enc))[-(L + 1) :]
            rows.append(scoring.Row(tuple(whole[:-1]), tuple(continuation_enc[-len(whole) + 1 :])))
        return self.score(rows, desc="loglikelihood", disable=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood over the harness's disjoint rolling windows."""
        rows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, windows):
                whole = (context + continuation)[-(self.max_length + 1) :]
                rows.append(scoring.Row(tuple(whole[:-1]), tuple(continuation)))
                owner.append(i)
        scores = self.score(rows, desc="loglikelihood_rolling", disable=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores, strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decodes each request's context until one of its ``until`` strings; requests of
        the same settings share batches, longest prompts first."""
        eos = self.enc.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            s = generation.settings(req.args[1], eos, self.max_gen_toks, self.max_length)
            settings.append(s)
            groups.setdefault(repr(sorted(s.items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = self._bar(len(requests), "generate_until", disable_tqdm)
        for idx in groups.values():
            s = settings[idx[0]]
            prompts = {}
            for i in idx:
                ids = self.tok_encode(requests[i].args[0])[-(self.max_length - s["max_gen_toks"]) :]
                prompts[i] = ids or [self.eot_token_id]  # an empty context starts at EOT
            order = sorted(idx, key=lambda i: (-len(prompts[i]), i))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                texts = self._generate([prompts[i] for i in chunk], s)
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
                    context, gen_kwargs = requests[i].args
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(len(chunk))
        bar.close()
        return out

    # ---------------------------------------------------------------- the work

    def score(self, rows: list[scoring.Row], desc: str = "score", disable: bool = False):
        """[(summed log-probability, is-greedy)] for each row, in order."""
        if not rows:
            return []
        for r in rows:
            if not r.targets or len(r.targets) > len(r.tokens) or len(r.tokens) > self.max_length:
                raise HarnessError(f"cannot score {len(r.targets)} tokens of {len(r.tokens)}")
        bar = self._bar(len(rows), desc, disable)
        results = self.scorer.score(rows, bar)
        bar.close()
        return results

    def _generate(self, prompts: list[list[int]], s: dict) -> list[str]:
        if self._decode_params is None:
            self._decode_params = gen_lib.decode_params(self.model_cfg, self._host_params)
        return generation.decode_texts(
            self.model_cfg, self._decode_params, prompts, s,
            batch_size=self.batch_size, seed=self.seed, enc=self.enc,
        )  # fmt: skip

    def _bar(self, total: int, desc: str, disable: bool):
        off = disable or not self.progress or jax.process_index() != 0
        return tqdm(total=total, desc=desc, disable=off, file=sys.stderr, unit="req")

    def get_model_info(self) -> dict:
        return {"model": self.description, "n_params": model_lib.count_params(self._host_params)}
