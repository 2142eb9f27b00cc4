"""The package's layers: imports run one way (README, "How it works"), so each layer can be read and tested without
the ones above it. An import that runs back up fails here with the file and the import named."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
# lowest first; a module may import its own layer and the layers below it
LAYERS = [("kvbench.policy", "kvbench.selection", "kvbench.files"), ("kvbench.methods",), ("kvbench.kv",),
          ("kvbench.runtime",),
          ("kvbench.tasks",), ("kvbench.lmeval",), ("kvbench.evaluation",), ("kvbench.cli", "kvbench.__main__")]
# the registry finds the methods by importing them: the one import allowed to run up
REGISTRY = ("kvbench.policy", "kvbench.methods")
FOLDERS = {"kvbench": ROOT / "kvbench", "kvbench.methods": ROOT / "methods", "kvbench.tasks": ROOT / "tasks"}


def layer(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None  # the package root (`kvbench`: its version) belongs to every layer


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found.setdefault(name, path)  # kvbench/ holds no methods/ or tasks/ of its own
    return found


def imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvbench"):
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("kvbench")]
    return out


def test_every_module_is_in_a_layer():
    assert [m for m in modules() if m != "kvbench" and layer(m) is None] == []


def test_no_import_runs_back_up():
    upward = []
    for name, path in modules().items():
        mine = layer(name)
        for target, line in imports(path):
            theirs = layer(target)
            if mine is None or theirs is None or theirs <= mine:
                continue
            if (name, target.split(".")[0] + "." + target.split(".")[1]) == REGISTRY:
                continue
            upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "cache.py"
    bad.write_text("from kvbench.evaluation.records import sample_record\n")
    assert imports(bad) == [("kvbench.evaluation.records.sample_record", 1)]
    assert layer("kvbench.evaluation.records.sample_record") > layer("kvbench.kv.cache")


def closure(start: str) -> set[str]:
    """The kvbench modules `start` imports, directly or through others (statically, every import in the file)."""
    found, todo, known = set(), [start], modules()
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for target, _ in imports(known[name]):
            module = max((m for m in known if target == m or target.startswith(m + ".")), key=len, default=None)
            if module is not None and module != "kvbench":
                todo.append(module)
    return found


def test_the_files_left_out_of_a_cells_identity_are_never_imported_by_the_code_computing_a_cell():
    """records.RENDERING is not hashed into a cell's key; lmeval_tasks.evaluate computes every cell (through the
    adapter, the engine, the methods and the tasks), so nothing it reaches may import one of those files."""
    from kvbench.evaluation.records import RENDERING

    rendering = {"kvbench." + f.removesuffix(".py").replace("/", ".") for f in RENDERING}
    assert rendering <= set(modules())
    reached = closure("kvbench.evaluation.lmeval_tasks")
    assert {"kvbench.runtime.engine", "kvbench.methods.h2o", "kvbench.kv.quant"} <= reached  # it does reach the engine
    assert reached & rendering == set()
    assert "kvbench.evaluation.leaderboard" in closure("kvbench.evaluation.sweep")  # the check sees such an import
