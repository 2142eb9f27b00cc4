"""`kvbench compare` end to end: a small real run, and bad input refused cleanly with nothing written."""

import json

import pytest

from conftest import assert_valid_results
from kvbench.cli import build_parser, main
from kvbench.evaluation import leaderboard
from kvbench.policy import available


def run_cli(capsys, *args):
    code = main(["compare", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.model
def test_compare_writes_results_and_prints_table(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, "--methods", "full,streamingllm", "--budget", "64", "--tasks", "needle-1k",
                                   "--limit", "2", "--out", str(out))
    assert code == 0
    assert "it/s]" not in stderr  # --no-progress: no bar at all, lm-eval's over the documents included
    results = json.loads((out / "results.json").read_text())
    assert_valid_results(results)
    assert results["kind"] == "compare" and results["run"]["budgets"] == [{"tokens": 64}]
    records = results["records"]
    assert [(r["method"], r["budget"]) for r in records] == [("full", None), ("streamingllm", {"tokens": 64})]
    for r in records:
        m = r["metrics"]
        assert set(m) >= {"accuracy", "kv_compression", "active_kv_bytes", "peak_kv_bytes", "prefill_ms",
                          "decode_ms_p50", "decode_ms_p95", "tokens_per_s"}
        assert len(r["samples"]) == 2 and all("prediction" in s for s in r["samples"])
        assert r["versions"]["transformers"] and r["config"]["policy"]
    assert records[0]["metrics"]["kv_compression"] == 0.0
    assert records[0]["schedule"] is None and records[1]["schedule"] == "decode"  # StreamingLLM's own
    assert records[1]["metrics"]["kv_compression"] > 0.9  # 64 of ~1000 tokens kept
    assert records[1]["metrics"]["active_kv_bytes"] < records[0]["metrics"]["active_kv_bytes"] / 10
    # policy time: none for `full`; StreamingLLM evicts in every prefill chunk and decode step
    assert records[0]["metrics"]["policy_ms_per_decode_step"] == 0.0
    assert records[1]["metrics"]["policy_ms_per_decode_step"] > 0.0
    assert all(s["policy_ms"]["prefill"] > 0 and s["policy_ms"]["decode"] > 0 for s in records[1]["samples"])
    assert "| streamingllm" in stdout and "decode × full" in stdout
    headers, table = leaderboard.rows(records)
    policy = [float(row[headers.index("policy ms/step")]) for row in table]
    assert policy[0] == 0.0 and policy[1] > 0.0
    table = (out / "leaderboard.md").read_text()
    assert table.count("| full") == 3  # its row, its pairing ("reference") and what its bytes buy
    assert "### Paired with the full cache" in table and "### What the bytes buy" in table


@pytest.mark.parametrize("args,message", [
    (["--methods", "full,snapkvv"], "unknown method 'snapkvv'; known methods: " + ", ".join(available())),
    (["--methods", "h2o", "--budget", "0"], "budget must be a positive token count, got 0"),
    (["--methods", "h2o", "--budget", "-3"], "budget must be a positive token count, got -3"),
    (["--tasks", "mmlu"], "unknown task 'mmlu'; kvbench's tasks: kvbench_multiturn, kvbench_needle, "),
    (["--tasks", "kvbench_ppl", "--context-lengths", "512"], "--context-lengths: none of kvbench_ppl takes"),
    (["--tasks", "needle-1k", "--context-lengths", "0"], "context_lengths = [0] is not a non-empty list"),
    (["--positions", "sideways"], "is not a position mode; allowed: original, rerotate, naive"),
    (["--methods", "pyramidkv", "--positions", "rerotate"], "rerotate needs the same token count in every layer"),
    (["--model", "/nonexistent/model.gguf"], "model file not found: /nonexistent/model.gguf"),
    (["--model", "/nonexistent/dir"], "model '/nonexistent/dir' not found"),
    (["--method-args", "h2o:heavy=0.1"], "method 'h2o' has no parameter heavy; its parameters: "
                                         "decode_interval, heavy_ratio, schedule"),
    (["--schedule", "sometimes"], "--schedule 'sometimes' is not a schedule; allowed: prompt, chunk, decode"),
    (["--methods", "full,asrkf", "--schedule", "prompt"], "method 'asrkf' has no schedule 'prompt'; its schedules: "
                                                          "decode"),
    (["--method-args", "h2o"], "must look like METHOD:key=value"),
    (["--methods", "h2o", "--method-args", "h2o:heavy_ratio=0.3", "--method-args", "h2o:heavy_ratio=0.7"],
     "h2o's heavy_ratio is given twice (0.3 and 0.7); a method's parameters are merged into one set, so write "
     "variants as one value, heavy_ratio=0.3|0.7"),
    (["--methods", ""], "--methods names no method; known methods: " + ", ".join(available())),
    (["--tasks", ""], "--tasks names no task"),
    (["--device", "tpu9"], "--device 'tpu9' is not a torch device"),
    (["--device", "cuda:99"], "--device cuda:99: "),  # no CUDA here, or fewer than 100 devices
    (["--dtype", "float8"], "dtype 'float8' is not one of: auto, float32, bfloat16, float16"),
    (["--model", "kvbench-test/absent"], "is not in the local Hugging Face cache"),
    (["--model", "models/absent"], "model 'models/absent' not found: there is no file or folder "),
])
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *args, "--out", str(out))
    assert code == 2
    assert message in err
    assert not out.exists()


@pytest.mark.parametrize("arg,message", [
    ("h2o:heavy_ratio=5", "method 'h2o': heavy_ratio=5.0 is out of range: it must be in [0, 1]"),
    ("h2o:heavy_ratio=-1", "heavy_ratio=-1.0 is out of range"),
    ("h2o:heavy_ratio=inf", "heavy_ratio=inf is out of range"),
    ("h2o:heavy_ratio=nan", "heavy_ratio=nan is out of range"),
    ("streamingllm:sinks=-5", "method 'streamingllm': sinks=-5 is out of range: it must be >= 0"),
])
def test_a_parameter_out_of_range_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, arg, message):
    """Through each front end (the CLI, a sweep file, lm-eval's model args), before any model is loaded."""
    from kvbench.evaluation import sweep
    from kvbench.lmeval.adapter import KVBenchLM, ModelArgsError
    from kvbench.runtime import models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the parameter was checked")

    monkeypatch.setattr(models, "load", no_load)
    method, _, kv = arg.partition(":")
    code, _, err = run_cli(capsys, "--methods", method, "--method-args", arg, "--out", str(tmp_path / "run"))
    assert code == 2 and message in err and not (tmp_path / "run").exists()
    key, _, value = kv.partition("=")
    config = tmp_path / "sweep.toml"
    config.write_text(f'tasks = ["needle-1k"]\n[[rows]]\nmethods = ["{method}"]\nbudgets = [256]\n'
                      f'method_args = {{ {method} = {{ {key} = "{value}" }} }}\n')
    with pytest.raises(ValueError, match=message.split(": ", 1)[-1].replace("[", r"\[").replace("]", r"\]")):
        sweep.load(config)
    with pytest.raises(ModelArgsError, match=r" is out of range"):
        KVBenchLM(method=method, budget=256, **{key: float(value) if "." in value or value.isalpha() else int(value)})


