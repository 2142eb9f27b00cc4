"""lm-evaluation-harness model types `kvbench-hf` (any method) and `asrkf-hf` (ASR-KF-EGR).

Every request runs through the kvbench engine, so compression reaches the score: for
`loglikelihood` the context is prefilled through the policy first and the continuation is then
scored against the compressed cache (a hook applied after a one-pass forward could not change the
score); `loglikelihood_rolling` feeds the text chunk by chunk, each chunk scored against what the
policy kept of the earlier ones; `generate_until` is the engine's decode loop with stop strings.
Scoring requests longer than the model's window are scored as they are, positions running on (lm-eval's
`hf` model would cut the context instead): that is what the kvbench_rope window probes measure.

    lm_eval --model kvbench-hf --model_args pretrained=smollm2-135m,method=h2o,budget=256 --tasks kvbench_needle

Under `torchrun --nproc_per_node N -m lm_eval ...` (or `accelerate launch -m lm_eval ...`) each process evaluates
its share of the documents and rank 0 reports the scores one process gives (kvbench/lmeval/ranks.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own model table first: get_model() fills it only while empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from kvbench.lmeval.ranks import Ranks
from kvbench.runtime import models
from kvbench.runtime.batch import generate_batch
from kvbench.runtime.chat import converse, merge_turns
from kvbench.runtime.engine import Engine
from kvbench.runtime.runspec import RunSpec
from kvbench.runtime.session import RunResult, Session
from kvbench.tasks import TaskSettingsError

log = logging.getLogger("lm_eval.models.kvbench_hf")  # in lm-eval's tree: its --verbosity shows these lines


@dataclass
class Measured:
    """What the engine measured for one lm-eval request (kvbench compare folds these into its records)."""

    task: str
    doc_id: int
    result: RunResult


@register_model("kvbench-hf")
class KVBenchLM(TemplateLM):
    """Any registered method: `method=NAME,budget=N` plus the method's own parameters in --model_args;
    `kv_quant=int8|int4|int2` stores the K/V rows quantized (kvbench/kv/quant.py).

    `batch_size` > 1 decodes that many generation requests together (same generation settings, each on
    its own cache, so results equal batch size 1); scoring requests always run one at a time.

    Generation requests understand three extra `generation_kwargs` that kvbench's own tasks use:
    `turn_separator` (the context is a conversation: its user turns, split on this string, are fed one
    by one on one cache and each is answered; replies come back joined by '|'), `ignore_eos` and
    `past_window` (let the sequence run beyond the model's trained window).
    """

    default_method = "full"

    def __init__(self, pretrained: str = models.DEFAULT_MODEL, method: str | None = None, budget: Any = None,
                 positions: str = "original", query: str = "in-prompt", kv_quant: str = "none",
                 prefill_chunk: int = 512, device: str = "cpu", dtype: str = "float32", device_map: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, **policy_args: Any) -> None:
        try:
            self._build(pretrained, method, budget, positions, query, kv_quant, prefill_chunk, device, dtype,
                        device_map, batch_size, policy_args)
        except ModelArgsError:
            raise
        except (ValueError, FileNotFoundError) as err:
            raise ModelArgsError(str(err)) from err

    def _build(self, pretrained: str, method: str | None, budget: Any, positions: str, query: str, kv_quant: str,
               prefill_chunk: int, device: str, dtype: str, device_map: str | None, batch_size: int | str,
               policy_args: dict[str, Any]) -> None:
        batch = 1 if str(batch_size) == "auto" else batch_size
        if not str(batch).isdigit() or int(batch) < 1:
            raise ValueError(f"batch_size={batch_size!r}: use a whole number >= 1 (or auto, which means 1)")
        dtype = models.parse_dtype(str(dtype))
        chunk = str(prefill_chunk)
        if not chunk.isdigit() or int(chunk) < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk!r}: use a whole number of tokens >= 1")
        run = RunSpec.build(method or self.default_method, budget, policy_args, positions, query, str(kv_quant))
        ranks = Ranks.from_launcher(device)
        if ranks.world_size > 1 and device_map is not None:
            raise ValueError(f"device_map={device_map!r} with {ranks.world_size} processes: each would spread its "
                             "model over every device; drop device_map (device=cuda gives each rank its own GPU)")
        device = ranks.device(device)
        lm, tokenizer = models.load(str(pretrained), device=device, dtype=dtype, device_map=device_map)
        self._setup(Engine(lm, tokenizer, prefill_chunk=int(chunk)), run)
        self.batch_size = int(batch)
        self.ranks, self._rank, self._world_size = ranks, ranks.rank, ranks.world_size
        self._device = torch.device(device) if device_map is None else None

    @classmethod
    def from_engine(cls, engine: Engine, run: RunSpec, progress: bool = True) -> KVBenchLM:
        """An adapter around an already loaded model (kvbench compare runs many policies on one)."""
        lm = cls.__new__(cls)
        lm._setup(engine, run, progress)
        return lm

    def _setup(self, engine: Engine, run: RunSpec, progress: bool = True) -> None:
        TemplateLM.__init__(self)
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.run = run
        self.measured: list[Measured] = []
        self._last: list[RunResult] = []
        self._warned = False
        self._chat_applied = False
        self.progress = progress
        self.batch_size = 1
        self.ranks = Ranks()

    # lm-eval's evaluator splits the documents over the ranks and gathers their metrics through these
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.ranks.all_gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        return self.ranks.gather_object(obj, dst)

    def barrier(self) -> None:
        self.ranks.barrier()

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

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """`--apply_chat_template`: the evaluated model's own template (refused for a model without one)."""
        if not self.tokenizer.chat_template:
            raise ValueError("--apply_chat_template: this model has no chat template (a base model); run without it")
        self._chat_applied = True
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As lm-eval's `hf` model encodes: the tokenizer's own special tokens (Gemma's BOS) unless the text
        already starts with the BOS token, so both model types score the same token sequences."""
        if add_special_tokens is None:
            add_special_tokens = self._adds_special(string)
        return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

    def _adds_special(self, string: str) -> bool:
        bos = self.tokenizer.bos_token
        return not (bos and string.startswith(bos))

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if self.run.query != "in-prompt":
            return self._measure(requests, lambda: self._after(requests, score=True))
        return self._measure(requests, lambda: super(KVBenchLM, self).loglikelihood(requests, disable_tqdm))

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for _, context, continuation in tqdm(requests, disable=disable_tqdm or not self.progress,
                                                     desc="kvbench loglikelihood"):
            if len(context) + len(continuation) > self.engine.max_positions and not self._warned:
                self._warned = True
                log.warning("kvbench: scoring %d tokens, past the model's %d-position window: positions continue "
                            "as they are (no truncation)", len(context) + len(continuation), self.engine.max_positions)
            session = self.engine.session(self.run.policy, self.run.positions, kv_quant=self.run.kv_quant)
            t0 = time.perf_counter()
            out.append(session.score(session.feed(context), continuation))
            session.sync()
            self._last.append(session.result(len(context) + len(continuation), time.perf_counter() - t0))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if self.run.query != "in-prompt":  # a whole text is scored: no question to move after its context
            tasks = ", ".join(sorted({str(req.task_name) for req in requests}))
            raise ModelArgsError(f"query={self.run.query}: {tasks} scores whole texts (loglikelihood_rolling) and "
                                 "has no question to put after the compressed context; use query=in-prompt")
        texts = [req.args[0] for req in requests]
        tokens = [([self.prefix_token_id], self.tok_encode(text)) for text in texts]
        return self._measure(requests, lambda: [ll for ll, _ in self._loglikelihood_tokens(
            [(("", text), ctx, cont) for text, (ctx, cont) in zip(texts, tokens, strict=True)], disable_tqdm)])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.run.query != "in-prompt":
            return self._measure(requests, lambda: self._after(requests, score=False))
        return self._measure(requests, lambda: self._generate_all([req.args for req in requests], disable_tqdm))

    # -- the question after its compressed context (query=after | reuse) ----------------------------
    def split(self, context: str, doc: dict[str, Any], task: str) -> tuple[list[int], int]:
        """The context's tokens (encoded whole, as in-prompt) and the index of the first question token: the
        task marks the question with the doc field `question`, its exact text in the prompt (stock `hf` never
        reads it). A token straddling the boundary goes with the question."""
        question = doc.get(QUESTION_FIELD) if isinstance(doc, dict) else None
        if not question:
            raise ModelArgsError(f"{task}: query={self.run.query} needs the question marked (a doc field "
                             f"{QUESTION_FIELD!r} holding the text where it starts in the prompt); this task has none, "
                             "use query=in-prompt")
        at = context.rfind(question)
        if at < 0:
            raise ValueError(f"{task}: the doc's {QUESTION_FIELD!r} text does not occur in its prompt")
        if not self.tokenizer.is_fast:
            raise ValueError("query=after|reuse needs a fast tokenizer (character offsets of tokens)")
        enc = self.tokenizer(context, add_special_tokens=self._adds_special(context), return_offsets_mapping=True)
        first = next(i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > at)
        return enc["input_ids"], first

    def _after(self, requests, score: bool) -> list:
        """Each request's context compressed before its question is fed (`after`), or once for every request
        sharing it (`reuse`: each question from a copy of the compressed state)."""
        # scoring: trailing whitespace of the context belongs to the continuation, as lm-eval's _encode_pair has it
        split = [self.split(req.args[0].rstrip() if score else req.args[0], req.doc, req.task_name)
                 for req in requests]
        if not score:  # as in-prompt generation: prompt + answer must fit the model's window
            for (ids, _), req in zip(split, requests, strict=True):
                self.engine.check_fits(len(ids), int(req.args[1].get("max_gen_toks", 256)))
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ids, first) in enumerate(split):
            key = tuple(ids[:first]) if self.run.query == "reuse" else (i, *ids[:first])
            groups.setdefault(key, []).append(i)
        out: list = [None] * len(requests)
        results: list[RunResult | None] = [None] * len(requests)
        for members in tqdm(groups.values(), disable=not self.progress, desc=f"kvbench query={self.run.query}"):
            ids, first = split[members[0]]
            base, context_s = self.engine.compressed_context(ids[:first], self.run.policy, self.run.positions,
                                                             self.run.kv_quant)
            for n, i in enumerate(members):
                session = base if n == len(members) - 1 else base.fork()
                out[i], results[i] = self._question(session, split[i], requests[i].args, score)
                results[i].context_s, results[i].context_compressions = context_s, int(n == 0)
        self._last += results
        return out

    def _question(self, session: Session, split: tuple[list[int], int], args: tuple, score: bool):
        ids, first = split
        logits, seconds = session.timed_feed(ids[first:], query=True)
        if score:
            _, continuation = self._encode_pair(*args)  # split as in-prompt scoring splits it
            answer = session.score(logits, continuation, query=True)
            return answer, session.result(len(ids) + len(continuation), seconds)
        kwargs = args[1]
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        reply = session.reply(logits, int(kwargs.get("max_gen_toks", 256)), until, bool(kwargs.get("ignore_eos")))
        return reply.text, session.result(len(ids), seconds, reply)

    def _generate_all(self, args: list[tuple[str, dict[str, Any]]], disable_tqdm: bool) -> list[str]:
        """Consecutive requests with the same generation settings go together, up to `batch_size`."""
        out: list[str] = []
        bar = tqdm(total=len(args), disable=disable_tqdm or not self.progress, desc="kvbench generate_until")
        while len(out) < len(args):
            kwargs = args[len(out)][1]
            group = 1
            if not (kwargs.get("turn_separator") or kwargs.get("past_window")):
                while (group < self.batch_size and len(out) + group < len(args)
                       and args[len(out) + group][1] == kwargs):
                    group += 1
            out += self._generate([c for c, _ in args[len(out) : len(out) + group]], kwargs)
            bar.update(group)
        bar.close()
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", 256))
        ignore_eos = bool(gen_kwargs.get("ignore_eos"))
        separator = gen_kwargs.get("turn_separator")
        if separator:
            turns = [t.strip() for t in contexts[0].split(separator) if t.strip()]
            results = [merge_turns(converse(self.engine, turns, self.run.policy, max_new, until,
                                            self.run.positions, self.run.kv_quant))]
        elif len(contexts) > 1:
            results = generate_batch(self.engine, [self.tok_encode(c) for c in contexts], self.run.policy, max_new,
                                                 until, ignore_eos, self.run.positions, self.run.kv_quant)
        else:
            results = [self.engine.generate(self.tok_encode(contexts[0]), self.run.policy, max_new, stop=until,
                                            positions=self.run.positions, ignore_eos=ignore_eos,
                                            kv_quant=self.run.kv_quant,
                                            past_window=bool(gen_kwargs.get("past_window")))]
        self._last += results
        return [r.text for r in results]

    def _measure(self, requests, evaluate: Callable[[], list]) -> list:
        """Run `evaluate` (one engine run per request, in order) and keep each run's measurements."""
        own = sorted({req.task_name for req in requests if str(req.task_name).startswith("kvbench_")})
        if self._chat_applied and own:
            raise TaskSettingsError(f"{', '.join(own)}: kvbench's tasks already render their prompts in the evaluated "
                                    "model's chat format (plain text for a base model); run them without "
                                    "--apply_chat_template")
        self._last: list[RunResult] = []
        out = evaluate()
        self.measured += [Measured(req.task_name, req.doc_id, r) for req, r in zip(requests, self._last, strict=True)]
        if self.ranks.world_size > 1 and requests:
            log.info("rank %d of %d ran %d %s requests", self.ranks.rank, self.ranks.world_size, len(requests),
                     requests[0].request_type)
        return out


@register_model("asrkf-hf")
class ASRKFLM(KVBenchLM):
    """ASR-KF-EGR with its defaults; its parameters (tau=, window=, k=, heads=, ...) go in --model_args."""

    default_method = "asrkf"

    def __init__(self, method: str | None = None, **kwargs: Any) -> None:
        if method not in (None, "asrkf"):
            raise ModelArgsError(f"asrkf-hf always runs ASR-KF-EGR; use --model kvbench-hf for method={method!r}")
        super().__init__(method="asrkf", **kwargs)


class ModelArgsError(ValueError):
    """A --model_args value (or the model it names) that kvbench refuses. Stock `lm_eval` reports it in one line
    with exit code 2, as kvbench's own CLI does, instead of a traceback (kvbench_lm_eval_hook)."""


QUESTION_FIELD = "question"  # the doc field that marks where a task's question starts in its prompt

