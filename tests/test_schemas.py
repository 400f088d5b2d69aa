"""The output documents: one kind scheme, and real documents valid against the published schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deqcli import schemas
from tests.conftest import CONFIGS

jsonschema = pytest.importorskip("jsonschema")


def _schema(cli, name: str) -> dict:
    run = cli("schema", "--output", name)
    assert run.exit_code == 0 and run.stderr == ""
    schema = json.loads(run.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def _valid(cli, name: str, doc: dict) -> None:
    jsonschema.validate(doc, _schema(cli, name), cls=jsonschema.Draft202012Validator)


def _json(run) -> dict:
    assert run.exit_code in (0, 1), run.stderr
    return json.loads(run.stdout)


def test_solve_documents_match_their_schema(cli) -> None:
    batch = _json(cli("solve", CONFIGS / "tanh_layer.yaml", "--json", "-"))
    assert batch["kind"] == "deq.solve" and batch["schema_version"] == schemas.SOLVE_VERSION
    _valid(cli, "solve", batch)
    # A failed run with non-finite numbers (written as strings), no diagnostics, a root problem.
    cubic = _json(cli("solve", CONFIGS / "suite" / "divergent.yaml", "--json", "-"))
    assert cubic["status"] == "diverged"
    _valid(cli, "solve", cubic)
    root = _json(cli("solve", CONFIGS / "sqrt2.yaml", "--no-diagnostics", "--json", "-"))
    assert root["form"] == "residual" and "diagnostics" not in root
    _valid(cli, "solve", root)


def test_a_schema_rejects_what_scripts_must_not_meet(cli) -> None:
    doc = _json(cli("solve", CONFIGS / "sqrt2.yaml", "--no-diagnostics", "--json", "-"))
    schema = _schema(cli, "solve")
    for broken in (
        {**doc, "status": "fine"},
        {**doc, "kind": "deq.sweep"},
        {**doc, "residual": "small"},
        {k: v for k, v in doc.items() if k != "samples"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema, cls=jsonschema.Draft202012Validator)


def test_compare_sweep_and_gradcheck_documents_match_their_schemas(cli, tmp_path) -> None:
    configs = [CONFIGS / "suite" / "dottie.yaml", CONFIGS / "suite" / "oscillating.yaml"]
    flags = ["--solvers", "fixed_point,newton", "--repeat", "1", "--warmup", "0"]
    base = tmp_path / "base.json"
    first = cli("compare-solvers", *configs, *flags, "--save-baseline", base, "-q")
    assert first.exit_code == 0
    compare = _json(cli("compare-solvers", *configs, *flags, "--baseline", base, "--json", "-"))
    assert compare["kind"] == "deq.compare-solvers" and "baseline" in compare
    assert all(p["form"] == "fixed_point" for p in compare["problems"])
    _valid(cli, "compare", compare)

    sweep = _json(cli("sweep", CONFIGS / "logistic_sweep.yaml", "-p", "r=2.5:3.5:3", "--json", "-"))
    assert sweep["kind"] == "deq.sweep" and sweep["schema_version"] == "2"
    _valid(cli, "sweep", sweep)

    grad = _json(cli("gradcheck", CONFIGS / "linear_scalar.yaml", "--json", "-"))
    assert grad["kind"] == "deq.gradcheck" and grad["schema_version"] == "2"
    _valid(cli, "gradcheck", grad)


def test_every_document_kind_follows_one_scheme() -> None:
    kinds = [schemas.SOLVE_KIND, schemas.COMPARE_KIND, schemas.SWEEP_KIND, schemas.GRADCHECK_KIND]
    commands = ["solve", "compare-solvers", "sweep", "gradcheck"]
    assert kinds == [f"deq.{command}" for command in commands]
    for name in schemas.OUTPUTS:
        schema = schemas.output_schema(name)
        assert schema["properties"]["kind"]["const"].startswith("deq.")


def test_schema_output_still_accepts_a_file_path(cli, tmp_path) -> None:
    old = tmp_path / "deq.schema.json"
    run = cli("schema", "--output", old)
    assert run.exit_code == 0 and "--file" in run.stderr
    assert json.loads(old.read_text())["title"] == "deq configuration"
    new = tmp_path / "solve.schema.json"
    assert cli("schema", "--output", "solve", "--file", new).exit_code == 0
    assert json.loads(new.read_text())["properties"]["kind"]["const"] == "deq.solve"
    for wrong in (cli("schema", "--output", "solv", "--file", new), cli("schema", "-o", "solv")):
        assert (
            wrong.exit_code == 2
            and "unknown document 'solv'; did you mean 'solve'?" in wrong.stderr
        )
    assert not Path("solv").exists()  # nothing written where it ran


def test_a_results_file_from_before_the_rename_still_resumes(cli, tmp_path) -> None:
    results = tmp_path / "points.jsonl"
    args = ["sweep", CONFIGS / "logistic_sweep.yaml", "-p", "r=2.5:3.5:3", "--results", results]
    assert cli(*args, "-q").exit_code == 0
    lines = results.read_text().splitlines()
    head = json.loads(lines[0])
    assert head["kind"] == "deq.sweep-results"
    results.write_text("\n".join([json.dumps({**head, "kind": "deq-sweep"}), *lines[1:]]) + "\n")
    doc = _json(cli(*args, "--resume", "--json", "-"))
    assert doc["resumed"] == 3 and doc["complete"]
