"""`kvbench leaderboard`: sweep files validated up front, interrupted sweeps resume with only the unfinished
cells, the check catches a moved deterministic column, plots are drawn, a partial run writes nothing."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_valid_results
from kvbench.evaluation import cells as cellstore
from kvbench.evaluation import check, leaderboard, sweep
from kvbench.evaluation.cells import CellStore, cell_key, read_cell, sample_fields
from kvbench.evaluation.compare import Cell, plan

REPO = Path(__file__).resolve().parent.parent

SMALL = """
tasks = ["needle-1k"]
limit = 1
[[rows]]
methods = ["full", "streamingllm", "h2o"]
budgets = [64]
[slices.quick]
methods = ["streamingllm"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ('tasks = ["needle-1k"]\nbogus = 1\n[[rows]]\nmethods = ["full"]', "unknown key bogus; allowed:"),
    ('tasks = ["needle-1k"]\n[[rows]]\nmethods = ["full"]\nbudget = [64]', "unknown key budget; allowed: budgets"),
    ('tasks = ["needle-1k"]\n[[rows]]\nmethods = ["h2oo"]\nbudgets = [64]', "unknown method 'h2oo'"),
    ('tasks = ["needle-1k"]\n[[rows]]\nmethods = ["h2o"]', "method 'h2o' needs a budget: .* a sweep row's budgets"),
    ('tasks = []\n[[rows]]\nmethods = ["full"]', "no tasks to run"),
    ('tasks = ["needle-1k"]\n[[rows]]\nmethods = ["full"]\npositions = ["sideways"]', "not a position mode"),
    ("tasks = [", "not valid TOML"),
    ('tasks = ["needle-1k"]\ndtype = "float8"\n[[rows]]\nmethods = ["full"]', "dtype 'float8' is not one of"),
    ('tasks = ["needle-1k"]\nlimit = "abc"\n[[rows]]\nmethods = ["full"]', "limit = 'abc' is not a whole number"),
    ('tasks = ["needle-1k"]\nlimit = 0\n[[rows]]\nmethods = ["full"]', "limit = 0 is not a whole number >= 1"),
    ('tasks = ["needle-1k"]\n[[rows]]\nmethods = ["h2o"]\nbudgets = [64]\nmethod_args = { h2o = "x" }',
     "method_args = {'h2o': 'x'} is not a table of tables"),
    ('tasks = ["needle-1k"]\nslices = 3\n[[rows]]\nmethods = ["full"]', "slices = 3 is not a table of"),
    ('tasks = ["needle-1k"]\n[slices.ci]\nmethods = "full"\n[[rows]]\nmethods = ["full"]',
     r"\[slices.ci\] methods must be a list"),
    ('tasks = ["kvbench_needle"]\ntask_metadata = 5\n[[rows]]\nmethods = ["full"]', "task_metadata = 5 is not a table"),
    ('tasks = ["kvbench_needle"]\n[task_metadata.kvbench_needle]\ncontext_length = [1024]\n'
     '[[rows]]\nmethods = ["full"]',
     "unknown setting context_length; kvbench_needle takes: context_lengths, depths, exact_lengths, seed, "
     "varied_context_lengths"),
    ('tasks = ["kvbench_needle"]\n[task_metadata.kvbench_needle]\ncontext_lengths = [0]\n[[rows]]\nmethods = ["full"]',
     r"context_lengths = \[0\] is not a non-empty list of whole numbers >= 1"),
    ('tasks = ["kvbench_needle"]\n[task_metadata.kvbench_needle]\ndepths = [-3]\n[[rows]]\nmethods = ["full"]',
     r"depths = \[-3\] is not a non-empty list of numbers in \[0, 1\]"),
    ('tasks = ["kvbench_ppl"]\n[task_metadata.kvbench_ppl]\ndocuments = "4"\n[[rows]]\nmethods = ["full"]',
     "documents = '4' is not a whole number >= 1"),
    ('tasks = ["kvbench_ppl"]\n[task_metadata.kvbench_needle]\ndepths = [0.5]\n[[rows]]\nmethods = ["full"]',
     "'kvbench_needle' is not among the sweep's tasks"),
    ('tasks = ["mmlu"]\n[task_metadata.mmlu]\ndepths = [0.5]\n[[rows]]\nmethods = ["full"]',
     "is not one of kvbench's lm-eval tasks"),
    ('tasks = ["needle-1k"]\n[task_metadata.needle-1k]\ndepth = [0.5]\n[[rows]]\nmethods = ["full"]',
     "unknown setting depth; needle-1k takes: context_lengths, depths, exact_lengths, seed, varied_context_lengths"),
    ('model = "a"\nmodels = ["b"]\ntasks = ["needle-1k"]\n[[rows]]\nmethods = ["full"]', "model \\(one\\) or models"),
    ('models = []\ntasks = ["needle-1k"]\n[[rows]]\nmethods = ["full"]', "models = \\[\\] is not a non-empty list"),
    ('models = ["a", "a"]\ntasks = ["needle-1k"]\n[[rows]]\nmethods = ["full"]', "models lists a more than once"),
    ('models = [{ name = "a", dtyp = "bfloat16" }]\ntasks = ["needle-1k"]\n[[rows]]\nmethods = ["full"]',
     "unknown key dtyp; allowed: dtype, name"),
    ('models = [{ name = "a", dtype = "fp7" }]\ntasks = ["needle-1k"]\n[[rows]]\nmethods = ["full"]',
     "dtype 'fp7' is not one of"),
    ('models = ["a"]\ntasks = ["needle-1k"]\n[slices.one]\nmodels = ["b"]\n[[rows]]\nmethods = ["full"]',
     "names models not in the sweep: b"),
    ('models = ["a"]\ntasks = ["needle-1k"]\n[[rows]]\nmethods = ["full"]\nmodels = ["b"]',
     "#1 models: b not among the sweep's models; allowed: a"),
    ('tasks = ["needle-1k"]\nshards = { kvbench_ppl = 2 }\n[[rows]]\nmethods = ["full"]',
     "shards names 'kvbench_ppl', which is not among the sweep's tasks \\(needle-1k\\)"),
    ('tasks = ["needle-1k"]\nshards = { "needle-1k" = 0 }\n[[rows]]\nmethods = ["full"]',
     "shards.needle-1k = 0 is not a whole number of shards >= 1"),
    ('tasks = ["needle-1k"]\nshards = 4\n[[rows]]\nmethods = ["full"]', "shards = 4 is not a table of task"),
    ('tasks = ["needle-1k"]\n[[rows]]\nmethods = ["full"]\nkv_quant = ["int5"]',
     "kv_quant='int5' is not a KV quantization scheme; allowed: none, int8, int4, int2"),
    ('tasks = ["needle-1k"]\n[[rows]]\nmethods = ["full"]\nkv_quant = ["kivi4r16"]',
     "the window must hold at least 32"),
])
def test_bad_sweep_files_are_refused_before_anything_runs(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        sweep.load(write(tmp_path, text))


def test_a_row_runs_on_the_models_it_names(tmp_path):
    """A row without `models` runs on every model of the sweep, one with it on those alone; a slice of the other
    model leaves no row, which is refused."""
    text = ('models = ["a", "b"]\ntasks = ["needle-1k"]\n[[rows]]\nmethods = ["full"]\n'
            '[[rows]]\nmodels = ["b"]\nmethods = ["h2o"]\nbudgets = [64]\n'
            '[slices.a]\nmodels = ["a"]\nmethods = ["h2o"]\n')
    path = write(tmp_path, text)
    assert [(r.model, r.methods) for r in sweep.load(path).rows] == [("a", ["full"]), ("b", ["full"]), ("b", ["h2o"])]
    with pytest.raises(ValueError, match="no rows"):
        sweep.load(path, "a")


def test_slices_select_methods_and_refuse_unknown_names(tmp_path):
    path = write(tmp_path, SMALL)
    assert sweep.load(path, dtype="bfloat16").rows[0].dtype == "bfloat16"
    assert [r.methods for r in sweep.load(path, "quick").rows] == [["streamingllm"]]
    with pytest.raises(ValueError, match="has no slice 'ci'; slices: quick"):
        sweep.load(path, "ci")


def test_a_slice_keeps_only_its_budgets_and_never_drops_a_row_without_one(tmp_path):
    text = ('tasks = ["needle-1k"]\n[[rows]]\nmethods = ["full", "h2o"]\nbudgets = [64, 128]\n'
            '[[rows]]\nmethods = ["h2o"]\nbudgets = [128]\n[slices.small]\nbudgets = [64]\n')
    rows = sweep.load(write(tmp_path, text), "small").rows
    assert [(r.methods, [b.tokens for b in r.budgets]) for r in rows] == [(["full", "h2o"], [64])]
    assert [len(plan(r)) for r in rows] == [2]  # full once, h2o at 64 only
    with pytest.raises(ValueError, match=r"\[slices.small\] budgets: budget must be a positive token count, got 0"):
        sweep.load(write(tmp_path, text.replace("budgets = [64]\n", "budgets = [0]\n")), "small")


def test_a_slice_keeps_only_its_kv_storages_and_refuses_one_no_row_names(tmp_path):
    """CI's slice leaves out the quantized rows (not reproducible across CPUs): a row keeps the storages the slice
    names, a row left with none is dropped, and a storage no row names is an error, not an empty slice."""
    text = ('tasks = ["needle-1k"]\n[[rows]]\nmethods = ["full"]\nkv_quant = ["none", "int4"]\n'
            '[[rows]]\nmethods = ["h2o"]\nbudgets = [64]\nkv_quant = ["int8"]\n'
            '[[rows]]\nmethods = ["streamingllm"]\nbudgets = [64]\n[slices.plain]\nkv_quant = ["none"]\n')
    rows = sweep.load(write(tmp_path, text), "plain").rows
    assert [(r.methods, r.kv_quants) for r in rows] == [(["full"], ["none"]), (["streamingllm"], ["none"])]
    assert [(r.methods, r.kv_quants) for r in sweep.load(write(tmp_path, text)).rows] == [
        (["full"], ["none", "int4"]), (["h2o"], ["int8"]), (["streamingllm"], ["none"])]
    with pytest.raises(ValueError, match=r"\[slices.plain\] kv_quant: int2 not in any row; the rows name int4, int8, "
                                         "none"):
        sweep.load(write(tmp_path, text.replace('kv_quant = ["none"]\n', 'kv_quant = ["int2"]\n')), "plain")


def test_a_row_runs_only_its_own_tasks_which_must_be_the_sweeps(tmp_path):
    text = ('tasks = ["needle-1k", "kvbench_needle"]\n[[rows]]\nmethods = ["full"]\n'
            '[[rows]]\nmethods = ["h2o"]\nbudgets = [64]\ntasks = ["kvbench_needle"]\nqueries = ["after"]\n'
            '[slices.builtin]\ntasks = ["needle-1k"]\n')
    path = write(tmp_path, text)
    assert [r.tasks for r in sweep.load(path).rows] == [["needle-1k", "kvbench_needle"], ["kvbench_needle"]]
    assert [r.methods for r in sweep.load(path, "builtin").rows] == [["full"]]  # the h2o row has no task left
    with pytest.raises(ValueError, match=r"tasks: needle-2k not in the sweep's tasks; allowed: needle-1k, kvbench_n"):
        sweep.load(write(tmp_path, text.replace('tasks = ["kvbench_needle"]', 'tasks = ["needle-2k"]')))


def test_check_names_the_file_and_the_flag_of_a_corrupt_results_file(tmp_path):
    broken = tmp_path / "results.json"
    broken.write_text('{"schema_version": 1, "records": [')
    with pytest.raises(ValueError, match=f"--check {broken}: not a readable results.json"):
        check.committed(broken)


def test_the_committed_sweep_and_its_ci_slice_are_valid():
    root = Path(__file__).parent.parent
    full = sweep.load(root / "leaderboard" / "sweep.toml")
    ci = sweep.load(root / "leaderboard" / "sweep.toml", "ci")
    assert set(ci.spec.tasks) < set(full.spec.tasks)
    assert {m for r in ci.rows for m in r.methods} < {m for r in full.rows for m in r.methods}
    assert {q for r in ci.rows for q in r.kv_quants} == {"none"}  # a quantized row differs across CPUs


def test_check_reports_every_moved_deterministic_column_beyond_cross_host_rounding():
    sample = {"task": "t", "kv_compression": 0.5, "active_kv_bytes": 100, "peak_kv_bytes": 200, "frozen_kv_bytes": 0}
    record = {"method": "h2o", "variant": "", "budget": {"tokens": 64}, "positions": "original", "query": "in-prompt",
              "config": {"model": "m"}, "metrics": {"accuracy": {"t": 0.5}}, "samples": [sample]}

    def problems(now: dict, then: dict) -> list[str]:
        found = check.compare_deterministic([now], check.Reference([then]))
        assert found.allowed == []
        return found.problems

    assert problems(record, record) == []
    moved = json.loads(json.dumps(record))
    moved["samples"][0]["peak_kv_bytes"] = 208
    moved["metrics"]["accuracy"]["t"] = 0.75
    found = problems(moved, record)
    assert len(found) == 2 and any("peak_kv_bytes" in p for p in found) and any("score" in p for p in found)
    big = json.loads(json.dumps(record))
    big["samples"][0]["active_kv_bytes"] = 31645696
    flipped = json.loads(json.dumps(big))
    flipped["samples"][0]["active_kv_bytes"] = 31645440  # one token-layer flipped on another CPU: tolerated
    assert problems(flipped, big) == []
    flipped["samples"][0]["active_kv_bytes"] = 31645696 * 0.999  # 0.1%: a real change
    assert len(problems(flipped, big)) == 1
    other = {**record, "budget": {"tokens": 128}}
    assert problems(other, record) == ["m | h2o | 128 | original / t: not in the committed leaderboard"]
    elsewhere = {**record, "config": {"model": "another model"}}  # the same row of another model is another row
    assert problems(elsewhere, record) == ["another model | h2o | 64 | original / t: not in the committed leaderboard"]


@pytest.mark.parametrize(("method", "rise", "allowed"), [
    ("h2o", 29 * 1536, True),  # measured on CI's slice: StreamingLLM and H2O 0.5, needle, question after
    ("h2o", 29 * 1536 + 1, False),  # beyond L - 1 rows
    ("h2o", -29 * 1536, False),  # deciding across layers never peaks lower
    ("snapkv", 29 * 1536, False),  # decides once after the prompt, per layer: no slack
    ("h2o sliding", 29 * 1536, False),  # a model with sliding layers keeps the per-layer step
    ("h2o int4", 29 * 1536, False),  # so do quantized rows
])
def test_check_lets_through_only_the_peak_rows_of_deciding_across_layers_against_a_per_layer_record(
        method, rise, allowed):
    method, _, case = method.partition(" ")
    windows = [None] * 30 if case != "sliding" else [512] * 25 + [None] * 5
    shape = {"kv_heads": 3, "head_dim": 64, "windows": windows, "dtype_bytes": 4, "weight_bytes": 1}
    peak = 47_325_696
    sample = {"task": "t", "kv_compression": 0.5, "active_kv_bytes": 100, "peak_kv_bytes": peak, "frozen_kv_bytes": 0}
    then = {"method": method, "variant": "", "budget": {"ratio": 0.5}, "positions": "original", "query": "after",
            "config": {"model": "m"}, "model_shape": shape, "metrics": {"accuracy": {"t": 0.5}}, "samples": [sample],
            **({"kv_quant": "int4"} if case == "int4" else {})}
    now = json.loads(json.dumps(then))
    now["samples"][0]["peak_kv_bytes"] = peak + rise
    per_layer = check.compare_deterministic([now], check.Reference([then], next(iter(check.DECIDED_PER_LAYER))))
    assert (per_layer.problems == []) is allowed and len(per_layer.allowed) == int(allowed)
    assert all("within the (L - 1) rows" in a for a in per_layer.allowed)
    later = check.compare_deterministic([now], check.Reference([then], "0123456789abcdef"))  # a record made since
    assert len(later.problems) == 1 and later.allowed == []


@pytest.mark.model
def test_killed_sweep_resumes_with_only_the_unfinished_cells(tmp_path):
    config, out, cells = write(tmp_path, SMALL), tmp_path / "out", tmp_path / "cells"
    out.mkdir()
    (out / "LEADERBOARD.md").write_text("the last complete leaderboard\n")
    cmd = [sys.executable, "-m", "kvbench", "leaderboard", "--config", str(config), "--out", str(out),
           "--cells", str(cells), "--plots", str(tmp_path / "plots"), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(cells.glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-sweep: one cell stored, the others not
    proc.wait()
    done_before = {p.stem for p in cells.glob("*.json")}
    assert 1 <= len(done_before) < 3, "the sweep must be killed after its first cell and before its last"
    assert (out / "LEADERBOARD.md").read_text() == "the last complete leaderboard\n"
    assert not (out / "results.json").exists()
    assert not list(out.glob("*.tmp")) and not list(cells.glob("*.tmp"))

    outcome = sweep.run_sweep(sweep.load(config), out, cells, tmp_path / "plots", progress=False)
    assert set(outcome.cached) == done_before
    assert len(outcome.ran) == 3 - len(done_before) and not set(outcome.ran) & done_before
    results = json.loads((out / "results.json").read_text())
    assert_valid_results(results)
    assert [r["method"] for r in results["records"]] == ["full", "streamingllm", "h2o"]
    assert results["kind"] == "leaderboard" and results["run"]["cells_cached"] == len(done_before)
    assert results["run"]["model_sha256"] == results["records"][0]["config"]["model_sha256"]
    board = (out / "LEADERBOARD.md").read_text()
    assert "| streamingllm" in board and "keep the timings of the run that made them" in board

    again = sweep.run_sweep(sweep.load(config), out, cells, None, check=out / "results.json", progress=False)
    assert again.ran == [] and len(again.cached) == 3 and again.check == check.Comparison()

    broken = cells / f"{again.cached[1]}.json"  # a cell cut short (a full disk, a copy interrupted)
    broken.write_text(broken.read_text()[:100])
    healed = sweep.run_sweep(sweep.load(config), out, cells, None, check=out / "results.json", progress=False)
    assert healed.ran == [again.cached[1]] and healed.check == check.Comparison()  # recomputed, the same numbers
    assert json.loads(broken.read_text())["cell"]["samples"]

    moved = json.loads((cells / f"{again.cached[1]}.json").read_text())  # streamingllm's, made on another machine
    CellStore(cells).put(moved["config"], Cell(**{**moved["cell"], "host": "cuda, another machine, 8 threads"}))
    mixed = sweep.run_sweep(sweep.load(config), out, cells, None, progress=False)
    results = json.loads((out / "results.json").read_text())
    assert_valid_results(results)
    hosts = results["run"]["hosts"]  # the killed subprocess and this test may run torch on different thread counts
    assert hosts["cuda, another machine, 8 threads"] == 1 and sum(hosts.values()) == 3
    assert results["records"][1]["hosts"] == ["cuda, another machine, 8 threads"]
    assert f"Timings come from {len(hosts)} machines" in (out / "LEADERBOARD.md").read_text()
    headers, table = leaderboard.rows(mixed.records)
    ratio = [row[headers.index("decode × full")] for row in table]
    assert ratio[0] == "1.00" and ratio[1] == "–"  # never a ratio across two machines
    assert (ratio[2] == "–") == (mixed.records[2]["hosts"] != mixed.records[0]["hosts"])


def test_plots_are_drawn_from_records(tmp_path):
    from kvbench.evaluation.plots import draw_all

    def sample(n: int, depth: float, score: float) -> dict:
        return {"task": "kvbench_needle", "id": f"{n}-{depth}", "score": score, "prompt_tokens": n,
                "decode_ms": [40.0 + n / 100] * 3,
                "meta": {"context_length": n, "depth": depth, "filler": "simple"}}

    records = [{"method": m, "variant": "", "budget": b, "positions": "original", "query": q, "schedule": "decode",
                "metrics": {"accuracy": {"kvbench_needle": acc}, "metric": {"kvbench_needle": "exact_match"},
                            "active_kv_bytes": kv, "kv_compression": 1 - kv / 6e7},
                "samples": [sample(n, d, acc) for n in (1024, 2048, 4096) for d in (0.1, 0.9)]}
               for m, b, acc, kv, q in (("full", None, 1.0, 6e7, "in-prompt"),
                                        ("streamingllm", {"tokens": 256}, 0.0, 1e7, "in-prompt"),
                                        ("streamingllm", {"tokens": 512}, 0.5, 2e7, "in-prompt"),
                                        ("streamingllm", {"tokens": 256}, 0.0, 1e7, "after"))]
    made = draw_all(records, tmp_path)
    assert len(made) == 4 and "accuracy versus KV compression, per query mode" in made
    from kvbench.evaluation.plots import label

    assert label({**records[1], "kv_quant": "int4"}) == "streamingllm 256 int4"  # its own point on the frontier
    for path in made.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def synthetic_row(method: str, scores: dict[tuple[str, int], list[float]], query: str = "in-prompt") -> dict:
    """A leaderboard record with given per-sample scores per (task, context length); other columns filled."""
    samples = [{"task": t, "id": f"{t}-{n}-{k}", "score": v, "meta": {"context_length": n}}
               for (t, n), vs in scores.items() for k, v in enumerate(vs)]
    tasks = sorted({t for t, _ in scores})
    metrics = {"accuracy": {t: sum(s["score"] for s in samples if s["task"] == t) / sum(s["task"] == t for s in samples)
                            for t in tasks},
               "metric": dict.fromkeys(tasks, "exact_match"), "kv_compression_by_task": dict.fromkeys(tasks, 0.5),
               "kv_compression": 0.5, "active_kv_bytes": 1, "peak_kv_bytes": 1, "prefill_ms": 1, "decode_ms_p50": 1,
               "decode_ms_p95": 1, "tokens_per_s": 1, "policy_ms_per_decode_step": 0, "freezes": 0}
    return {"method": method, "variant": "", "budget": None, "positions": "original", "query": query,
            "metrics": metrics, "samples": samples, "versions": {},
            "config": {"model": "m", "attention": "sdpa", "prefill_chunk": 512}}


def test_cells_the_full_cache_fails_are_marked_and_left_out_of_the_suite_average():
    from kvbench.evaluation.leaderboard import counted_cells, markdown, suite_average

    full = synthetic_row("full", {("a", 1024): [1, 1], ("a", 4096): [0, 0], ("b", 1024): [1, 0]})
    method = synthetic_row("snapkv", {("a", 1024): [1, 0], ("a", 4096): [1, 1], ("b", 1024): [0, 0]}, "after")
    counted, left = counted_cells([method, full])
    assert counted == {("a", 1024): 1.0, ("b", 1024): 0.5} and left == {("a", 4096): 0.0}
    assert suite_average(method, counted) == pytest.approx(0.25)  # (0.5 + 0) / 2: its 100% at 4096 does not count
    text = markdown([full, method])
    assert "suite avg" in text and "| 25%" in text and "a @ 4096 (full 0%)" in text and "| after" in text
    inside, after = text.split("### Question after its context was compressed (after)")
    assert "### Question inside the compressed prompt (in-prompt)" in inside  # one table per query mode
    assert "| full" in inside and "snapkv" not in inside and "| snapkv" in after and "| full" not in after


def test_a_task_only_the_full_cache_ran_has_no_column_and_per_task_compression_has_its_own_table():
    """The record's methods skip the RULER tasks the full cache fails: those tasks would be columns of dashes, so
    they get none (in the main, compression and paired tables) and the note lists their cells; a table of the full
    cache alone still shows every task. Task names lose their `kvbench_` prefix; the position mode, the same for
    every row, gets no column."""
    from kvbench.evaluation.leaderboard import compression_rows, markdown, paired_rows, rows

    full = synthetic_row("full", {("kvbench_a", 1024): [1, 1], ("kvbench_b", 1024): [1, 1],
                                  ("kvbench_failed", 1024): [0, 0]})
    method = synthetic_row("snapkv", {("kvbench_a", 1024): [1, 0], ("kvbench_b", 1024): [1, 1]})
    method["metrics"]["kv_compression_by_task"] = {"kvbench_a": 0.25, "kvbench_b": 0.625}
    headers, table = rows([full, method])
    assert "a acc (n=2, ±95%)" in headers and not any("failed" in h for h in headers)
    assert "positions" not in headers and "KV compression" in headers and not any("comp." in h for h in headers)
    kept_headers, kept = compression_rows([full, method]) or ([], [])
    assert kept_headers[-2:] == ["a", "b"] and [row[-2:] for row in kept] == [["0.500", "0.500"], ["0.250", "0.625"]]
    assert compression_rows([full, synthetic_row("h2o", {("kvbench_a", 1024): [1, 1]})]) is None  # one task shown
    paired_headers, _ = paired_rows([full, method]) or ([], [])
    assert not any("failed" in h for h in paired_headers) and paired_headers[-1].startswith("suite vs full (n=4")
    text = markdown([full, method])
    assert "### KV compression per task" in text and "failed @ 1024 (full 0%)" in text
    assert any("failed" in h for h in rows([full])[0])  # the full cache alone: its failed task is its result
    rerotated = {**method, "positions": "rerotate"}
    assert rows([full, rerotated])[0][:5] == ["rank", "method", "budget", "positions", "schedule"]


def test_the_frontier_plot_places_rows_at_their_suite_average_per_query_mode():
    """The full cache alone runs the tasks it fails: a mean over each row's own tasks would put it below a method
    that matches it on every counted cell. Its point is its suite average, each query mode on its own."""
    from kvbench.evaluation.plots import mean_accuracy, pareto_points

    full = synthetic_row("full", {("a", 1024): [1, 1], ("failed", 1024): [0, 0]})
    method = synthetic_row("snapkv", {("a", 1024): [1, 1]})
    after = synthetic_row("snapkv", {("a", 1024): [0, 1]}, "after")
    assert mean_accuracy(full) == 0.5
    counted, points = pareto_points([full, method, after])
    assert counted == {("a", 1024): 1.0}
    assert [(y, r["method"]) for _, y, r in points["in-prompt"]] == [(1.0, "full"), (1.0, "snapkv")]
    assert [y for _, y, _ in points["after"]] == [0.5]


def test_the_reading_names_the_rows_level_with_the_full_cache_by_what_they_free_and_the_rest_by_their_loss():
    """Hand-built rows of 12 samples (the ranking test's): B, one loss, is not separated from the full cache; C and D
    are, below it, C closest. Level rows come most compressed first with their freed and peak KV; the query mode
    titles the reading when a table has several; the readings of all modes come before the tables."""
    from kvbench.evaluation.leaderboard import reading, tables

    full = synthetic_row("full", {("a", 1024): [1.0] * 12})
    b = synthetic_row("b", {("a", 1024): [0.0] + [1.0] * 11})
    b["metrics"].update(kv_compression=0.75, peak_kv_bytes=0.5)
    c = synthetic_row("c", {("a", 1024): [0.0] * 6 + [1.0] * 6})
    d = synthetic_row("d", {("a", 1024): [0.0] * 12})
    text = reading([full, d, b, c]) or ""
    assert text.startswith("**What the evidence supports** (each row paired with `full` on the same 12 samples of "
                           "the 1 counted cells, 95% intervals; 12 samples cannot separate a difference below about "
                           "33 points):")
    assert "- level with the full cache, 1 of 3 rows, most compressed first (KV freed at the end; peak KV against " \
           "full's): b (75%; 50%)" in text
    assert text.endswith("- below it, 2 of 3, closest first (points lost): c (−50), d (−100)") and "above" not in text
    after = synthetic_row("d", {("a", 1024): [1.0] * 12}, "after")
    board = tables([full, b, after, synthetic_row("full", {("a", 1024): [1.0] * 12}, "after")])
    assert board.index("**Question after its context was compressed (after): what the evidence supports**") < \
        board.index("### Question inside the compressed prompt")
    assert "- level with the full cache, 1 of 1 rows" in board.split("(after): what")[1]


def test_the_overview_gives_each_model_and_query_mode_its_level_rows_and_the_most_compressed_of_them():
    """Two models, each a full cache and two rows on 12 samples: on model m the row losing one sample is level (the
    most compressed level row is named, with its freed and peak KV), the one losing all is below; model n's row
    loses all. A single model has no overview (its section opens with its readings)."""
    from kvbench.evaluation.leaderboard import overview

    def on(model: str, row: dict, compression: float = 0.5) -> dict:
        row["config"] = {**row["config"], "model": model}
        row["metrics"].update(kv_compression=compression, peak_kv_bytes=0.25 if compression > 0.5 else 1)
        return row

    rows = [on("m", synthetic_row("full", {("a", 1024): [1.0] * 12}), 0.0),
            on("m", synthetic_row("b", {("a", 1024): [0.0] + [1.0] * 11}), 0.75),
            on("m", synthetic_row("d", {("a", 1024): [0.0] * 12})),
            on("n", synthetic_row("full", {("a", 1024): [1.0] * 12}), 0.0),
            on("n", synthetic_row("d", {("a", 1024): [0.0] * 12}))]
    assert (overview(rows) or "").split("\n") == [
        "- **m**, question inside the compressed prompt: 1 of 2 rows level with its full cache; the most compressed "
        "of them b frees 75% of the KV, its peak 25% of full's; 0 above, 1 below (12 paired samples)",
        "- **n**, question inside the compressed prompt: 0 of 1 rows level with its full cache; 0 above, 1 below "
        "(12 paired samples)"]
    assert overview([*rows[:3], {**rows[1], "query": "after"}]) is None


def test_a_degeneration_measure_is_never_a_suite_average_cell():
    """longgen's distinct 4-grams lie in [0, 1] but are not a success rate: the full cache's 0.38 there does not
    make the cell 'failed', and no row's average includes it."""
    from kvbench.evaluation.leaderboard import counted_cells, suite_average

    full = synthetic_row("full", {("a", 1024): [1, 1], ("longgen", None): [0.38, 0.4]})
    full["metrics"]["metric"]["longgen"] = "distinct_4grams"
    counted, left = counted_cells([full])
    assert counted == {("a", 1024): 1.0} and left == {}
    assert suite_average(full, counted) == 1.0


def test_intervals_are_seeded_percentile_bootstraps_of_the_mean():
    from kvbench.evaluation.leaderboard import bootstrap_halfwidth

    assert bootstrap_halfwidth([[1.0]]) is None and bootstrap_halfwidth([[1.0] * 20]) == 0.0
    half = bootstrap_halfwidth([[0.0, 1.0] * 50])
    assert half == bootstrap_halfwidth([[0.0, 1.0] * 50]) and 0.08 < half < 0.12  # 1.96 * 0.05 for p = 0.5, n = 100
    # cells resampled on their own: a cell of certain outcomes adds no spread, so the suite's interval narrows
    assert bootstrap_halfwidth([[0.0, 1.0] * 50, [1.0] * 100]) == pytest.approx(half / 2, rel=0.25)


def test_rows_are_ranked_by_their_paired_difference_and_tie_where_the_samples_do_not_separate_them(tmp_path, capsys):
    """Hand-built rows on one task of 12 samples: B loses one sample of the full cache's (its interval reaches 0:
    resamples without that sample have probability (11/12)^12 = 35%), C loses 6 (no resample is loss-free:
    (6/12)^12 < 0.03%), D loses all. B ties with full; C and D are separated from the rows above them."""
    from kvbench.cli import main
    from kvbench.evaluation import results
    from kvbench.evaluation.leaderboard import markdown, paired_rows, ranking

    full = synthetic_row("full", {("a", 1024): [1.0] * 12})
    b = synthetic_row("b", {("a", 1024): [0.0] + [1.0] * 11})
    c = synthetic_row("c", {("a", 1024): [0.0] * 6 + [1.0] * 6})
    d = synthetic_row("d", {("a", 1024): [0.0] * 12})
    records = [d, c, full, b]  # sweep order: the table orders them
    order, ranks = ranking(records, None) or ([], [])
    assert [records[i]["method"] for i in order] == ["full", "b", "c", "d"] and ranks == ["1=", "1=", "3", "4"]
    headers, table = paired_rows(records) or ([], [])
    assert headers[-1] == "a vs full (n=12, separable: 33 pts)" and [row[0] for row in table] == ["1=", "1=", "3", "4"]
    # B: a resample draws its one loss K ~ Binomial(12, 1/12) times, P(K >= 4) = 1.4% < 2.5% < P(K >= 3) = 7.2%
    assert [row[-1] for row in table[::3]] == ["reference", "−12 +0 Δ−100 [−100, −100] *"]
    assert table[1][-1] == "−1 +0 Δ−8 [−25, 0]" and table[2][-1].startswith("−6 +0 Δ−50 [") and table[2][-1][-1] == "*"
    assert "#### Paired with the full cache" not in markdown(records) and "### Paired with the full cache" in markdown(
        records)
    path = tmp_path / "results.json"
    path.write_text(results.dumps("compare", {}, records))
    assert main(["diff", str(path), "full", "c | query=in-prompt"]) == 0
    out = capsys.readouterr().out
    assert [c.strip() for c in out.splitlines()[-1].split("|")[1:6]] == ["a", "12", "6", "0", "-50.0"]
    assert out.rstrip().endswith("| yes         |")
    assert main(["diff", str(path), "m", "c"]) == 2  # 'm' (the model) names every row
    assert "names 4 rows of the results file, not one" in capsys.readouterr().err


CONFIG = {"model": "m", "model_sha256": "0" * 64, "policy": {"name": "full"}, "task": "t", "source": "abc"}


def finished_cell(score: float = 1.0) -> Cell:
    sample = {**dict.fromkeys(sample_fields(), 0), "task": "t", "score": score}
    return Cell("t", [sample], {"t": score}, {"t": "exact_match"}, "cpu x2, test, 1 threads")


@pytest.mark.parametrize("content", ['{"task": "kvbench_needle", "samples": [{"sco', "{}", "[]", "null",
                                     '{"task": "t", "samples": "none"}', '{"task": "t", "samples": []}', "\udcff"])
def test_an_unreadable_cell_is_reported_by_name_and_never_used(tmp_path, capsys, content):
    store = CellStore(tmp_path)
    key = cell_key(CONFIG)
    store.path(key).write_bytes(content.encode("utf-8", "surrogateescape"))
    assert store.get(key) is None and store.get(key) is None
    err = capsys.readouterr().err
    assert err.count(f"ignoring the cell {store.path(key)}") == 1 and "computing it again" in err  # named once
    assert store.put(CONFIG, finished_cell()) == key
    assert store.get(key) == finished_cell()


def test_a_cell_is_used_only_if_its_configuration_is_its_key_and_its_content_its_checksum(tmp_path, capsys):
    """An edited score, another cell's file copied under this name, a half cell: each named and never used."""
    store = CellStore(tmp_path)
    key = store.put(CONFIG, finished_cell(0.0))
    stored = json.loads(store.path(key).read_text())
    assert stored["config"] == CONFIG and stored["key"] == key
    edited = json.loads(json.dumps(stored))
    edited["cell"]["samples"][0]["score"] = edited["cell"]["scores"]["t"] = 1.0
    store.path(key).write_text(json.dumps(edited))
    assert read_cell(store.path(key), key) is None
    assert "its content does not match its checksum (edited or damaged)" in capsys.readouterr().err
    other = store.put({**CONFIG, "policy": {"name": "h2o"}}, finished_cell(1.0))
    store.path(key).write_bytes(store.path(other).read_bytes())  # another cell's file under this key
    assert read_cell(store.path(key), key) is None
    assert "its configuration is not the one its name stands for" in capsys.readouterr().err
    half = finished_cell()
    half.samples = [{"score": 1.0}]
    store.put(CONFIG, half)
    assert read_cell(store.path(key), key) is None
    assert "a sample lacks task, id, answer, prediction ..." in capsys.readouterr().err


def test_a_cell_claimed_by_a_live_sweep_is_left_to_it_and_a_stopped_sweeps_claim_is_taken_over(tmp_path, capsys):
    ours, theirs = CellStore(tmp_path), CellStore(tmp_path)
    assert ours.claim("k") and (tmp_path / "k.claim").exists()
    assert not theirs.claim("k")  # this process is alive and beats: the claim holds
    assert theirs.owner("k").startswith(f"pid {os.getpid()} on {socket.gethostname()}")
    ours.release("k")
    assert not (tmp_path / "k.claim").exists() and theirs.claim("k")
    theirs.release_all()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "d.claim").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    assert ours.claim("d")  # its process has ended (a SIGKILLed sweep)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as other:
        # a live process under the claim's PID, started at another time: the PID was reused (after a restart)
        (tmp_path / "r.claim").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                      "pid_started": 1000.0}))
        assert ours.claim("r")
        other.kill()
    (tmp_path / "e.claim").write_text("")  # being written now: not taken
    assert not ours.claim("e")
    os.utime(tmp_path / "e.claim", (time.time() - 60, time.time() - 60))  # still empty a minute on: left behind
    assert ours.claim("e")
    (tmp_path / "f.claim").write_text(json.dumps({"pid": 1, "host": "another-host"}))  # a shared folder
    assert not ours.claim("f")
    stopped = time.time() - cellstore.LEASE_S - 1  # no heartbeat for a lease: its owner stopped, whoever it was
    (tmp_path / "g.claim").write_text(json.dumps({"pid": 1, "host": "another-host"}))
    (tmp_path / "h.claim").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    for name in ("g", "h"):
        os.utime(tmp_path / f"{name}.claim", (stopped, stopped))
        assert ours.claim(name)
    assert capsys.readouterr().err.count("its claim was left by a sweep that stopped") == 5
    ours.release_all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.claim"]


