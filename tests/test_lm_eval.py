"""lm-evaluation-harness integration: stock lm-eval finds kvbench's models and tasks, the adapter is
faithful with the full cache, and compression reaches both the generate and the loglikelihood path."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_valid_results

pytestmark = pytest.mark.model


def evaluate(model: str, model_args: str, task: str, limit: int | None, metadata: dict | None = None,
             batch_size: int = 1) -> dict:
    import lm_eval

    import kvbench_lm_eval_hook  # noqa: F401  (what kvbench-lm-eval.pth does at interpreter start)

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=limit,
                                   batch_size=batch_size, device="cpu", log_samples=True, metadata=metadata)


def test_stock_lm_eval_resolves_kvbench_model_names_in_a_fresh_interpreter():
    code = ("from lm_eval.api.registry import get_model; import sys; "
            "print(get_model('asrkf-hf').__name__, get_model('kvbench-hf').__name__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[:2] == ["ASRKFLM", "KVBenchLM"]


def test_interpreter_start_stays_cheap():
    code = "import sys; print(sorted(m for m in ('torch', 'lm_eval', 'kvbench') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def responses(result: dict, task: str) -> list[str]:
    return [s["filtered_resps"][0] for s in result["samples"][task]]


def test_full_cache_adapter_matches_stock_hf_on_the_needle_task():
    from kvbench.runtime import models

    ours = evaluate("kvbench-hf", "pretrained=smollm2-135m,method=full", "kvbench_needle", 3)
    stock = evaluate("hf", f"pretrained={models.local_dir()},dtype=float32", "kvbench_needle", 3)
    assert responses(ours, "kvbench_needle") == responses(stock, "kvbench_needle")
    score = ours["results"]["kvbench_needle"]["exact_match,first-number"]
    assert score == stock["results"]["kvbench_needle"]["exact_match,first-number"] == 1.0


def test_full_cache_adapter_matches_stock_hf_on_perplexity():
    from kvbench.runtime import models

    ours = evaluate("kvbench-hf", "pretrained=smollm2-135m,method=full", "kvbench_ppl", 2)
    stock = evaluate("hf", f"pretrained={models.local_dir()},dtype=float32", "kvbench_ppl", 2)
    a = ours["results"]["kvbench_ppl"]["word_perplexity,none"]
    b = stock["results"]["kvbench_ppl"]["word_perplexity,none"]
    assert abs(a - b) / b < 1e-3


def test_compression_reaches_generate_and_loglikelihood_scoring():
    full_needle = evaluate("kvbench-hf", "pretrained=smollm2-135m,method=full", "kvbench_needle", 2)
    tight = evaluate("kvbench-hf", "pretrained=smollm2-135m,method=streamingllm,budget=32", "kvbench_needle", 2)
    assert responses(tight, "kvbench_needle") != responses(full_needle, "kvbench_needle")
    full_ppl = evaluate("kvbench-hf", "pretrained=smollm2-135m,method=full", "kvbench_ppl", 1)
    asrkf_ppl = evaluate("asrkf-hf", "pretrained=smollm2-135m,tau=2.0", "kvbench_ppl", 1)
    stream_ppl = evaluate("kvbench-hf", "pretrained=smollm2-135m,method=streamingllm,budget=64", "kvbench_ppl", 1)
    base = full_ppl["results"]["kvbench_ppl"]["word_perplexity,none"]
    for other in (asrkf_ppl, stream_ppl):
        assert other["results"]["kvbench_ppl"]["word_perplexity,none"] != pytest.approx(base, rel=1e-4)


def test_batched_generation_gives_the_answers_of_batch_size_one():
    args = "pretrained=smollm2-135m,method=streamingllm,budget=96"
    one = evaluate("kvbench-hf", args, "kvbench_needle", 3)
    three = evaluate("kvbench-hf", args, "kvbench_needle", 3, batch_size=3)
    assert [s["resps"] for s in three["samples"]["kvbench_needle"]] == [
        s["resps"] for s in one["samples"]["kvbench_needle"]]


@pytest.mark.parametrize("args,message", [
    ("method=nope", "unknown method 'nope'; known methods:"),
    ("method=h2o", "method 'h2o' needs a budget: .* budget= in lm-eval's --model_args"),
    ("method=asrkf,budget=256", "method 'asrkf' takes no budget"),
    ("method=h2o,budget=64,heavy=0.3", "has no parameter heavy"),
    ("method=full,batch_size=0", "use a whole number >= 1"),
    ("method=full,positions=sideways", "allowed: original, rerotate, naive"),
    ("method=full,prefill_chunk=abc", "prefill_chunk='abc': use a whole number of tokens >= 1"),
    ("method=h2o,budget=64,heavy_ratio=5", r"heavy_ratio=5.0 is out of range: it must be in \[0, 1\]"),
])
def test_bad_model_args_are_refused_with_what_is_allowed(args, message):
    from kvbench.lmeval.adapter import KVBenchLM

    with pytest.raises(ValueError, match=message):
        KVBenchLM.create_from_arg_string(f"pretrained=smollm2-135m,{args}")


@pytest.mark.parametrize("launcher,model,args,message", [
    ("command", "kvbench-hf", "method=streamingllm,budget=64,sinks=2.5", "parameter sinks=2.5 is not a valid int"),
    ("command", "kvbench-hf", "pretrained=/no/such/model", "/no/such/model"),
    ("command", "asrkf-hf", "method=h2o", "asrkf-hf always runs ASR-KF-EGR"),
    ("module", "kvbench-hf", "method=asrkf,budget=256", "method 'asrkf' takes no budget"),
    ("command", "kvbench-hf", "method=full --metadata {\"context_lengths\":[8192]}",
     "kvbench_needle: context length 8192 does not fit smollm2-135m's window of 8192 positions"),
    ("command", "kvbench-hf", "method=full --apply_chat_template", "run them without --apply_chat_template"),
    ("command", "kvbench-hf", "method=streamingllm,budget=64,query=after --tasks kvbench_ppl",
     "query=after: kvbench_ppl scores whole texts (loglikelihood_rolling)"),
])
def test_stock_lm_eval_cli_refuses_bad_model_args_in_one_line_with_exit_2(launcher, model, args, message):
    """lm-eval's own process (the `lm_eval` command or `python -m lm_eval`) ends a kvbench refusal (model args, or a
    task setting the model cannot take) as `kvbench` does: no traceback."""
    command = [str(Path(sys.executable).parent / "lm_eval")] if launcher == "command" else [sys.executable, "-m",
                                                                                              "lm_eval"]
    args, *more = args.split(" ")
    tasks = [] if "--tasks" in more else ["--tasks", "kvbench_needle"]
    done = subprocess.run([*command, "--model", model, "--model_args", args, *more, *tasks, "--device", "cpu",
                           "--limit", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("lm_eval: kvbench: error: ") and message in last


def test_asrkf_hf_refuses_another_method():
    from kvbench.lmeval.adapter import ASRKFLM

    with pytest.raises(ValueError, match="asrkf-hf always runs ASR-KF-EGR"):
        ASRKFLM.create_from_arg_string("pretrained=smollm2-135m,method=h2o")


def test_task_generators_are_deterministic_for_a_seed():
    from kvbench.tasks.lm_eval import utils

    a = utils.needle(seed=1, context_lengths=[1024], depths=[0.5])["test"].to_list()
    b = utils.needle(seed=1, context_lengths=[1024], depths=[0.5])["test"].to_list()
    c = utils.needle(seed=2, context_lengths=[1024], depths=[0.5])["test"].to_list()
    assert a == b and [r["answer"] for r in a] != [r["answer"] for r in c]
    assert {r["filler"] for r in a} == {"simple", "varied"}
    assert utils.ppl()["test"].to_list() == utils.ppl()["test"].to_list()
    r1 = utils.rope(seed=3, distances=[64, 512], repeats=2)["test"].to_list()
    assert r1 == utils.rope(seed=3, distances=[64, 512], repeats=2)["test"].to_list()
    assert [r["distance"] for r in r1] == [64, 64, 512, 512]
    assert r1 != utils.rope(seed=4, distances=[64, 512], repeats=2)["test"].to_list()


def test_multiturn_and_window_generators_are_deterministic_for_a_seed():
    from kvbench.tasks.lm_eval import utils

    a = utils.multiturn(conversations=1, turns=3, seed=5)["test"].to_list()
    assert a == utils.multiturn(conversations=1, turns=3, seed=5)["test"].to_list()
    assert a != utils.multiturn(conversations=1, turns=3, seed=6)["test"].to_list()
    codes = a[0]["codes"].split("|")
    turns = a[0]["conversation"].split(utils.TURN_SEPARATOR)
    assert len(codes) == len(turns) == 3 and all(f"is {c}." in t for c, t in zip(codes, turns, strict=True))
    w = utils.window_probe(window_end=300, context_tokens=200, continuation_tokens=50, documents=2)["test"].to_list()
    assert w == utils.window_probe(window_end=300, context_tokens=200, continuation_tokens=50, documents=2)[
        "test"].to_list()
    inside = utils.window_probe(window_end=300, context_tokens=100, continuation_tokens=50, documents=2)["test"]
    assert [r["continuation"] for r in w] == inside["continuation"]  # same text scored, only positions differ
    assert all(r["context"].endswith(i) for r, i in zip(w, inside["context"], strict=True))


def test_multiturn_task_keeps_one_cache_across_turns():
    """Each turn's reply comes from the kvbench engine's conversation on one cache; the full cache recalls
    every code, a 48-token window recalls none (it cannot hold a whole passage)."""
    meta = {"conversations": 1, "turns": 3}
    full = evaluate("kvbench-hf", "pretrained=smollm2-135m,method=full", "kvbench_multiturn", None, meta)
    assert full["results"]["kvbench_multiturn"]["turn_acc,none"] == 1.0
    replies = full["samples"]["kvbench_multiturn"][0]["resps"][0][0].split("|")
    assert len(replies) == 3
    tight = evaluate("kvbench-hf", "pretrained=smollm2-135m,method=streamingllm,budget=48", "kvbench_multiturn",
                     None, meta)
    assert tight["results"]["kvbench_multiturn"]["turn_acc,none"] < 1.0


def test_compare_scores_lm_eval_tasks_as_lm_eval_does(tmp_path):
    """`kvbench compare --tasks kvbench_needle` reports what `lm_eval --model kvbench-hf` reports, and leaves the
    process's lm-eval logging as it found it."""
    import logging

    from kvbench.cli import main

    out = tmp_path / "run"
    logging.getLogger("lm_eval").setLevel(logging.INFO)
    assert main(["compare", "--methods", "full,streamingllm", "--budget", "64", "--tasks", "kvbench_needle",
                 "--limit", "3", "--out", str(out), "--no-progress"]) == 0
    assert logging.getLogger("lm_eval").level == logging.INFO
    results = json.loads((out / "results.json").read_text())
    assert_valid_results(results)
    records = {r["method"]: r for r in results["records"]}
    for method, args in (("full", "method=full"), ("streamingllm", "method=streamingllm,budget=64")):
        ours = records[method]
        theirs = evaluate("kvbench-hf", f"pretrained=smollm2-135m,{args}", "kvbench_needle", 3)
        assert ours["metrics"]["accuracy"]["kvbench_needle"] == theirs["results"]["kvbench_needle"][
            "exact_match,first-number"]
        assert [s["prediction"] for s in ours["samples"]] == responses(theirs, "kvbench_needle")
        assert len(ours["samples"]) == 3 and all(s["prefill_ms"] > 0 for s in ours["samples"])
    assert records["streamingllm"]["metrics"]["kv_compression"] > 0.9