def test_a_token_budget_written_as_a_decimal_gets_a_hint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--methods", "h2o", "--budget", "256.0", "--out", str(tmp_path / "run"))
    assert code == 2 and "a budget ratio must lie in (0, 1], got 256.0 (for 256 tokens write 256)" in err


@pytest.mark.model
@pytest.mark.parametrize("task,lengths", [("needle", "9000"), ("kvbench_needle", "1024,8192"),
                                          ("kvbench_ruler_niah_single_1,kvbench_ruler_fwe", "8100")])
def test_context_length_past_the_window_is_refused_before_any_cell_runs(tmp_path, capsys, task, lengths):
    """A length whose prompt and answer cannot fit the model's 8,192 positions is refused up front, with the longest
    that fits, whichever task takes it (a sweep would otherwise fail when it reaches the task, hours in)."""
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "--methods", "full", "--tasks", task, "--context-lengths", lengths,
                           "--out", str(out))
    assert code == 2
    past = lengths.split(",")[-1]
    assert f"context length {past} does not fit smollm2-135m's window of 8192 positions" in err
    assert "lengths up to 8064 fit" in err
    assert not out.exists()


@pytest.mark.model
def test_a_context_length_shorter_than_the_tasks_own_prompt_is_refused(tmp_path, capsys):
    """It was accepted and recorded as asked (10) although the prompt was the task's frame, 129 tokens."""
    code, _, err = run_cli(capsys, "--methods", "full", "--tasks", "needle-1k", "--context-lengths", "10",
                           "--out", str(tmp_path / "run"))
    assert code == 2 and "needle: context length 10 is shorter than its prompt with one unit of simple filler" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.model
