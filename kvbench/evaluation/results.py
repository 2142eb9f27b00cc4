"""The results file (`results.json`) that `compare` and `leaderboard` write and `--check` reads.

One versioned document, so that a tool or a paper reading it knows what each field means: the schema version,
the run's configuration and one record per leaderboard row (`records.py` builds them). Its JSON Schema ships
next to this module (`results.schema.json`); a change to a record's shape changes the schema and, when a field
changes meaning, `SCHEMA_VERSION`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("results.schema.json")


def dumps(kind: str, run: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The file's text. `kind` is the command that wrote it ("compare", "leaderboard" or "bench"); `run` its
    configuration (typed: numbers are numbers, a budget is {"tokens": n} or {"ratio": r})."""
    doc = {"schema_version": SCHEMA_VERSION, "kind": kind, "run": run, "records": records}
    return json.dumps(doc, indent=1) + "\n"


def load(path: Path, flag: str) -> dict[str, Any]:
    """A results file of this schema version, or a ValueError naming `flag`, the file and what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: results file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{flag} {path}: not a readable results.json ({err})") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ValueError(f"{flag} {path}: no schema_version, so not a kvbench results file of schema "
                         f"{SCHEMA_VERSION} (files written before kvbench versioned them are not read); "
                         "regenerate it with this kvbench")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"{flag} {path}: results schema version {data['schema_version']!r}; this kvbench reads "
                         f"version {SCHEMA_VERSION} only")
    if data.get("kind") == "bench":
        raise ValueError(f"{flag} {path}: a `kvbench bench` file (bench.json) holds timings, not task results; "
                         "pass a results.json written by `kvbench compare` or `kvbench leaderboard`")
    if not isinstance(data.get("records"), list):
        raise ValueError(f"{flag} {path}: 'records' is not a list of records")
    return data
