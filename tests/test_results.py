"""The versioned results file: the shipped JSON Schema, and `--check` refusing files of another version."""

import json
import re
from pathlib import Path

import jsonschema
import pytest

from conftest import assert_valid_results
from kvbench.cli import main
from kvbench.evaluation.results import SCHEMA_PATH, SCHEMA_VERSION, dumps, load
from kvbench.policy import Budget

ROOT = Path(__file__).parent.parent


def test_the_schema_is_a_valid_json_schema_and_pins_its_version():
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["schema_version"] == {"const": SCHEMA_VERSION}


def test_the_committed_leaderboard_conforms():
    """`--check` compares CI's cells against this file: it must be a schema-1 file, typed budgets included."""
    results = json.loads((ROOT / "leaderboard" / "results.json").read_text())
    assert_valid_results(results)
    assert {json.dumps(r["budget"]) for r in results["records"]} >= {"null", '{"ratio": 0.25}', '{"ratio": 0.75}'}


@pytest.mark.parametrize("budget", ["256", "0.25", "1", "1.0"])
def test_a_budget_is_typed_and_round_trips(budget):
    b = Budget.parse(budget)
    assert Budget(**b.to_json()) == b and Budget.label(b.to_json()) == str(b)
    assert ("tokens" in b.to_json()) == ("." not in budget)  # 1 token and a ratio of 1.0 stay apart


def test_the_schema_refuses_a_string_budget_and_an_unknown_field():
    doc = json.loads(dumps("compare", {}, [json.loads((ROOT / "leaderboard" / "results.json").read_text())
                                           ["records"][1]]))
    assert_valid_results(doc)
    doc["records"][0]["budget"] = "256"
    with pytest.raises(jsonschema.ValidationError, match="'256' is not valid"):
        assert_valid_results(doc)
    doc["records"][0]["budget"] = {"tokens": 256}
    doc["records"][0]["samples"][0]["new_field"] = 1
    with pytest.raises(jsonschema.ValidationError, match="new_field"):
        assert_valid_results(doc)


@pytest.mark.parametrize("content,message", [
    ("[]", "no schema_version, so not a kvbench results file of schema 1"),
    ('{"header": {}, "records": []}', "no schema_version"),
    ('{"schema_version": 2, "records": []}', "results schema version 2; this kvbench reads version 1 only"),
    ('{"schema_version": 1, "records": {}}', "'records' is not a list of records"),
    ('{"schema_version": 1, "kind": "bench", "run": {}, "records": []}', "a `kvbench bench` file"),
    ('{"schema_version": 1, "records": [', "not a readable results.json"),
])
def test_load_refuses_another_version_with_the_flag_and_the_file(tmp_path, content, message):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="--check " + str(path) + ": " + message.replace("(", r"\(")):
        load(path, "--check")


def test_leaderboard_check_of_an_old_results_file_exits_2_before_any_work(tmp_path, capsys):
    old = tmp_path / "results.json"
    old.write_text('{"header": {}, "records": []}')
    out = tmp_path / "out"
    code = main(["leaderboard", "--config", str(ROOT / "leaderboard" / "sweep.toml"), "--slice", "ci", "--out",
                 str(out), "--plots", str(tmp_path / "plots"), "--cells", str(tmp_path / "cells"), "--check", str(old),
                 "--no-progress"])
    assert code == 2
    assert f"--check {old}: no schema_version" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cells").exists()


@pytest.mark.parametrize("name", ["int8", "int4", "int2r64", "kivi4", "kivi2r128", "quanto4", "quanto2", "int16",
                                  "quanto8", "kivi4r0", "fp8", "none"])
def test_the_schema_admits_exactly_the_kv_storage_names_a_run_takes(name):
    """A record's kv_quant is a name `--kv-quant` parsed (the record's rows include transformers' quanto4): the schema
    and the parser must agree, or a valid leaderboard fails its own schema."""
    from kvbench.kv.quant import SCHEME

    schema = json.loads(SCHEMA_PATH.read_text())
    patterns = {schema["$defs"][d]["properties"]["kv_quant"]["pattern"] for d in schema["$defs"]
                if "kv_quant" in schema["$defs"][d].get("properties", {})}
    assert patterns, "the schema types kv_quant"
    parsed = SCHEME.fullmatch(name) is not None
    assert all((re.fullmatch(p, name) is not None) == parsed for p in patterns)