def test_rope_probe_puts_the_key_at_the_requested_distance():
    from kvbench.runtime import models
    from kvbench.tasks.rope import probes

    tok = models.load_tokenizer()
    for p in probes(tok, (64, 512, 2048), 1, 0):
        after_key = p["user"].split(p["answer"] + " is the pass key.")[1]
        assert abs(len(tok(after_key)["input_ids"]) - p["distance"]) < 40


def test_tasks_speak_the_evaluated_models_dialect():
    """lm-eval merges --model_args into task metadata: prompts take the evaluated model's chat template (none for
    base Gemma: plain text) and its tokenizer counts the context lengths."""
    from kvbench.runtime import models
    from kvbench.tasks.lm_eval.utils import needle

    meta = {"context_lengths": [1024], "depths": [0.5], "varied_context_lengths": []}
    smol = needle(pretrained="smollm2-135m", **meta)["test"][0]["prompt"]
    gemma = needle(pretrained="gemma3-270m", **meta)["test"][0]["prompt"]
    assert smol.startswith("<|im_start|>") and "<|im_start|>" not in gemma
    # sized in Gemma's tokens (the filler estimate, one paragraph's tokens, runs ~5% short for both models)
    assert 0.92 < len(models.load_tokenizer("gemma3-270m")(gemma)["input_ids"]) / 1024 <= 1.0


