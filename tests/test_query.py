"""Where the question goes: inside the compressed prompt (`in-prompt`), after its context was compressed to
completion (`after`), or one of several questions answered from one compressed context (`reuse`). Mechanics on
a tiny random Llama; the lm-eval path on the real model."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance

import tiny
from kvbench.lmeval.adapter import KVBenchLM
from kvbench.policy import make_policy
from kvbench.runtime.engine import Engine
from kvbench.runtime.runspec import RunSpec

CONTEXT = "Archive notes. " + " ".join(f"Box {i} holds item {i * 7 % 23}." for i in range(40))
QUESTIONS = ["\n\nWhich item is in box 3?", "\n\nWhich item is in box 17?", "\n\nHow many boxes are there?"]


@pytest.fixture(scope="module")
def engine():
    from kvbench.runtime import models

    return Engine(tiny.build("llama", "sdpa"), models.load_tokenizer(), prefill_chunk=64)


def requests(questions=QUESTIONS, kind: str = "generate_until", field: str = "question") -> list[Instance]:
    out = []
    for i, q in enumerate(questions):
        args = (CONTEXT + q, {"until": ["\n"], "max_gen_toks": 6}) if kind == "generate_until" else (CONTEXT + q,
                                                                                                     " item 5")
        out.append(Instance(kind, {field: q}, args, i, ("kvbench_probe", i, 1)))
    return out


def adapter(engine, method: str, budget, query: str, **params) -> KVBenchLM:
    return KVBenchLM.from_engine(engine, RunSpec.build(method, budget, params, query=query), progress=False)


def test_full_gives_the_same_answers_and_scores_in_every_mode(engine):
    """`full` compresses nothing, so only where the prompt is cut into feeds changes: answers are identical."""
    answers = {q: adapter(engine, "full", None, q).generate_until(requests()) for q in ("in-prompt", "after", "reuse")}
    assert answers["after"] == answers["in-prompt"] == answers["reuse"]
    scores = {q: adapter(engine, "full", None, q).loglikelihood(requests(kind="loglikelihood"))
              for q in ("in-prompt", "after")}
    for (a, _), (b, _) in zip(scores["after"], scores["in-prompt"], strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_after_compresses_the_context_before_the_question_and_not_again(engine):
    """SnapKV votes with the last queries of what it compresses: under `after` that is the context alone, and the
    question tokens that follow are all kept (a one-shot method does not compress a question)."""
    lm = adapter(engine, "snapkv", 24, "after", window=8)
    ids, first = lm.split(CONTEXT + QUESTIONS[0], {"question": QUESTIONS[0]}, "probe")
    assert engine.tokenizer.decode(ids[first:]).startswith("\n\nWhich")
    context_only, _ = engine.compressed_context(ids[:first], make_policy("snapkv", 24, window=8))
    kept = [sorted(layer.positions[0, 0].tolist()) for layer in context_only.cache.layers]
    question = list(range(first, len(ids)))
    seen = []

    def check(step):
        cache = step.cache
        seen.append([sorted(layer.positions[0, 0].tolist()) for layer in cache.layers])

    base, _ = engine.compressed_context(ids[:first], make_policy("snapkv", 24, window=8))
    base.on_step = check
    base.feed(ids[first:], query=True)
    assert seen[-1] == [k + question for k in kept]
    in_prompt = engine.generate(ids, make_policy("snapkv", 24, window=8), 1)
    assert in_prompt.cache.active_tokens[0] == 24  # in-prompt, the question was judged (and cut) with the rest


def test_reuse_compresses_each_context_once_and_answers_as_after_does(engine):
    for method, budget, params in (("h2o", 24, {}), ("snapkv", 24, {"window": 8}), ("asrkf", None, {"window": 4})):
        after, reuse = adapter(engine, method, budget, "after", **params), adapter(engine, method, budget, "reuse",
                                                                                  **params)
        assert reuse.generate_until(requests()) == after.generate_until(requests())
        assert [m.result.context_compressions for m in after.measured] == [1, 1, 1]
        assert [m.result.context_compressions for m in reuse.measured] == [1, 0, 0]
        for a, r in zip(after.measured, reuse.measured, strict=True):
            assert r.result.tokens == a.result.tokens and r.result.cache.active_tokens == a.result.cache.active_tokens


def test_a_task_without_a_marked_question_is_refused_in_the_query_modes(engine):
    with pytest.raises(ValueError, match="query=after needs the question marked .* use query=in-prompt"):
        adapter(engine, "full", None, "after").generate_until(requests(field="other"))
    with pytest.raises(ValueError, match="does not occur in its prompt"):
        bad = requests()
        bad[0].doc["question"] = "\n\nNot in the prompt?"
        adapter(engine, "full", None, "reuse").generate_until(bad)
    with pytest.raises(ValueError, match="query='later' is not a query mode; allowed: in-prompt, after, reuse"):
        adapter(engine, "full", None, "later")


@pytest.mark.model
def test_needle_questions_are_marked_for_lm_eval_and_stock_prompts_are_unchanged():
    """kvbench_needle marks its question with a doc field stock `hf` never reads: the prompt text is the one
    in-prompt runs score, and the question is its tail."""
    import lm_eval

    import kvbench_lm_eval_hook  # noqa: F401
    from kvbench.tasks.lm_eval.utils import needle
    from kvbench.tasks.needle import ANSWER_PREFIX, QUESTION

    docs = needle(context_lengths=[512], depths=[0.5], varied_context_lengths=[])["test"]
    prompt = docs[0]["prompt"]
    assert docs[0]["question"] == QUESTION and prompt.count(QUESTION) == 1 and prompt.endswith(ANSWER_PREFIX)
    args = "pretrained=smollm2-135m,method=snapkv,budget=64"
    meta = {"context_lengths": [1024], "depths": [0.1, 0.5, 0.9], "varied_context_lengths": []}
    got = {}
    for q in ("in-prompt", "after"):
        out = lm_eval.simple_evaluate(model="kvbench-hf", model_args=f"{args},query={q}", tasks=["kvbench_needle"],
                                      device="cpu", metadata=meta)
        got[q] = out["results"]["kvbench_needle"]["exact_match,first-number"]
    # SnapKV at 64 tokens keeps the key when it can see the question, and cannot pick it out before
    assert got["in-prompt"] > got["after"]


@pytest.mark.model
@pytest.mark.parametrize("query", ["after", "reuse"])
def test_every_task_in_every_query_mode_is_computed_as_labelled_or_refused_before_work(tmp_path, monkeypatch, query):
    """A mode a task declares (`query_modes`) is one its docs can run in: each doc's question occurs in its prompt,
    ending it but for the answer prefix. Any other mode is refused by `kvbench compare` before the model loads,
    never run in-prompt under the mode's label (a rolling-loglikelihood task once was)."""
    from kvbench.cli import main
    from kvbench.evaluation.lmeval_tasks import task_names
    from kvbench.lmeval.tasks import _yaml, query_modes
    from kvbench.runtime import models
    from kvbench.tasks.lm_eval import utils

    load = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    checked = set()
    for task in task_names():
        if query in query_modes(task):
            config = _yaml(task)
            if "group" in config:
                continue  # its members are checked one by one
            meta = {**_yaml(config.get("include", "")).get("dataset_kwargs", {}), **config.get("dataset_kwargs", {})}
            data = utils.needle(context_lengths=[300], depths=[0.5], varied_context_lengths=[]) if "needle" in task \
                else utils.ruler(meta["ruler_task"], context_lengths=[600], samples=1)
            for doc in data["test"]:
                assert doc["question"] and doc["question"] in doc["prompt"], task
            checked.add(task)
        else:
            out = tmp_path / task
            assert main(["compare", "--methods", "full", "--tasks", task, "--query", query, "--out", str(out),
                         "--no-progress"]) == 2
            assert not out.exists()
    monkeypatch.setattr(models, "load", load)
    assert {"needle-1k", "kvbench_ruler_niah_single_1"} <= checked
    assert "kvbench_ppl" not in checked and "kvbench_multiturn" not in checked


def test_a_rolling_loglikelihood_task_is_refused_in_the_query_modes(engine):
    """Through lm-eval directly (no compare in front): the whole text is scored, so there is no question to move."""
    from kvbench.lmeval.adapter import ModelArgsError

    rolling = [Instance("loglikelihood_rolling", {}, ("Some text to score.",), 0, ("kvbench_ppl", 0, 1))]
    for query in ("after", "reuse"):
        with pytest.raises(ModelArgsError, match=f"query={query}: kvbench_ppl scores whole texts"):
            adapter(engine, "streamingllm", 24, query).loglikelihood_rolling(rolling)
    assert len(adapter(engine, "streamingllm", 24, "in-prompt").loglikelihood_rolling(rolling)) == 1