def test_the_longest_length_that_fits_is_taken():
    """8,064 tokens leave the 128 positions the check asks for: the RULER-style data builds, and its prompts stay
    within the length (so every sample's prompt and answer fit the window)."""
    from kvbench.runtime.models import load_tokenizer
    from kvbench.tasks.lm_eval.utils import ruler

    docs = ruler("niah_single_1", context_lengths=[8064], samples=1)["test"]
    tokens = len(load_tokenizer("smollm2-135m")(docs[0]["prompt"])["input_ids"])
    assert 8064 - 200 < tokens <= 8064


def test_method_args_sweep_expands_into_rows():
    from kvbench.evaluation.compare import CompareSpec, expand_sweep, plan
    from kvbench.policy import Budget

    assert expand_sweep({"tau": "0.25|0.5", "k": "1"}) == [{"tau": "0.25", "k": "1"}, {"tau": "0.5", "k": "1"}]
    spec = CompareSpec(methods=["full", "asrkf", "h2o"], budgets=[Budget(tokens=64), Budget(tokens=128)],
                       tasks=["needle"], method_args={"asrkf": {"tau": "0.25|0.5|1"}})
    policies = [run.policy for run in plan(spec)]
    rows = [(p.name, str(p.budget) if p.budget else None, getattr(p, "tau", None)) for p in policies]
    assert rows == [("full", None, None), ("asrkf", None, 0.25), ("asrkf", None, 0.5), ("asrkf", None, 1.0),
                    ("h2o", "64", None), ("h2o", "128", None)]


@pytest.mark.model
def test_bench_reports_every_method_against_full_at_each_context(tmp_path, capsys):
    code = main(["bench", "--methods", "full,streamingllm", "--contexts", "200,300", "--new-tokens", "3",
                 "--budget", "64", "--method-args", "streamingllm:sinks=4|16", "--out", str(tmp_path),
                 "--repeats", "2", "--no-progress"])
    assert code == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    from kvbench.runtime.models import content_digest

    assert doc["run"]["model_sha256"] == content_digest("smollm2-135m")  # the weights the timings came from
    assert_valid_results(doc)  # a versioned file of kind "bench", budgets typed
    assert doc["kind"] == "bench" and doc["run"]["budget"] == {"tokens": 64}
    assert {json.dumps(r["budget"]) for r in doc["records"]} == {"null", '{"tokens": 64}'}
    rows = {(r["method"], r["variant"], r["context"]): r for r in doc["records"]}
    variants = [("full", ""), ("streamingllm", "sinks=4"), ("streamingllm", "sinks=16")]
    assert set(rows) == {(m, v, c) for m, v in variants for c in (200, 300)}
    assert all(rows[("full", "", c)][col] == 1.0 for c in (200, 300)
               for col in ("decode_vs_full", "late_decode_vs_full"))
    assert rows[("streamingllm", "sinks=16", 300)]["active_kv_bytes"] < rows[("full", "", 300)]["active_kv_bytes"] / 4
    # averaged over every step (the one prefill chunk evicts down to the budget before it ends): ~64 of ~300 tokens
    mean_comp = rows[("streamingllm", "sinks=16", 300)]["mean_kv_compression"]
    assert rows[("full", "", 300)]["mean_kv_compression"] == 0.0 and 1 - 80 / 300 < mean_comp < 1 - 60 / 303
    # `full` never runs a policy step; StreamingLLM decides and evicts one token per layer in every decode step
    assert rows[("full", "", 300)]["policy_ms_per_step"] == 0.0
    assert rows[("streamingllm", "sinks=16", 300)]["policy_ms_per_step"] > 0.0
    for row in rows.values():  # two rounds each, the reported ratio inside their spread
        lo, hi = row["decode_vs_full_range"]
        assert len(row["decode_ms_rounds"]) == row["rounds"] == 2 and lo <= row["decode_vs_full"] <= hi
    out = capsys.readouterr().out
    assert "| 300" in out and "streamingllm sinks=16" in out


def test_bench_figures_last_quarter_and_policy_time_per_step():
    from types import SimpleNamespace

    from kvbench.evaluation.bench import BenchSpec, _figures
    from kvbench.policy import Budget

    def run(policy_decode_s: float) -> SimpleNamespace:
        cache = SimpleNamespace(peak_active_bytes=8, active_bytes=4, full_bytes=16, seen_tokens=2, token_bytes=8,
                                mean_kv_compression=0.25, offload=SimpleNamespace(seconds=0.0),
                                restore=SimpleNamespace(seconds=0.0),
                                policy_seconds={"prefill": 1.0, "decode": policy_decode_s})
        return SimpleNamespace(decode_s=[0.001] * 12 + [0.003] * 4, prefill_s=0.5, cache=cache,  # slower at the end
                               policy_report={"recoveries": {"full": 2}})

    figures = _figures([run(0.008), run(0.024)], Budget(tokens=64), BenchSpec(methods=["full"], contexts=[100]))
    assert figures["budget"] == {"tokens": 64} and figures["peak_bound_tokens"] == 64 + 512  # + one prefill chunk
    assert figures["step_ms"] == pytest.approx(1.0) and figures["late_ms"] == pytest.approx(3.0)
    assert figures["mean_kv_compression"] == 0.25 and figures["policy"] == {"recoveries": {"full": 2}}
    # both sequences' policies run in each of the 16 batched steps; prefill's policy time is not a decode cost
    assert figures["policy_ms"] == pytest.approx(2.0)