def test_apply_chat_template_uses_the_models_template_and_is_refused_for_kvbench_tasks():
    from kvbench.lmeval.adapter import KVBenchLM
    from kvbench.runtime.engine import Engine
    from kvbench.runtime.runspec import RunSpec

    ours = KVBenchLM.from_engine(Engine(*_smollm2()), RunSpec.build("full"), progress=False)
    rendered = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered.startswith("<|im_start|>") and rendered.rstrip().endswith("<|im_start|>assistant")
    with pytest.raises(ValueError, match="kvbench_needle: .* run them without --apply_chat_template"):
        import lm_eval

        lm_eval.simple_evaluate(model=ours, tasks=["kvbench_needle"], limit=1, apply_chat_template=True,
                                metadata={"context_lengths": [256], "varied_context_lengths": []})


def _smollm2():
    from kvbench.runtime import models

    return models.load(models.DEFAULT_MODEL)


def test_the_short_task_names_are_lm_eval_tasks_defined_by_their_yaml():
    """One task system: `needle-1k`, `multiturn`, `longgen` ... are YAMLs like every other task (what they change
    of the task they include is their metadata), so compare and stock lm-eval run the same definition."""
    from kvbench.evaluation.lmeval_tasks import task_names
    from kvbench.lmeval.tasks import metadata_defaults
    from kvbench.tasks.lm_eval import utils

    assert {"needle", "needle-1k", "needle-2k", "multiturn", "longgen"} <= set(task_names())
    needle = metadata_defaults("kvbench_needle")
    assert metadata_defaults("needle-1k") == {**needle, "context_lengths": [1024], "varied_context_lengths": []}
    assert metadata_defaults("multiturn") == metadata_defaults("kvbench_multiturn")
    from kvbench.tasks.longgen import PROMPTS

    docs = utils.longgen()["test"]  # each prompt in the bundled model's chat format
    assert [d["prompt"] for d in docs] == [utils._chat(utils._tokenizer({}), p) for p in PROMPTS]
    assert all(f"<|im_start|>user\n{p}<|im_end|>" in d["prompt"] for p, d in zip(PROMPTS, docs, strict=True))
    assert utils.longgen_results({}, ["a b c d a b c d"]) == {"distinct_4grams": 4 / 5}  # abcd twice in 5 4-grams