def test_a_held_claim_is_kept_alive_by_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(cellstore, "HEARTBEAT_S", 0.05)
    store = CellStore(tmp_path)
    assert store.claim("k")
    long_ago = time.time() - 1000
    os.utime(tmp_path / "k.claim", (long_ago, long_ago))
    time.sleep(0.5)
    assert (tmp_path / "k.claim").stat().st_mtime > long_ago + 900  # touched again
    store.release_all()
    assert not (tmp_path / "k.claim").exists()


def test_records_carry_each_scores_sample_count_and_standard_error():
    from kvbench.evaluation.records import summarize

    def sample(task: str, score: float) -> dict:
        zero = dict.fromkeys(("kv_compression", "mean_kv_compression", "active_kv_bytes", "full_kv_bytes",
                              "peak_kv_bytes", "peak_reserved_kv_bytes", "frozen_kv_bytes", "peak_frozen_kv_bytes",
                              "memory_peak_bytes", "prefill_ms", "freezes", "thaws", "rollbacks", "rolled_back_tokens",
                              "frozen_scored"), 0)
        return {**zero, "task": task, "score": score, "decode_ms": [1.0], "policy": {}, "policy_ms": {"decode": 0.0},
                "offload": {"seconds": 0.0}, "restore": {"seconds": 0.0}}

    m = summarize([sample("a", 1.0), sample("a", 0.0), sample("a", 1.0), sample("a", 0.0), sample("b", 1.0)])
    assert m["accuracy"] == {"a": 0.5, "b": 1.0} and m["accuracy_n"] == {"a": 4, "b": 1}
    assert m["accuracy_stderr"]["a"] == pytest.approx((1 / 3) ** 0.5 / 2)  # sample sd sqrt(1/3), over sqrt(4)
    assert m["accuracy_stderr"]["b"] is None  # one sample has no spread to estimate


