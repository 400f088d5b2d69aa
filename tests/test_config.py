"""Config loading: strict validation with key paths and lines, overrides, schema, and no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from deqcli.config import Config, apply_override, json_schema, parse_config
from deqcli.errors import ConfigError

DOTTIE = """
problem:
  kind: expression
  fixed_point: cos(z)
  initial: 1.0
"""


def parse(text: str, **kw) -> Config:
    return parse_config(textwrap.dedent(text), **kw)


def test_minimal_config_gets_documented_defaults() -> None:
    cfg = parse(DOTTIE)
    assert cfg.solver.name == "fixed_point" and cfg.solver.options == {}
    assert cfg.run.dtype == "float64" and cfg.atol == 1e-10
    assert cfg.run.device == "cpu" and cfg.run.max_iter == 1000
    assert parse(DOTTIE + "run: {dtype: float32}\n").atol == 1e-5


def test_solver_shorthand_and_options() -> None:
    cfg = parse(DOTTIE + "solver: {name: fixed_point, beta: 0.5}\n")
    assert cfg.solver.options == {"beta": 0.5}
    assert parse(DOTTIE + "solver: newton\n").solver.name == "newton"


def test_unknown_key_names_path_line_and_suggestion() -> None:
    with pytest.raises(ConfigError) as err:
        parse(DOTTIE + "run:\n  max_iters: 5\n")
    msg = str(err.value)
    assert msg.startswith("run.max_iters (line 7): unknown key; did you mean 'max_iter'?")
    assert "valid keys:" in msg and "\n" not in msg


def test_unknown_problem_key_lists_the_kind_specific_keys() -> None:
    with pytest.raises(
        ConfigError, match=r"problem\.wieghts \(line 3\): unknown key.*valid keys: kind, name, dim"
    ):
        parse("problem:\n  kind: tanh_layer\n  wieghts: 1\n  dim: 2\n  W: [[0.1, 0], [0, 0.1]]\n")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (DOTTIE + "run: {max_iter: many}\n", r"run\.max_iter \(line 6\): .*integer.*got 'many'"),
        (DOTTIE + "run: {rtol: -1}\n", r"run\.rtol \(line 6\): .*greater than or equal to 0"),
        (DOTTIE + "run: {dtype: float16}\n", r"run\.dtype .*'float32' or 'float64'"),
        (DOTTIE + "run: {check_every: 0}\n", r"run\.check_every \(line 6\): .*greater than or"),
        (DOTTIE + "run: {check_every: 33}\n", r"run\.check_every \(line 6\): .*less than or"),
        (
            DOTTIE + "run: {device: gpu}\n",
            r"run\.device \(line 6\): unknown device; use auto, cpu.*, got 'gpu'$",
        ),
        ("problem: {kind: spline}\n", r"problem\.kind.*use one of tanh_layer, expression"),
        ("problem: {kind: tanh_layer, dim: 2}\n", r"problem\.W.*required key is missing"),
        ("problem: {kind: expression, initial: 1}\n", r"exactly one of fixed_point"),
        (
            "problem: {kind: expression, fixed_point: z, initial: true}\n",
            r"problem\.initial.*boolean",
        ),
        ("problem: {kind: expression, fixed_point: z, initial: [[1, 2], [3]]}\n", r"rectangular"),
        (
            "problem: {kind: expression, fixed_point: z, initial: [1.0e-3, 2e-3]}\n",
            r"problem\.initial \(line 1\): .*'2e-3' is text here: .*\(1\.0e-3, not 1e-3\)",
        ),
        ("problem: {kind: tanh_layer, dim: 2, W: {random: gaussian}}\n", r"problem\.W.*random"),
        ("problem: {kind: tanh_layer, dim: 2, W: {file: w.npy, seed: 1}}\n", r"unknown key 'seed'"),
        ("problem: {kind: python, target: nocolon}\n", r"target must look like"),
        ("- just\n- a list\n", r"expected a mapping with a 'problem' key"),
        # YAML booleans (true, yes, on) are never numbers: `atol: yes` is not a tolerance of 1.
        (DOTTIE + "run: {atol: yes}\n", r"run\.atol \(line 6\): expected a number; YAML reads"),
        (DOTTIE + "run: {max_iter: true}\n", r"run\.max_iter \(line 6\): expected a number"),
        ("problem: {kind: expression, fixed_point: z, dim: on}\n", r"problem\.dim.*a number"),
        (
            "problem: {kind: tanh_layer, dim: 2, W: {random: normal, shape: [true, 2]}}\n",
            r"problem\.W \(line 1\): shape: expected a number",
        ),
        # A parameter may not take the name of the unknown or of n, nor be given twice.
        (
            "problem: {kind: expression, fixed_point: z, params: {z: 5}}\n",
            r"problem\.params\.z \(line 1\): 'z' is the unknown in the formulas; rename",
        ),
        (
            "problem: {kind: expression, fixed_point: z, params: {n: 5}}\n",
            r"problem\.params\.n \(line 1\): 'n' is the dimension of the unknown",
        ),
        (
            "problem: {kind: gradient_descent, loss: sum(w**2), lr: 0.1, batch_params: {w: [1]}}\n",
            r"problem\.batch_params\.w \(line 1\): 'w' is the unknown",
        ),
        (
            "problem: {kind: expression, fixed_point: r*z, params: {r: 1}, batch_params: {r: [1]}}\n",
            r"problem\.batch_params\.r \(line 1\): 'r' is also in problem\.params",
        ),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as err:
        parse(text)
    assert "\n" not in str(err.value)


def test_malformed_yaml_reports_line_and_column() -> None:
    with pytest.raises(ConfigError, match=r"malformed YAML at line 2, column 1: .*tab"):
        parse("problem:\n\tkind: expression\n")


def test_expression_errors_are_caught_without_solving() -> None:
    with pytest.raises(
        ConfigError,
        match=r"problem\.fixed_point \(line \d\): .*unknown function 'cso'.*did you mean 'cos'",
    ):
        parse(DOTTIE.replace("cos(z)", "cso(z)"))
    with pytest.raises(ConfigError, match=r"problem\.params\.b.*unknown name 'c'"):
        parse("problem:\n  kind: expression\n  fixed_point: a * z\n  params: {b: c + 1, a: 0.5}\n")
    # Params may use earlier params and n.
    cfg = parse(
        "problem:\n  kind: expression\n  dim: 3\n  fixed_point: A @ z\n  params: {A: 0.5 * eye(n)}\n"
    )
    assert cfg.problem.params["A"] == "0.5 * eye(n)"


def test_overrides_create_and_replace_keys() -> None:
    raw = yaml.safe_load(DOTTIE)
    apply_override(raw, "run.atol=1e-8")
    apply_override(raw, "solver.beta=0.5")
    apply_override(raw, "problem.fixed_point=sin(z) + 1")
    assert raw["run"]["atol"] == 1e-8 and isinstance(raw["run"]["atol"], float)
    assert raw["solver"] == {"beta": 0.5}
    assert raw["problem"]["fixed_point"] == "sin(z) + 1"
    for bad in ("noequals", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match=r"--set: expected key\.path=value"):
            apply_override(raw, bad)
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_override(raw, "problem.fixed_point.x=1")


def test_solver_flag_drops_options_of_another_solver() -> None:
    text = DOTTIE + "solver: {name: fixed_point, beta: 0.5}\n"
    assert parse(text, solver="fixed_point").solver.options == {"beta": 0.5}
    assert parse(text, solver="newton").solver.options == {}
    assert parse(text, solver="newton", overrides=["solver.max_backtracks=3"]).solver.options == {
        "max_backtracks": 3
    }


SQRT2 = """
problem:
  kind: expression
  residual: z**2 - 2
  initial: 1.0
