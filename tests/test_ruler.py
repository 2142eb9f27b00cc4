"""The RULER-style suite: seeded generators sized in the evaluated model's tokens, answers that are really in
the context, RULER's string match, and every task answerable in every query mode."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance

import tiny
from kvbench.lmeval.adapter import KVBenchLM
from kvbench.runtime import models
from kvbench.runtime.engine import Engine
from kvbench.runtime.runspec import RunSpec
from kvbench.tasks import ruler
from kvbench.tasks.lm_eval.utils import ruler as ruler_docs

TASKS = sorted(ruler.TASKS)


@pytest.fixture(scope="module")
def docs():
    return {t: ruler_docs(t, context_lengths=[512, 1024], samples=2, seed=3)["test"] for t in TASKS}


@pytest.mark.parametrize("task", TASKS)
def test_samples_fit_their_length_in_the_models_tokens_and_hold_their_answers(task, docs):
    tok = models.load_tokenizer()
    rows = docs[task]
    per_context = 4 if task == "niah_reuse" else 1  # one doc per question, the same context in each
    assert [r["context_length"] for r in rows] == [512] * 2 * per_context + [1024] * 2 * per_context
    for r in rows:
        n = len(tok(r["prompt"])["input_ids"])
        low = 0.8 if task == "qa" else 0.9  # qa grows by whole documents (~85 tokens)
        assert low * r["context_length"] <= n <= r["context_length"]
        context, _, tail = r["prompt"].rpartition(r["question"])
        assert context and r["question"] not in context  # marked once, after the context
        assert all(a in context for a in r["answers"]) or task in ("fwe", "qa")
    again = ruler_docs(task, context_lengths=[512, 1024], samples=2, seed=3)["test"]
    other = ruler_docs(task, context_lengths=[512], samples=1, seed=4)["test"]
    assert list(again) == list(rows) and other[0]["prompt"] != rows[0]["prompt"]


def test_the_aggregation_answers_are_what_the_lists_say():
    tok = models.load_tokenizer()
    for task in ("cwe", "fwe"):
        item = ruler.generate(task, 1024, 1, 0, lambda it: len(tok(it.context + it.question)["input_ids"]))[0]
        listed = [w.rstrip(".") for w in item.context.split(". ", 1)[-1].split() if not w[:-1].isdigit()]
        counts = {w: listed.count(w) for w in set(listed)}
        cut = sorted(counts.values(), reverse=True)[len(item.answers) - 1]
        assert all(counts[a] >= cut for a in item.answers)
        assert min(counts[a] for a in item.answers) > max(c for w, c in counts.items() if w not in item.answers)


def test_string_match_is_rulers():
    assert ruler.score("are: 123, 456", ["123", "456", "789"], "niah_multivalue") == pytest.approx(2 / 3)
    assert ruler.score("ABC def", ["abc", "DEF"], "vt") == 1.0
    assert ruler.score(" 13", ["3"], "qa") == 0.0 and ruler.score(" 3.", ["3"], "qa") == 1.0


@pytest.mark.parametrize("query", ["in-prompt", "after", "reuse"])
def test_every_task_runs_in_every_query_mode(query, docs):
    engine = Engine(tiny.build("llama", "sdpa"), models.load_tokenizer(), prefill_chunk=256)
    lm = KVBenchLM.from_engine(engine, RunSpec.build("snapkv", 128, query=query), progress=False)
    requests = [Instance("generate_until", r, (r["prompt"], {"until": [], "max_gen_toks": 3}), i,
                         (f"kvbench_ruler_{t}", i, 1))
                for t in TASKS for i, r in enumerate(docs[t])
                if r["context_length"] == 512 and r["sample"] == 0 and r["question_index"] == 0]
    answers = lm.generate_until(requests)
    assert len(answers) == len(TASKS) and all(isinstance(a, str) for a in answers)
    assert all(m.result.prompt_tokens > 400 for m in lm.measured)
    if query != "in-prompt":
        assert [m.result.context_compressions for m in lm.measured] == [1] * len(TASKS)


def test_niah_reuse_asks_each_key_of_one_context_and_reuse_compresses_it_once(docs):
    rows = [r for r in docs["niah_reuse"] if r["context_length"] == 512 and r["sample"] == 0]
    contexts = {r["prompt"].rpartition(r["question"])[0] for r in rows}
    assert len(rows) == 4 and len(contexts) == 1  # four questions on one context
    assert len({tuple(r["answers"]) for r in rows}) == 4 and all(len(r["answers"]) == 1 for r in rows)
    context = contexts.pop()
    assert all(r["answers"][0] in context for r in rows)
    engine = Engine(tiny.build("llama", "sdpa"), models.load_tokenizer(), prefill_chunk=256)
    requests = [Instance("generate_until", r, (r["prompt"], {"until": [], "max_gen_toks": 3}), i,
                         ("kvbench_ruler_niah_reuse", i, 1)) for i, r in enumerate(rows)]
    reuse = KVBenchLM.from_engine(engine, RunSpec.build("snapkv", 128, query="reuse"), progress=False)
    after = KVBenchLM.from_engine(engine, RunSpec.build("snapkv", 128, query="after"), progress=False)
    assert reuse.generate_until(requests) == after.generate_until(requests)
    assert sorted(m.result.context_compressions for m in reuse.measured) == [0, 0, 0, 1]
    assert [m.result.context_compressions for m in after.measured] == [1, 1, 1, 1]


def test_the_needle_sized_exactly_fills_its_length_in_the_models_tokens():
    """`exact_lengths = 1`: every prompt (chat template and answer prefix included) at most its length and within 1%
    of it, on repetitive filler and on prose; 0 keeps the estimate the committed leaderboard ran (4-5% short)."""
    from kvbench.lmeval.tasks import check_metadata
    from kvbench.tasks.lm_eval.utils import needle

    tok = models.load_tokenizer("smollm2-135m")
    meta = {"context_lengths": [1024, 4096], "depths": [0.1, 0.9], "varied_context_lengths": [1024]}
    docs = needle(**meta, exact_lengths=1)["test"]
    assert sorted({(d["filler"], d["context_length"]) for d in docs}) == [("simple", 1024), ("simple", 4096),
                                                                        ("varied", 1024)]
    for doc in docs:
        assert 0.99 * doc["context_length"] <= len(tok(doc["prompt"])["input_ids"]) <= doc["context_length"]
    nominal = needle(**meta)["test"]
    assert len(tok(nominal[0]["prompt"])["input_ids"]) < 0.97 * 1024  # the estimate: short of its length
    for bad in (2, True, [1]):
        with pytest.raises(ValueError, match="exact_lengths = .* is not 0 or 1"):
            check_metadata("kvbench_needle", {"exact_lengths": bad}, "here")
