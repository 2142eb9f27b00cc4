"""Make `lm_eval --model kvbench-hf|asrkf-hf` and `--tasks kvbench_*` work with stock lm-eval.

lm-eval 0.4.13 resolves `--model` from a static table and scans no plugin entry points. This module
is imported at interpreter start by `kvbench-lm-eval.pth` and costs one entry in `sys.meta_path`:
nothing of kvbench, torch or lm-eval is imported until a program imports lm-eval's model table. At
that moment the two model types are registered as lazy placeholders (`module:Class` strings,
imported on first use), and when lm-eval's task package loads, kvbench's task folder is added to
its default task paths. The `lm_eval` command (and `python -m lm_eval`) reports kvbench's refusals of
--model_args and of task settings (a context length past the model's window) in one line with exit code 2.

The hook never breaks lm-eval: a kvbench that cannot be imported (a broken install, a missing dependency) costs
lm-eval users kvbench's model types and tasks, with a warning, not their working lm-eval; and the .pth line does
nothing once kvbench is uninstalled (an editable install's .pth is added to kvbench's RECORD, so `pip uninstall`
removes it too).
"""

import importlib.abc
import importlib.util
import sys
import warnings

PTH = "kvbench-lm-eval.pth"
PTH_LINE = 'import importlib.util as u; u.find_spec("kvbench_lm_eval_hook") and __import__("kvbench_lm_eval_hook")\n'

MODELS = {"kvbench-hf": "kvbench.lmeval.adapter:KVBenchLM", "asrkf-hf": "kvbench.lmeval.adapter:ASRKFLM"}
# lm_eval.models fills the registry from its static table; get_model() imports it when the registry
# is empty, so kvbench registers right after it, never before (that would hide the built-in models)
WATCHED = {"lm_eval.models": "_register_models", "lm_eval.tasks": "_register_tasks",
           "lm_eval._cli.harness": "_one_line_refusals"}


def _register_models(module) -> None:
    from lm_eval.api.registry import model_registry

    for name, target in MODELS.items():
        if name not in model_registry:
            model_registry.register(name, target=target)


def _register_tasks(module) -> None:
    from kvbench.lmeval.tasks import install_task_path

    install_task_path(module)


def _one_line_refusals(module) -> None:
    """`lm_eval --model kvbench-hf` (the command, or `python -m lm_eval`) with bad --model_args, or any model on a
    kvbench task with a setting the model cannot take, ends as `kvbench` does: one line on stderr, exit 2.

    lm-eval prints a traceback for any exception from a model's constructor or a task's data; only kvbench's own
    refusals (ModelArgsError, TaskSettingsError) are shortened here, every other exception propagates unchanged.
    Both launchers run `HarnessCLI.execute`, so that is what is wrapped."""
    execute = module.HarnessCLI.execute

    def execute_refusing_in_one_line(self, args) -> None:
        try:
            execute(self, args)
        except ValueError as err:
            adapter, tasks = sys.modules.get("kvbench.lmeval.adapter"), sys.modules.get("kvbench.tasks")
            refusals = ((adapter.ModelArgsError,) if adapter else ()) + ((tasks.TaskSettingsError,) if tasks else ())
            if not isinstance(err, refusals):
                raise
            print(f"lm_eval: kvbench: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    execute_refusing_in_one_line.__doc__ = execute.__doc__
    module.HarnessCLI.execute = execute_refusing_in_one_line


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a registration function right after a watched lm-eval module finishes executing."""

    def find_spec(self, name, path=None, target=None):
        if name not in WATCHED:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module, hook = spec.loader.exec_module, globals()[WATCHED[name]]

        def exec_then_register(module):
            exec_module(module)
            try:
                hook(module)
            except Exception as err:  # whatever broke in kvbench, lm-eval itself must keep working
                warnings.warn(f"kvbench's lm-eval hook failed ({type(err).__name__}: {err}); lm-eval runs without "
                              "kvbench's model types and tasks", stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


def install_pth() -> str:
    """Write kvbench-lm-eval.pth into site-packages (a wheel install ships it; an editable one cannot) and list it in
    kvbench's RECORD, so that `pip uninstall kvbench` removes it with the rest."""
    import sysconfig
    from pathlib import Path

    site = Path(sysconfig.get_paths()["purelib"])
    target = site / PTH
    target.write_text(PTH_LINE)
    for record in site.glob("kvbench-*.dist-info/RECORD"):
        if f"\n{PTH}," not in f"\n{record.read_text()}":
            with record.open("a") as fh:
                fh.write(f"{PTH},,\n")
    return str(target)


if __name__ == "__main__":
    print(f"wrote {install_pth()}")
elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport())
