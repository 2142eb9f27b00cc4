"""kvbench's lm-eval task definitions run from `kvbench compare`, so its accuracy columns are the numbers a
user's `lm_eval --model kvbench-hf ...` run gives: the same YAML, the same data, lm-eval's own metrics.

The adapter wraps the already loaded engine (one model load for every policy) and keeps what the engine
measured per request; those measurements become the per-sample records behind the memory and latency
columns.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

from kvbench.evaluation.records import sample_record
from kvbench.lmeval.tasks import TASK_DIR
from kvbench.runtime.engine import Engine
from kvbench.runtime.runspec import RunSpec

MAX_META_CHARS = 200  # doc fields longer than this (prompts, documents) stay out of the records


@dataclass
class TaskScores:
    scores: dict[str, float]  # task (or subtask) -> its primary metric, lm-eval's aggregate
    metrics: dict[str, str]  # task -> primary metric name, e.g. exact_match, word_perplexity
    samples: list[dict[str, Any]]  # one kvbench sample record per lm-eval request
    responses: dict[str, list[list[Any]]]  # "task:document" -> lm-eval's responses to its requests (each repeat)


@functools.cache
def task_names() -> tuple[str, ...]:
    """Tasks and groups in kvbench's lm-eval folder."""
    return tuple(sorted(_manager().all_tasks))


@functools.cache
def _manager(metadata: str = "{}"):
    """A TaskManager over kvbench's folder only (indexing all of lm-eval's tasks costs ~5 s per instance);
    one per distinct metadata override (JSON text, so it can be cached)."""
    import lm_eval.tasks

    return lm_eval.tasks.TaskManager(include_defaults=False, include_path=str(TASK_DIR),
                                     metadata=json.loads(metadata) or None)


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's INFO lines (one per task and request type) and its bar over the documents as it builds requests
    (which takes no argument to turn it off) would break kvbench's progress bar: errors only and no bar while
    kvbench runs a task, and the caller's logging level and lm-eval's bar back afterwards (a process that also runs
    lm-eval itself keeps both)."""
    import lm_eval.api.task
    from tqdm import tqdm

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with mock.patch.object(lm_eval.api.task, "tqdm", functools.partial(tqdm, disable=True)):
            yield
    finally:
        logger.setLevel(level)


def run_lm_eval(lm: Any, model: str, task: str, limit: int | None, metadata: dict[str, Any] | None,
                     samples: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """lm-eval on `task` with kvbench's task folder, per-document logs and no bootstrap; `samples` (each lm-eval task
    under `task` -> the ascending indices of its documents to run) replaces `limit`."""
    import lm_eval

    manager = _manager(json.dumps({**(metadata or {}), "pretrained": model}, sort_keys=True))
    with quiet_lm_eval():
        return lm_eval.simple_evaluate(model=lm, tasks=[task], limit=None if samples else limit, samples=samples,
                                       task_manager=manager, log_samples=True, bootstrap_iters=0)


def primary_scores(out: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """Each task's (and group's) primary metric from lm-eval's results: value, and name."""
    scores, metrics = {}, {}
    for name, values in out["results"].items():
        key = next((k for k in values if "," in k and "_stderr" not in k), None)
        if key is None:  # a group without an aggregate
            continue
        scores[name], metrics[name] = float(values[key]), key.split(",")[0]
    return scores, metrics


def evaluate(engine: Engine, model: str, run: RunSpec, task: str, limit: int | None = None,
             metadata: dict[str, Any] | None = None, samples: dict[str, list[int]] | None = None) -> TaskScores:
    """One lm-eval task (or group) for one run on `engine`'s model (`model`: its --model name, from which the
    tasks take the tokenizer and chat template); `metadata` overrides the YAML's; `samples` runs only those
    documents (a shard of a cell, kvbench/evaluation/shards.py)."""
    from kvbench.lmeval.adapter import KVBenchLM

    lm = KVBenchLM.from_engine(engine, run, progress=False)
    out = run_lm_eval(lm, model, task, limit, metadata, samples)
    scores, metrics = primary_scores(out)
    logged = {(name, s["doc_id"]): s for name, rows in out["samples"].items() for s in rows}
    records = []
    for m in lm.measured:  # lm-eval numbers the documents of a `samples` run from 0, its logs by their index
        s = logged[(m.task, samples[m.task][m.doc_id] if samples else m.doc_id)]
        value = s.get(metrics[m.task])
        prediction = s["filtered_resps"][0] if isinstance(s["filtered_resps"][0], str) else ""
        meta = {k: v for k, v in s["doc"].items() if not (isinstance(v, str) and len(v) > MAX_META_CHARS)}
        records.append(sample_record(m.task, f"{m.task}-{s['doc_id']}", _short(str(s["target"])), meta, prediction,
                                     m.result, value if isinstance(value, int | float) else None))
    responses = {f"{name}:{s['doc_id']}": s["resps"] for name, rows in out["samples"].items() for s in rows}
    return TaskScores(scores, metrics, records, responses)


def document_sizes(model: str, task: str, limit: int | None, metadata: dict[str, Any] | None
                   ) -> dict[str, list[int]]:
    """Each lm-eval task under `task` (itself, or a group's subtasks) -> the size of each document a run with `limit`
    evaluates, in characters of its text and target: what it costs to run, roughly, before it runs."""
    manager = _manager(json.dumps({**(metadata or {}), "pretrained": model}, sort_keys=True))
    with quiet_lm_eval():
        loaded = manager.load([task])["tasks"]
    return {name: [len(str(t.doc_to_text(doc))) + len(str(t.doc_to_target(doc)))
                   for doc in itertools.islice(t.eval_docs, limit)]
            for name, t in loaded.items()}


def _short(text: str) -> str:
    """A target as it goes into the records: whole when short, else its start (perplexity documents)."""
    return text if len(text) <= MAX_META_CHARS else f"{text[:80]}… ({len(text)} characters)"