@pytest.mark.model
def test_cells_follow_the_weights_not_the_path(tmp_path):
    """A cell is keyed by the model's content: new weights under the same folder are computed again, and the first
    weights put back find their cell (a tiny random Llama: mechanics, never reported)."""
    import tiny
    from kvbench.runtime import models

    folder = tmp_path / "mymodel"
    tiny.build("llama", "sdpa", seed=0).save_pretrained(folder)
    models.load_tokenizer().save_pretrained(folder)
    config = write(tmp_path, f'model = "{folder}"\ntasks = ["needle-1k"]\nlimit = 1\n[[rows]]\nmethods = ["full"]\n')
    cells = tmp_path / "cells"

    def run(out: str) -> sweep.Outcome:
        return sweep.run_sweep(sweep.load(config), tmp_path / out, cells, None, progress=False)

    first = run("first")
    tiny.build("llama", "sdpa", seed=1).save_pretrained(folder)  # same path, other weights
    second = run("second")
    assert len(second.ran) == 1 and second.ran != first.ran and second.cached == []
    sha = [r["config"]["model_sha256"] for o in (first, second) for r in o.records]
    assert sha[0] != sha[1] and all(len(s) == 64 for s in sha)
    tiny.build("llama", "sdpa", seed=0).save_pretrained(folder)
    assert run("third").cached == first.ran