"""


def test_a_residual_defaults_to_newton_and_a_map_to_plain_iteration() -> None:
    assert parse(SQRT2).solver.name == "newton"
    assert parse(DOTTIE).solver.name == "fixed_point"
    # Options without a name belong to the default solver; --solver newton keeps them.
    with_options = SQRT2 + "solver: {max_backtracks: 3}\n"
    assert parse(with_options).solver.name == "newton"
    assert parse(with_options, solver="newton").solver.options == {"max_backtracks": 3}
    assert parse(with_options, solver="anderson").solver.options == {}
    # A named solver always wins, and a Python map's form decides its default too.
    assert parse(SQRT2 + "solver: fixed_point\n").solver.name == "fixed_point"
    python = "problem: {kind: python, target: m.py:make, form: residual}\n"
    assert parse(python).solver.name == "newton"
    assert parse(python.replace("residual", "fixed_point")).solver.name == "fixed_point"


def test_the_documented_sqrt2_example_solves_as_written() -> None:
    """docs/expressions.md: a residual with no solver named converges to √2 (by Newton)."""
    import math

    from deqcli.api import solve

    result = solve(parse(SQRT2 + "run: {atol: 1.0e-12}\n"), diagnostics=False)
    assert result.status.ok and result.solver == "newton" and result.nit <= 6
    assert float(result.solution[0, 0]) == pytest.approx(math.sqrt(2), abs=1e-14)


def test_schema_is_json_and_describes_every_problem_kind() -> None:
    schema = json_schema()
    text = json.dumps(schema)
    for kind in ("tanh_layer", "expression", "gradient_descent", "python"):
        assert kind in text
    assert set(schema["properties"]) == {"problem", "solver", "run"}


def test_config_module_does_not_import_torch() -> None:
    code = "import sys; from deqcli.config import load_config; load_config('configs/dottie.yaml'); print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=_root()
    )
    assert out.stdout.strip() == "False"


def _root() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent)


_yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=8)
)
_yaml_values = st.recursive(
    _yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["kind", "dim", "W", "x", "run", "fixed_point", "initial", "params", "name", "atol"]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    problem=st.dictionaries(
        st.sampled_from(
            [
                "kind",
                "dim",
                "batch",
                "W",
                "x",
                "fixed_point",
                "residual",
                "initial",
                "params",
                "loss",
                "lr",
                "target",
            ]
        ),
        _yaml_values,
        max_size=6,
    ),
    kind=st.sampled_from(["tanh_layer", "expression", "gradient_descent", "python", "other"]),
    run=st.dictionaries(
        st.sampled_from(["atol", "rtol", "max_iter", "device", "dtype", "seed"]),
        _yaml_scalars,
        max_size=3,
    ),
)
def test_any_mapping_is_either_a_config_or_a_config_error(
    problem: dict, kind: str, run: dict
) -> None:
    raw = {"problem": {**problem, "kind": kind}, "run": run}
    try:
        cfg = parse_config(yaml.safe_dump(raw))
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert cfg.problem.kind == kind


def test_every_file_a_config_names_is_listed_and_can_be_relocated(tmp_path) -> None:
    from deqcli.config import check_files, config_files, relocate_files

    module = parse_config(
        textwrap.dedent(
            """
            problem:
              kind: module
              target: models/cell.py:Cell
              weights: {file: ckpt/cell.pt, key: model}
              inputs: {file: /data/x.npy}
              params: {scale: {file: scale.npy}}
            """
        ),
        base_dir=tmp_path,
    )
    refs = [(ref.key, ref.name) for ref in config_files(module)]
    assert refs == [
        ("problem.target", "models/cell.py"),
        ("problem.weights.file", "ckpt/cell.pt"),
        ("problem.inputs", "/data/x.npy"),
        ("problem.params.scale", "scale.npy"),
    ]
    moved = relocate_files(
        module, {"models/cell.py": "/s/1/cell.py", "ckpt/cell.pt": "/s/2/cell.pt"}
    )
    assert moved.problem.target == "/s/1/cell.py:Cell"
    assert moved.problem.weights.file == "/s/2/cell.pt" and moved.problem.weights.key == "model"
    assert moved.problem.inputs.file == "/data/x.npy"  # not in the mapping: as written
    assert module.problem.target == "models/cell.py:Cell"  # the original is left alone
    assert moved.base_dir == module.base_dir
    with pytest.raises(ConfigError, match=r"problem\.target: file 'models/cell.py' does not exist"):
        check_files(module)

    arrays = parse_config(
        "problem: {kind: tanh_layer, dim: 2, W: {file: W.npy}, x: {random: normal}}",
        base_dir=tmp_path,
    )
    assert [(r.key, r.name) for r in config_files(arrays)] == [("problem.W", "W.npy")]
    assert config_files(parse_config("problem: {kind: expression, fixed_point: cos(z)}")) == []