def test_the_hook_never_breaks_lm_eval_and_leaves_nothing_behind_when_kvbench_is_gone(tmp_path):
    """A broken kvbench costs lm-eval users kvbench's tasks (with a warning), not their lm-eval; the .pth line is
    silent where the hook module cannot be found (kvbench uninstalled); an install lists the .pth in its RECORD."""
    import kvbench_lm_eval_hook as hook

    broken = ("import sys, warnings; sys.modules['kvbench.lmeval.tasks'] = None; import kvbench_lm_eval_hook; "
              "warnings.simplefilter('always')\nwith warnings.catch_warnings(record=True) as seen:\n"
              "    import lm_eval.tasks\nprint(hasattr(lm_eval.tasks, 'TaskManager'), [str(w.message) for w in seen])")
    out = subprocess.run([sys.executable, "-c", broken], capture_output=True, text=True, check=True).stdout
    assert out.startswith("True ") and "kvbench's lm-eval hook failed (ModuleNotFoundError" in out
    (tmp_path / hook.PTH).write_text(hook.PTH_LINE)
    gone = subprocess.run([sys.executable, "-I", "-S", "-c", f"import site; site.addsitedir({str(tmp_path)!r}); "
                           "import sys; print('kvbench_lm_eval_hook' in sys.modules)"], capture_output=True, text=True)
    assert gone.returncode == 0 and gone.stdout.strip() == "False" and gone.stderr == ""
    site = Path(hook.install_pth()).parent
    records = [r.read_text().splitlines() for r in site.glob("kvbench-*.dist-info/RECORD")]
    assert records and all(f"{hook.PTH},," in lines for lines in records)


