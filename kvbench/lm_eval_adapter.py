"""lm-evaluation-harness model types `kvbench-hf` (any method) and `asrkf-hf` (ASR-KF-EGR).

Every request runs through the kvbench engine, so compression reaches the score: for
`loglikelihood` the context is prefilled through the policy first and the continuation is then
scored against the compressed cache (a hook applied after a one-pass forward could not change the
score); `loglikelihood_rolling` feeds the text chunk by chunk, each chunk scored against what the
policy kept of the earlier ones; `generate_until` is the engine's decode loop with stop strings.

    lm_eval --model kvbench-hf --model_args pretrained=smollm2-135m,method=h2o,budget=256 --tasks kvbench_needle
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from kvbench import models
from kvbench.cache import POSITION_MODES
from kvbench.engine import Engine
from kvbench.policy import make_policy


@register_model("kvbench-hf")
class KVBenchLM(TemplateLM):
    """Any registered method: `method=NAME,budget=N` plus the method's own parameters in --model_args."""

    default_method = "full"

    def __init__(self, pretrained: str = models.DEFAULT_MODEL, method: str | None = None, budget: Any = None,
                 positions: str = "original", prefill_chunk: int = 512, device: str = "cpu",
                 dtype: str = "float32", batch_size: int | str = 1, max_batch_size: int | None = None,
                 **policy_args: Any) -> None:
        super().__init__()
        if str(batch_size) not in ("1", "auto"):
            raise ValueError(f"kvbench-hf evaluates one sequence at a time (per-sequence caches); got batch_size="
                             f"{batch_size}, use --batch_size 1")
        if positions not in POSITION_MODES:
            raise ValueError(f"positions={positions!r} is not a position mode; allowed: {', '.join(POSITION_MODES)}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={dtype!r}; allowed: float32, bfloat16, float16")
        self.method = method or self.default_method
        self.policy = make_policy(self.method, budget, **policy_args)  # validates name and parameters
        if self.policy.uses_budget and self.policy.budget is None:
            raise ValueError(f"method {self.method!r} needs budget= in --model_args (tokens, or a ratio like 0.25)")
        self.positions = positions
        lm, self.tokenizer = models.load(str(pretrained), device=device, dtype=getattr(torch, dtype))
        self.engine = Engine(lm, self.tokenizer, prefill_chunk=int(prefill_chunk))

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is scored from: BOS when the tokenizer has one (as lm-eval's HFLM does)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.engine.max_positions

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for _, context, continuation in tqdm(requests, disable=disable_tqdm, desc="kvbench loglikelihood"):
            self.engine.check_fits(len(context) + len(continuation), 0)
            session = self.engine.session(self.policy, self.positions)
            out.append(session.score(session.feed(context), continuation))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs = [("", text) for (text,) in (req.args for req in requests)]
        return [ll for ll, _ in self._loglikelihood_tokens(
            [(pair, [self.prefix_token_id], self.tok_encode(pair[1])) for pair in pairs], disable_tqdm)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([req.args for req in requests], disable=disable_tqdm,
                                        desc="kvbench generate_until"):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)
            result = self.engine.generate(ids, self.policy, max_new, stop=until, positions=self.positions)
            out.append(result.text)
        return out


@register_model("asrkf-hf")
class ASRKFLM(KVBenchLM):
    """ASR-KF-EGR with its defaults; its parameters (tau=, window=, k=, heads=, ...) go in --model_args."""

    default_method = "asrkf"

    def __init__(self, method: str | None = None, **kwargs: Any) -> None:
        if method not in (None, "asrkf"):
            raise ValueError(f"asrkf-hf always runs ASR-KF-EGR; use --model kvbench-hf for method={method!r}")
        super().__init__(method="asrkf", **kwargs)
