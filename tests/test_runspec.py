"""One way to build a run: `kvbench compare`, a sweep file, `kvbench bench` and lm-eval's model args refuse a bad
run setting by the same rule, with the same message, before any model is loaded."""

from __future__ import annotations

import pytest

from kvbench.evaluation import bench, sweep
from kvbench.evaluation.compare import CompareSpec, plan
from kvbench.lmeval.adapter import KVBenchLM
from kvbench.policy import Budget
from kvbench.runtime.runspec import RunSpec

# (method, budget, positions, query) and the refusal every front end gives for it
BAD = [
    (("h2o", None, "original", "in-prompt"), "method 'h2o' needs a budget: tokens"),
    (("full", None, "sideways", "in-prompt"),
     "positions='sideways' is not a position mode; allowed: original, rerotate, naive"),
    (("full", None, "original", "later"), "query='later' is not a query mode; allowed: in-prompt, after, reuse"),
    (("pyramidkv", "64", "rerotate", "in-prompt"), "positions=rerotate needs the same token count in every layer"),
]


def via_compare(method: str, budget: str | None, positions: str, query: str) -> None:
    plan(CompareSpec(methods=[method], budgets=[Budget.parse(budget)] if budget else [], tasks=["needle-1k"],
                     positions=[positions], queries=[query]))


def via_sweep(method: str, budget: str | None, positions: str, query: str, tmp_path) -> None:
    path = tmp_path / "sweep.toml"
    budgets = f'budgets = ["{budget}"]\n' if budget else ""
    path.write_text(f'tasks = ["kvbench_needle"]\n[[rows]]\nmethods = ["{method}"]\n{budgets}'
                    f'positions = ["{positions}"]\nqueries = ["{query}"]\n')
    sweep.load(path)


def via_model_args(method: str, budget: str | None, positions: str, query: str) -> None:
    budget_arg = f",budget={budget}" if budget else ""
    KVBenchLM.create_from_arg_string(f"pretrained=/no/model/needed,method={method}{budget_arg},"
                                     f"positions={positions},query={query}")


@pytest.mark.parametrize("front", ["compare", "sweep", "model_args"])
@pytest.mark.parametrize("setting,message", BAD)
def test_every_front_end_refuses_a_bad_run_with_the_same_message(front, setting, message, tmp_path):
    run = {"compare": via_compare, "model_args": via_model_args,
           "sweep": lambda *a: via_sweep(*a, tmp_path)}[front]
    with pytest.raises(ValueError, match=message):  # the model path does not exist: the refusal comes first
        run(*setting)


def test_a_budget_for_a_method_that_takes_none_is_refused_where_it_was_given_to_that_method():
    """lm-eval's model args name one method: a budget there would be recorded but never applied. A command-line or
    sweep budget list applies to the methods that take a budget and leaves the others alone."""
    with pytest.raises(ValueError, match="method 'asrkf' takes no budget"):
        via_model_args("asrkf", "256", "original", "in-prompt")
    runs = plan(CompareSpec(methods=["asrkf", "h2o"], budgets=[Budget(tokens=256)], tasks=["needle-1k"]))
    assert [(r.method, r.policy.budget) for r in runs] == [("asrkf", None), ("h2o", Budget(tokens=256))]
    spec = bench.BenchSpec(["asrkf", "h2o"], [64], budget="128")
    assert [bench._run(m, {}, "none", spec).policy.budget for m in spec.methods] == [None, Budget(tokens=128)]


def test_a_method_that_never_evicts_runs_once_in_original_positions():
    assert RunSpec.build("full", positions="naive").positions == "original"
    runs = plan(CompareSpec(methods=["full", "streamingllm"], budgets=[Budget(tokens=64)], tasks=["needle-1k"],
                            positions=["rerotate", "naive"]))
    assert [(r.method, r.positions) for r in runs] == [("full", "original"), ("streamingllm", "rerotate"),
                                                         ("streamingllm", "naive")]