def test_bench_refuses_bad_method_args_before_loading_the_model(tmp_path, capsys):
    for args, message in ((["--method-args", "h2o:sinks=4"], "h2o, which is not among --methods"),
                          (["--method-args", "streamingllm:sink=4"], "method 'streamingllm' has no parameter sink"),
                          (["--method-args", "streamingllm:sinks=4,sinks=8"], "streamingllm's sinks is given twice"),
                          (["--repeats", "0"], "repeats must be >= 1, got 0"),
                          (["--contexts", "-5"], "--contexts must be positive token counts (e.g. 1024,4096), got [-5]"),
                          (["--contexts", "1024,0"], "--contexts must be positive token counts"),
                          (["--new-tokens", "1"], "new tokens must be >= 2")):
        code = main(["bench", "--methods", "full,streamingllm", "--model", "/nonexistent/model.gguf",
                     "--out", str(tmp_path / "b"), *args])
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "b").exists()


NO_MODEL = ["--model", "/nonexistent/model.gguf"]  # whatever passes the output checks stops here, before any work


@pytest.mark.parametrize("command,names", [(["compare"], ("results.json", "leaderboard.md")),
                                           (["bench"], ("bench.md", "bench.json"))])
def test_output_folders_are_checked_before_any_work_and_nothing_is_touched(tmp_path, capsys, command, names):
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    assert main([*command, *NO_MODEL, "--out", str(a_file)]) == 2
    assert f"--out {a_file} is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "mine"

    blocked = tmp_path / "blocked"
    (blocked / names[1]).mkdir(parents=True)
    assert main([*command, *NO_MODEL, "--out", str(blocked)]) == 2
    assert f"{blocked / names[1]} is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in blocked.iterdir()) == [names[1]]

    done = tmp_path / "done"
    done.mkdir()
    (done / names[0]).write_text("finished results")
    assert main([*command, *NO_MODEL, "--out", str(done)]) == 2
    assert f"already holds {names[0]}; choose another folder or pass --overwrite" in capsys.readouterr().err
    assert (done / names[0]).read_text() == "finished results"
    assert main([*command, *NO_MODEL, "--out", str(done), "--overwrite"]) == 2  # past the check, stopped by the model
    assert "model file not found" in capsys.readouterr().err


def test_bench_writes_into_a_new_run_folder_unless_told_where():
    assert build_parser().parse_args(["bench"]).out is None  # never the committed reports/bench/ by default


def test_leaderboard_refuses_an_output_it_cannot_write_before_loading_the_model(tmp_path, capsys):
    out = tmp_path / "lb"
    (out / "LEADERBOARD.md").mkdir(parents=True)
    code = main(["leaderboard", "--out", str(out), "--plots", str(tmp_path / "plots"), "--cells", str(tmp_path / "c")])
    assert code == 2 and f"{out / 'LEADERBOARD.md'} is a folder" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "plots").exists()


def test_a_closed_output_pipe_ends_with_one_line_and_exit_2():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "kvbench", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written (`kvbench methods | head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait() == 2
    assert "the output pipe was closed" in err and "Traceback" not in err


def test_ctrl_c_ends_with_exit_130_and_says_what_was_kept(monkeypatch, capsys):
    import kvbench.cli

    def interrupted() -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(kvbench.cli, "_methods", interrupted)
    assert main(["methods"]) == 130
    assert capsys.readouterr().err.startswith("kvbench: interrupted; nothing was written")


def test_version_is_printed(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"kvbench {version('kvbench')}"


def test_every_flag_of_every_subcommand_has_help_and_its_default_shown():
    import argparse

    from kvbench.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"kvbench {name} {action.option_strings[0]} has no help text"
        text = sub.format_help()
        if any(a.option_strings and a.dest != "help" for a in sub._actions):  # `methods` and `diff` take none
            assert "(default:" in text, f"kvbench {name} --help shows no defaults"
    compare = subparsers.choices["compare"].parse_args([])
    assert compare.methods == ["full", "streamingllm", "h2o"] and compare.schedule == [] and compare.budget == ["256"]
