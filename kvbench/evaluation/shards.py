"""A large cell run as shards of its documents, merged into the cell one run gives.

A sweep file's `shards = { TASK = N }` splits each cell of TASK into N shards (fewer when a task has fewer documents):
shard k runs documents k, k + N, k + 2N, ... of each lm-eval task under TASK (a group's subtasks alike), the split
lm-eval makes over ranks, and keeps lm-eval's response to every request. A shard is a cell of its own in the store
(keyed by its cell's configuration and its documents), so shards run on different Ray workers and a sweep resumes
shard by shard. The merge replays the recorded responses through lm-eval over the whole cell (`Replay`): filters,
per-document metrics, aggregation and group scores are lm-eval's own, computed as one run computes them, and the
per-sample records follow the order in which that run asks for them. Timings stay per sample, so the latency columns
pool them.

A `reuse` cell compresses each shared context once for all its questions: its documents are not independent, so it
runs whole.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM

from kvbench.evaluation.compare import Cell
from kvbench.evaluation.lmeval_tasks import primary_scores, run_lm_eval

Documents = dict[str, list[int]]  # each lm-eval task under a cell's task -> the indices of its documents in a shard


def split(counts: dict[str, int], shards: int) -> list[Documents]:
    """`shards` strided shards of every task's documents (`counts`: task -> documents), fewer where a task has fewer
    documents than that (lm-eval reads an empty list as "every document")."""
    n = max(1, min(shards, *counts.values()))
    return [{name: list(range(k, count, n)) for name, count in counts.items()} for k in range(n)]


class Replay(LM):
    """An lm-eval model answering each request with the response recorded for it (task:document -> per request, per
    repeat), noting the order in which it is asked."""

    def __init__(self, responses: dict[str, list[list[Any]]]) -> None:
        super().__init__()
        self.responses = responses
        self.order: list[str] = []  # the sample id of each request, in the order lm-eval sends them
        self._given: dict[tuple[str, int], int] = {}

    def _answer(self, requests: list[Any]) -> list[Any]:
        out = []
        for req in requests:
            key = f"{req.task_name}:{req.doc_id}"
            if key not in self.responses:
                raise ValueError(f"no recorded response for {req.task_name} document {req.doc_id}: a shard is "
                                 "missing or was computed for other documents")
            repeat = self._given.get((key, req.idx), 0)
            self._given[(key, req.idx)] = repeat + 1
            self.order.append(f"{req.task_name}-{req.doc_id}")
            out.append(self.responses[key][req.idx][repeat])
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [tuple(r) for r in self._answer(requests)]  # a stored (logprob, greedy) pair comes back as a list

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self._answer(requests)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self._answer(requests)


def merge(model: str, task: str, limit: int | None, metadata: dict[str, Any] | None, parts: list[Cell]) -> Cell:
    """The cell of `task` one run gives, from its shards: lm-eval's scores over the replayed responses, and every
    shard's sample records in that run's order (several requests of one document in the order they were run)."""
    replay = Replay({key: value for part in parts for key, value in part.responses.items()})
    scores, metrics = primary_scores(run_lm_eval(replay, model, task, limit, metadata))
    pending: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        for sample in part.samples:
            pending.setdefault(sample["id"], []).append(sample)
    samples = [pending[sample_id].pop(0) for sample_id in replay.order]
    left = sorted(sample_id for sample_id, rest in pending.items() if rest)
    if left:
        raise ValueError(f"{task}: the shards hold samples a whole run does not ask for ({', '.join(left[:4])})")
    hosts = sorted({part.host for part in parts})
    return Cell(task, samples, scores, metrics, " + ".join(hosts))
