"""The `kvbench` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from importlib.metadata import version
from pathlib import Path

from kvbench.runtime import models

NO_PROGRESS = "no progress bars: kvbench's, lm-eval's or transformers' (loading a model)"
PUBLISHED = Path("leaderboard")  # the leaderboard of record: its results, and its plots under reports/
PUBLISHED_PLOTS = Path("reports") / "leaderboard"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a whole number") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvbench", description="Compare KV-cache compression policies honestly.")
    p.add_argument("--version", action="version", version=f"kvbench {version('kvbench')}")
    sub = p.add_subparsers(dest="command", required=True)
    shown = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}  # every flag's help ends with its default

    c = sub.add_parser("compare", help="run methods on the same model and samples, print a leaderboard", **shown)
    c.add_argument("--methods", type=_csv, default="full,streamingllm,h2o",
                   help="comma-separated method names (see `kvbench methods`)")
    c.add_argument("--budget", type=_csv, default="256",
                   help="KV budget per layer: tokens (256) or a ratio of tokens seen (0.25); comma-separated sweep")
    c.add_argument("--tasks", type=_csv, default="needle",
                   help="comma-separated kvbench tasks, each an lm-eval YAML in tasks/lm_eval (see README, Tasks)")
    c.add_argument("--context-lengths", type=_csv, default=None,
                   help="context lengths in tokens for the tasks that take them (needle, RULER-style), comma-separated "
                        "(default: each task's own)")
    c.add_argument("--limit", type=int, default=None, help="at most N samples per task")
    c.add_argument("--model", default=models.DEFAULT_MODEL,
                   help=f"bundled alias ({', '.join(models.BUNDLED)}), a .gguf file, a local HF model directory, "
                        "or a model id in the local Hugging Face cache")
    c.add_argument("--method-args", action="append", default=[], metavar="METHOD:K=V[,K=V]",
                   help="policy parameters, e.g. h2o:heavy_ratio=0.5 (repeatable)")
    c.add_argument("--positions", type=_csv, default="original",
                   help="position handling after eviction: original, rerotate, naive (comma-separated sweep)")
    c.add_argument("--query", type=_csv, default="in-prompt",
                   help="where the question goes: in-prompt (inside the compressed prompt), after (the context is "
                        "compressed first), reuse (one compressed context for its questions); comma-separated sweep")
    c.add_argument("--schedule", type=_csv, default="",
                   help="when decisions apply: prompt (once after the prompt), chunk (after every prefill chunk), "
                        "decode (also while decoding); comma-separated sweep (default: each method's own)")
    c.add_argument("--kv-quant", type=_csv, default="none",
                   help="how K/V rows are stored: none (the model's dtype), int8, int4, int2 (per token, groups of 32 "
                        "channels), each optionally with rR: the newest R tokens also in full precision (int4r128); "
                        "kivi4, kivi2: KIVI's keys per channel, values per token, 128 newest in full precision "
                        "(kivi4r64: another window); quanto4, quanto2: transformers' quanto QuantizedCache (heads of "
                        "64k channels); comma-separated sweep")
    c.add_argument("--prefill-chunk", type=int, default=512, help="prefill chunk size in tokens")
    c.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    c.add_argument("--dtype", default="float32",
                   help="model dtype: float32, bfloat16, float16, or auto (the checkpoint's own)")
    c.add_argument("--device-map", default=None,
                   help="accelerate device map for a model larger than one device (e.g. auto); replaces --device")
    c.add_argument("--out", type=Path, default=None, help="output folder (default: a new folder in reports/runs/)")
    c.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    c.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    b = sub.add_parser("bench", help="decode/prefill time and peak KV of each method vs full, per context length",
                       **shown)
    b.add_argument("--methods", type=_csv, default="full,streamingllm,h2o,asrkf",
                   help="comma-separated method names; the × full ratios need full among them")
    b.add_argument("--contexts", type=_csv, default="1024,2048,4096,8000",
                   help="prompt lengths in tokens, comma-separated (positive, within the model's window)")
    b.add_argument("--budget", default="512", help="budget for methods that take one")
    b.add_argument("--method-args", action="append", default=[], metavar="METHOD:K=V[,K=V]",
                   help="policy parameters, e.g. asrkf:tau=0.5|0.25 (one row per variant; repeatable)")
    b.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per prompt")
    b.add_argument("--kv-quant", type=_csv, default="none",
                   help="how K/V rows are stored, as for compare; every method runs on each (ratios: against full "
                        "in the model's dtype)")
    b.add_argument("--batch", type=_csv, default="1",
                   help="batch sizes, comma-separated: B > 1 decodes B prompts together (per-sequence caches)")
    b.add_argument("--repeats", type=int, default=1,
                   help="whole rounds of every method (ratios: median over rounds, with their spread)")
    b.add_argument("--model", default=models.DEFAULT_MODEL, help="as for compare: an alias, a .gguf, a folder or an id")
    b.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    b.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, or auto (the checkpoint's)")
    b.add_argument("--prefill-chunk", type=int, default=512, help="prefill chunk size in tokens")
    b.add_argument("--out", type=Path, default=None,
                   help="output folder (default: a new folder in reports/runs/; the committed reports/bench/ only "
                        "when named)")
    b.add_argument("--overwrite", action="store_true", help="replace bench.md and bench.json already in --out")
    b.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    lb = sub.add_parser("leaderboard", help="run the published sweep (resumable) and write leaderboard/", **shown)
    lb.add_argument("--config", type=Path, default=Path("leaderboard") / "sweep.toml", help="sweep definition (TOML)")
    lb.add_argument("--slice", default=None, help="run only this [slices.NAME] of the sweep (e.g. ci)")
    lb.add_argument("--out", type=Path, default=PUBLISHED, help="where LEADERBOARD.md and results.json go")
    lb.add_argument("--dtype", default=None, help="model dtype, replacing the sweep file's (float32, bfloat16, ...)")
    lb.add_argument("--plots", type=Path, default=None,
                    help="where the PNG plots go (default: reports/leaderboard for --out leaderboard, else OUT/plots, "
                         "so a slice or a trial never replaces the published plots)")
    lb.add_argument("--cells", type=Path, default=None,
                    help="finished-cell store (default: the kvbench cache dir, ~/.cache/kvbench/cells)")
    lb.add_argument("--check", type=Path, default=None,
                    help="committed results.json: exit 1 if a deterministic column of any cell run differs")
    lb.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="where cells run: here, one after another, or as Ray tasks (pip install 'kvbench[ray]')")
    lb.add_argument("--address", default=None,
                    help="with --executor ray: a running Ray cluster to join ('auto', ray://HOST:10001); without it "
                         "a local Ray starts")
    lb.add_argument("--workers", type=int, default=None,
                    help="with --executor ray and no --address: cells at once (default: the CPUs / --threads)")
    lb.add_argument("--threads", type=int, default=1, help="with --executor ray: torch threads (Ray CPUs) per cell")
    lb.add_argument("--render", action="store_true",
                    help="run nothing: write LEADERBOARD.md and the plots again from --out's results.json")
    lb.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    d = sub.add_parser("diff", help="pair two rows of a results file sample by sample: losses, gains, Δ, interval")
    d.add_argument("results", type=Path, help="a results.json (kvbench compare or leaderboard)")
    d.add_argument("a", help="row A: its key or some of its |-separated parts, e.g. 'full | query=in-prompt'")
    d.add_argument("b", help="row B, likewise, e.g. 'snapkv | 256 | query=in-prompt'")

    sub.add_parser("methods", help="list the registered methods and their parameters")
    return p


def _compare(args: argparse.Namespace) -> int:
    from kvbench.evaluation.compare import CompareSpec, default_out_dir, parse_method_args, run_compare
    from kvbench.evaluation.leaderboard import markdown
    from kvbench.evaluation.records import check_outputs
    from kvbench.policy import Budget

    spec = CompareSpec(
        methods=args.methods,
        budgets=[Budget.parse(b) for b in args.budget],
        tasks=args.tasks,
        model=args.model,
        limit=args.limit,
        prefill_chunk=args.prefill_chunk,
        method_args=parse_method_args(args.method_args),
        device=args.device,
        dtype=args.dtype,
        device_map=args.device_map,
        positions=args.positions,
        queries=args.query,
        schedules=args.schedule,
        kv_quants=args.kv_quant,
        context_lengths=tuple(_int(x, "--context-lengths") for x in args.context_lengths)
        if args.context_lengths else None,
    )
    if args.prefill_chunk <= 0:
        raise ValueError(f"--prefill-chunk must be positive, got {args.prefill_chunk}")
    out = args.out or default_out_dir(spec.methods)
    check_outputs(out, ["results.json", "leaderboard.md"], args.overwrite)
    records = run_compare(spec, out, progress=not args.no_progress)
    print(markdown(records))
    print(f"wrote {out / 'results.json'} and {out / 'leaderboard.md'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from kvbench.evaluation.bench import BenchSpec, run_bench
    from kvbench.evaluation.compare import default_out_dir, parse_method_args
    from kvbench.evaluation.records import check_outputs

    spec = BenchSpec(methods=args.methods, method_args=parse_method_args(args.method_args),
                     contexts=[_int(c, "--contexts") for c in args.contexts],
                     budget=args.budget, new_tokens=args.new_tokens, model=args.model, device=args.device,
                     dtype=args.dtype, prefill_chunk=args.prefill_chunk,
                     batch=tuple(_int(b, "--batch") for b in args.batch), repeats=args.repeats,
                     kv_quants=args.kv_quant)
    out = args.out or default_out_dir(spec.methods, "bench-")
    check_outputs(out, ["bench.md", "bench.json"], args.overwrite)
    run_bench(spec, out, progress=not args.no_progress)
    print((out / "bench.md").read_text())
    print(f"wrote {out / 'bench.md'} and {out / 'bench.json'}")
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    from kvbench.evaluation import sweep
    from kvbench.evaluation.records import check_outputs

    ray = _ray_options(args)
    if args.plots is None:
        args.plots = PUBLISHED_PLOTS if args.out == PUBLISHED else args.out / "plots"
    if args.render:
        given = [flag for flag, on in (("--slice", args.slice), ("--dtype", args.dtype), ("--cells", args.cells),
                                       ("--check", args.check), ("--executor ray", ray)) if on]
        if given:
            raise ValueError(f"--render runs nothing, so {', '.join(given)} cannot apply")
        check_outputs(args.plots, [], flag="--plots")
        sweep.render(args.out, args.plots)
        print(f"wrote {args.out / 'LEADERBOARD.md'} from {args.out / 'results.json'}")
        return 0
    plan = sweep.load(args.config, args.slice, args.dtype)
    cells = args.cells or models.cache_dir() / "cells"
    if args.check is not None and (args.out / "results.json").resolve() == args.check.resolve():
        raise ValueError(f"--check {args.check} is the results file this run writes (--out {args.out}): a failed check "
                         "would replace the reference it failed against; give --out another folder")
    check_outputs(args.out, ["LEADERBOARD.md", "results.json"], overwrite=True)  # the sweep's job is to replace them
    check_outputs(args.plots, [], flag="--plots")
    check_outputs(cells, [], flag="--cells")
    try:
        outcome = sweep.run_sweep(plan, args.out, cells, args.plots, args.check, progress=not args.no_progress,
                                  ray=ray)
    except sweep.CellsFailed as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        return 1
    print((args.out / "LEADERBOARD.md").read_text())
    print(f"wrote {args.out / 'LEADERBOARD.md'} and {args.out / 'results.json'}: {len(outcome.ran)} cells run, "
          f"{len(outcome.cached)} from {cells}")
    if outcome.model_loads:
        each = ", ".join(f"{worker} {outcome.worker_cells.get(worker, 0)} cells / {loads} model loads"
                         for worker, loads in sorted(outcome.model_loads.items()))
        print(f"ray: {len(outcome.model_loads)} workers: {each}")
    if outcome.check is None:
        return 0
    if outcome.check.allowed:
        print(f"check: {len(outcome.check.allowed)} peaks above {args.check} by the bound of deciding across layers "
              "(kvbench/evaluation/check.py, DECIDED_PER_LAYER):", *outcome.check.allowed, sep="\n  ")
    if outcome.check.problems:
        print(f"deterministic columns differ from {args.check}:", *outcome.check.problems, sep="\n  ",
              file=sys.stderr)
        return 1
    bound = f" ({len(outcome.check.allowed)} peaks within the bound above)" if outcome.check.allowed else ""
    print(f"check: the deterministic columns of all {len(outcome.ran) + len(outcome.cached)} cells match "
          f"{args.check}{bound}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from kvbench.evaluation import results
    from kvbench.evaluation.leaderboard import diff

    print(diff(results.load(args.results, "diff")["records"], args.a, args.b), end="")
    return 0


def _ray_options(args: argparse.Namespace):
    """--executor ray's settings, checked; None for the local executor (which takes none of them)."""
    from kvbench.evaluation.ray_cells import RayOptions, check_available

    given = [flag for flag, value in (("--address", args.address), ("--workers", args.workers)) if value is not None]
    if args.threads != 1:
        given.append("--threads")
    if args.executor == "local":
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --executor ray")
        return None
    if args.threads < 1 or (args.workers is not None and args.workers < 1):
        raise ValueError(f"--workers {args.workers} --threads {args.threads}: each must be a whole number >= 1")
    if args.address is not None and args.workers is not None:
        raise ValueError("--workers sizes a local Ray; a cluster joined with --address runs as many cells as its CPUs "
                         "allow (--threads each)")
    check_available()
    workers = args.workers or max(1, (os.cpu_count() or 1) // args.threads)
    return RayOptions(address=args.address, workers=workers, threads=args.threads)


def _methods() -> int:
    import dataclasses

    from kvbench.policy import available, parameter_range, parameters, policy_class

    for name in available():
        cls = policy_class(name)
        params = [f"{f.name}={f.default}" + (f" ({parameter_range(f)})" if parameter_range(f) else "")
                  for f in parameters(name).values()
                  if f.name not in ("budget", "schedule", "decode_interval") and f.default is not dataclasses.MISSING]
        if cls.evicts:
            params.insert(0, f"schedule={cls.default_schedule}" + (
                f" (or {'|'.join(s for s in cls.schedules if s != cls.default_schedule)})" if len(cls.schedules) > 1
                else ""))
            if "decode" in cls.schedules:
                params.insert(1, "decode_interval=1 (>= 1; with schedule decode)")
        print(f"{name:14s} {' '.join(params)}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled CI job, `timeout`, a cluster's preemption), handled as Ctrl-C is: claims released, nothing
    half-written, one line saying what was kept."""


def _terminate(signum, frame) -> None:
    raise Terminated


INTERRUPTED = {  # what a Ctrl-C or SIGTERM leaves behind, per command
    "compare": "nothing was written (results are written once every cell is done; a leaderboard sweep resumes "
               "from its finished cells)",
    "bench": "nothing was written",
    "leaderboard": "the finished cells are in the cell store and the last complete leaderboard is untouched; run "
                   "the same command again to resume",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _run(args)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "no_progress", False):  # no bar at all: transformers' (loading, GGUF conversion) too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        if args.command == "compare":
            return _compare(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "leaderboard":
            return _leaderboard(args)
        if args.command == "diff":
            return _diff(args)
        return _methods()
    except (ValueError, FileNotFoundError) as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`kvbench methods | head -1`): say so once, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        print("kvbench: error: the output pipe was closed before everything was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        how = "terminated" if isinstance(stop, Terminated) else "interrupted"
        print(f"kvbench: {how}; {INTERRUPTED.get(args.command, 'nothing was written')}", file=sys.stderr)
        return 128 + int(signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    except OSError as err:  # the machine, not the input: a full disk, a folder that vanished
        print(f"kvbench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