def _lm_eval_run(launcher: list[str], out: Path) -> tuple[dict, dict[str, list], str]:
    """`lm_eval` under `launcher`: (results of rank 0, each task's samples in document order, stderr)."""
    meta = {"words": 300, "documents": 4}  # short prose documents: kvbench_ppl's loglikelihood_rolling path
    done = subprocess.run([*launcher, "-m", "lm_eval", "--model", "kvbench-hf", "--model_args",
                           "pretrained=smollm2-135m,method=snapkv,budget=128", "--tasks", "kvbench_needle,kvbench_ppl",
                           "--limit", "4", "--device", "cpu", "--metadata", json.dumps(meta), "--log_samples",
                           "--output_path", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for task in ("kvbench_needle", "kvbench_ppl"):
        lines = next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
        samples[task] = sorted([s["doc_id"], s["filtered_resps"]] for s in map(json.loads, lines))
    return results, samples, done.stderr


def test_torchrun_ranks_share_the_documents_and_report_the_single_process_scores(tmp_path):
    """`torchrun --nproc_per_node 2 -m lm_eval --model kvbench-hf` on CPU (two gloo ranks): each rank runs half of
    each task's requests, and rank 0 reports the scores and per-document answers of one process."""
    one, one_samples, _ = _lm_eval_run([sys.executable], tmp_path / "one")
    two, two_samples, log = _lm_eval_run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node", "2"], tmp_path / "two")
    assert two_samples == one_samples and len(one_samples["kvbench_needle"]) == 4
    assert 0 < one["kvbench_needle"]["exact_match,first-number"] < 1  # answers that differ from document to document
    for task in ("kvbench_needle", "kvbench_ppl"):  # the same per-document values, pooled in another order
        assert two[task].keys() == one[task].keys()
        numbers = {k: v for k, v in one[task].items() if isinstance(v, float)}
        assert numbers and {k: two[task][k] for k in numbers} == pytest.approx(numbers, rel=1e-12)
    ran = re.findall(r"rank (\d) of 2 ran (\d+) (\w+) requests", log)
    assert sorted(ran) == [("0", "2", "generate_until"), ("0", "2", "loglikelihood_rolling"),
                           ("1", "2", "generate_until"), ("1", "2", "loglikelihood_rolling")]