def test_check_never_replaces_the_reference_it_checks_against(tmp_path, capsys, monkeypatch):
    from kvbench.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "leaderboard").mkdir()
    reference = tmp_path / "leaderboard" / "results.json"
    reference.write_text("the committed reference\n")
    code = main(["leaderboard", "--config", str(write(tmp_path, SMALL)), "--check", "leaderboard/results.json",
                 "--cells", "cells", "--plots", "plots", "--no-progress"])  # --out: leaderboard, the default
    assert code == 2 and "is the results file this run writes (--out leaderboard)" in capsys.readouterr().err
    assert reference.read_text() == "the committed reference\n" and not (tmp_path / "cells").exists()


def test_check_refuses_a_reference_without_samples_before_any_work(tmp_path):
    from kvbench.evaluation import results

    record = {"method": "full", "variant": "", "budget": None, "positions": "original", "query": "in-prompt",
              "metrics": {"accuracy": {"t": 1.0}}}
    reference = tmp_path / "results.json"
    reference.write_text(results.dumps("leaderboard", {}, [record]))
    with pytest.raises(ValueError, match=f"--check {reference}: its records do not hold what the check compares"):
        check.committed(reference)


@pytest.mark.model
def test_sigterm_stops_a_sweep_as_ctrl_c_does_and_releases_its_claims(tmp_path):
    config, out, cells = write(tmp_path, SMALL), tmp_path / "out", tmp_path / "cells"
    cmd = [sys.executable, "-m", "kvbench", "leaderboard", "--config", str(config), "--out", str(out),
           "--cells", str(cells), "--plots", str(tmp_path / "plots"), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(cells.glob("*.claim")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.terminate()  # while it computes a cell it claimed
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 143
    assert "kvbench: terminated; the finished cells are in the cell store" in err and "Traceback" not in err
    assert not list(cells.glob("*.claim")) and not out.exists()


@pytest.mark.model
def test_a_sweep_of_several_models_keys_each_cell_by_its_model_and_shows_a_table_per_model(tmp_path):
    """Two models (tiny random Llamas with other weights, the second in bfloat16: mechanics, never reported): a table
    per model, each row with its own model's full cache; a one-model sweep's cells are reused by the two-model one;
    a slice may keep one model."""
    import tiny
    from kvbench.runtime import models

    for seed, name in ((0, "one"), (1, "two")):
        tiny.build("llama", "sdpa", seed=seed).save_pretrained(tmp_path / name)
        models.load_tokenizer().save_pretrained(tmp_path / name)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    rows = 'tasks = ["needle-1k"]\nlimit = 1\n[[rows]]\nmethods = ["full", "streamingllm"]\nbudgets = [64]\n'
    cells = tmp_path / "cells"
    single = sweep.run_sweep(sweep.load(write(tmp_path, f'model = "{one}"\n{rows}')), tmp_path / "a", cells, None,
                             progress=False)
    config = write(tmp_path, f'models = ["{one}", {{ name = "{two}", dtype = "bfloat16" }}]\n{rows}'
                             f'[slices.first]\nmodels = ["{one}"]\n')
    both = sweep.run_sweep(sweep.load(config), tmp_path / "b", cells, tmp_path / "b" / "plots", progress=False)
    assert sorted(both.cached) == sorted(single.ran) and len(both.ran) == 2  # the second model's two cells
    assert [(r["config"]["model"], r["config"]["dtype"], r["method"]) for r in both.records] == [
        (one, "float32", "full"), (one, "float32", "streamingllm"),
        (two, "bfloat16", "full"), (two, "bfloat16", "streamingllm")]
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert_valid_results(results)
    assert [m["model"] for m in results["run"]["models"]] == [one, two] and "model" not in results["run"]
    assert len({m["model_sha256"] for m in results["run"]["models"]}) == 2
    board = (tmp_path / "b" / "LEADERBOARD.md").read_text()
    assert board.index(f"## {one}") < board.index(f"## {two}")
    mine, theirs = board.split(f"## {two}")
    assert mine.count("| streamingllm") == theirs.count("| streamingllm") == 3  # its row, its pairing, what it buys
    assert (tmp_path / "b" / "plots" / "one").is_dir() and (tmp_path / "b" / "plots" / "two").is_dir()

    first = sweep.run_sweep(sweep.load(config, "first"), tmp_path / "c", cells, None, progress=False)
    assert first.ran == [] and {r["config"]["model"] for r in first.records} == {one}
    assert json.loads((tmp_path / "c" / "results.json").read_text())["run"]["model"] == one


SHARDED = """
model = "{model}"
tasks = ["needle-1k", "kvbench_ppl", "kvbench_ruler", "kvbench_rope_inwindow"]
limit = 3
{shards}
[task_metadata.kvbench_ppl]
documents = 3
[task_metadata.kvbench_ruler]
context_lengths = [512]
[task_metadata.kvbench_rope_inwindow]
window_end = 640
context_tokens = 256
continuation_tokens = 64
documents = 3
[[rows]]
methods = ["full", "h2o"]
budgets = [64]
"""


def test_a_sharded_cell_gives_the_scores_and_samples_of_one_run(tmp_path):
    """Cells split into shards of their documents (generation, rolling and pairwise log-likelihood, a group's
    subtasks alike) merge into exactly what one run gives: every score (a group's mean over its subtasks, a weighted
    perplexity), every sample in the same order with the same prediction and per-sample score. A tiny random Llama:
    mechanics, never reported."""
    import tiny
    from kvbench.runtime import models

    tiny.build("llama", "sdpa", seed=0).save_pretrained(tmp_path / "model")
    models.load_tokenizer().save_pretrained(tmp_path / "model")
    whole = tmp_path / "whole.toml"
    whole.write_text(SHARDED.format(model=tmp_path / "model", shards=""))
    split = tmp_path / "split.toml"
    split.write_text(SHARDED.format(model=tmp_path / "model", shards='shards = { "needle-1k" = 2, kvbench_ppl = 2, '
                                    'kvbench_ruler = 3, kvbench_rope_inwindow = 9 }'))
    one = sweep.run_sweep(sweep.load(whole), tmp_path / "one", tmp_path / "cells", None, progress=False)
    parts = sweep.run_sweep(sweep.load(split), tmp_path / "parts", tmp_path / "cells", None,
                            check=tmp_path / "one" / "results.json", progress=False)
    assert len(one.ran) == 8
    assert len(parts.ran) == 2 * (2 + 2 + 3 + 3)  # the rope probe has 3 documents: 3 shards, not 9
    assert parts.check == check.Comparison()
    for a, b in zip(one.records, parts.records, strict=True):
        assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
        assert [(s["id"], s["prediction"], s["score"], s["prompt_tokens"], s["peak_kv_bytes"]) for s in a["samples"]] \
            == [(s["id"], s["prediction"], s["score"], s["prompt_tokens"], s["peak_kv_bytes"]) for s in b["samples"]]
    scores = one.records[0]["metrics"]["accuracy"]
    assert {"kvbench_ruler", "kvbench_ruler_qa", "kvbench_ppl", "kvbench_rope_inwindow"} <= set(scores)
    h2o = [s["id"] for s in parts.records[1]["samples"]]
    assert len(h2o) == len(set(h2o)) == 3 + 3 + 11 * 3 + 3  # each document once

    again = sweep.run_sweep(sweep.load(split), tmp_path / "again", tmp_path / "cells", None, progress=False)
    assert again.ran == [] and sorted(again.cached) == sorted(parts.ran)  # a sweep resumes shard by shard


def test_the_committed_leaderboard_is_what_its_results_render_to(tmp_path, capsys):
    """LEADERBOARD.md is derived from results.json alone (`--render`): a table edited by hand, or rendering code
    changed without rendering the committed records again, fails here."""
    from kvbench.cli import main

    out = tmp_path / "leaderboard"
    out.mkdir()
    shutil.copy(REPO / "leaderboard" / "results.json", out / "results.json")
    assert main(["leaderboard", "--render", "--check", str(out / "results.json"), "--out", str(out)]) == 2
    assert "--render runs nothing, so --check cannot apply" in capsys.readouterr().err
    assert not (out / "LEADERBOARD.md").exists()
    assert main(["leaderboard", "--render", "--out", str(out), "--plots", str(tmp_path / "reports" / "leaderboard"),
                 "--no-progress"]) == 0
    assert (out / "LEADERBOARD.md").read_text() == (REPO / "leaderboard" / "LEADERBOARD.md").read_text()


def test_plots_go_under_out_unless_it_is_the_published_leaderboard(tmp_path, monkeypatch):
    """A slice, a trial or a rendering into another folder never replaces the published plots."""
    from kvbench.cli import main

    out = tmp_path / "trial"
    out.mkdir()
    shutil.copy(REPO / "leaderboard" / "results.json", out / "results.json")
    monkeypatch.chdir(tmp_path)  # where the published folders would be, relative to the working directory
    assert main(["leaderboard", "--render", "--out", str(out)]) == 0
    models = [m["model"] for m in json.loads((out / "results.json").read_text())["run"]["models"]]
    assert all((out / "plots" / m / "pareto.png").exists() for m in models) and not (tmp_path / "reports").exists()
    (tmp_path / "leaderboard").mkdir()
    shutil.copy(REPO / "leaderboard" / "results.json", tmp_path / "leaderboard" / "results.json")
    assert main(["leaderboard", "--render"]) == 0
    assert all((tmp_path / "reports" / "leaderboard" / m / "pareto.png").exists() for m in models)


def test_the_committed_record_cells_are_whole_and_share_one_source():
    """leaderboard/cells holds the record's finished parts (leaderboard/RECORD.md): every file a whole cell under its
    own key (configuration and checksum), every cell of a model and task the record names, and all computed by one
    commit of kvbench's computing code, since a part at another would mix code versions in one leaderboard."""
    record = sweep.load(REPO / "leaderboard" / "sweep.toml")
    # a part under way keeps its claims and partial writes there too; .gitignore keeps them out of the commit
    files = sorted(f for f in (REPO / "leaderboard" / "cells").glob("*") if f.suffix not in (".claim", ".tmp"))
    assert files, "the record's first part is committed"
    configs = [json.loads(f.read_text())["config"] for f in files]
    assert all(f.suffix == ".json" and read_cell(f, f.stem) is not None for f in files)
    assert {c["model"] for c in configs} <= {m for m, _ in record.models}
    assert {c["task"] for c in configs} <= set(record.spec.tasks)
    assert len({c["source"] for c in configs}) == 1
