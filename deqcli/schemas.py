"""The JSON documents deq writes: their ``kind``, their ``schema_version`` and their JSON Schemas.

Every document a command writes with ``--json`` names itself with ``kind: deq.<command>`` and
carries a ``schema_version`` that changes when a key is renamed, removed or changes meaning (new
keys may appear without a change). ``deq schema --output NAME`` prints the JSON Schema of each.

The schemas pin what scripts rely on (names, types, required keys) and leave room for new keys.
Numbers that may be infinite or undefined are written as the strings "inf", "-inf" and "nan",
so the documents are strict JSON; the schemas say so. This module imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

DRAFT = "https://json-schema.org/draft/2020-12/schema"

SOLVE_KIND, SOLVE_VERSION = "deq.solve", "1"
COMPARE_KIND, COMPARE_VERSION = "deq.compare-solvers", "1"
# Version 2: the kind was "sweep" (and "deq-sweep" in a --results file) before.
SWEEP_KIND, SWEEP_VERSION = "deq.sweep", "2"
SWEEP_RESULTS_KIND = "deq.sweep-results"
# Version 2: the kind was "gradcheck" before.
GRADCHECK_KIND, GRADCHECK_VERSION = "deq.gradcheck", "2"

# The output documents by the name ``deq schema --output`` takes.
OUTPUTS = ("solve", "compare", "sweep", "gradcheck")


def _number() -> dict[str, Any]:
    """A finite number, or one of the strings JSON needs for the others."""
    return {"anyOf": [{"type": "number"}, {"enum": ["inf", "-inf", "nan"]}]}


def _maybe(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(
    properties: dict[str, Any], *, required: list[str] | None = None, description: str = ""
) -> dict[str, Any]:
    """An object whose listed keys are required (all by default); other keys are allowed."""
    out: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }
    if description:
        out["description"] = description
    return out


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


INT = {"type": "integer"}
NONNEG = {"type": "integer", "minimum": 0}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
NUM = _number()
STRINGS = _array(STR)
STATUS = {
    "enum": [
        "converged",
        "max_iter",
        "diverged",
        "nonfinite",
        "oscillating",
        "stalled",
        "timeout",
    ]
}
COUNTS = {"nfev": NONNEG, "njev": NONNEG, "jvp": NONNEG, "vjp": NONNEG}
ANY_OBJECT = {"type": "object"}


def _header(kind: str, version: str) -> dict[str, Any]:
    return {"kind": {"const": kind}, "schema_version": {"const": version}}


def solve_schema() -> dict[str, Any]:
    """``deq solve --json``: one solve (``SolveResult.to_dict``)."""
    sample = _object(
        {
            "index": NONNEG,
            "status": STATUS,
            "message": STR,
            "iterations": NONNEG,
            **COUNTS,
            "residual": NUM,
            "relative_residual": NUM,
            "solution": {"type": "array", "description": "z* of this sample, in the state's shape"},
            "diagnostics": ANY_OBJECT,
        },
        required=["index", "status", "message", "iterations", *COUNTS, "residual"],
    )
    history = _object(
        {
            "iterations": _array(NONNEG),
            "residual": _array(_array(NUM)),
            "relative_residual": _array(_array(NUM)),
            "step": _array(_array(NUM)),
            "time": _array({"type": "number"}),
            "summary": _object(
                {"kept_rows": NONNEG, "dropped_rows": NONNEG, "min_residual": _array(NUM)}
            ),
        },
        required=["iterations", "residual", "relative_residual", "step", "time"],
        description="rows [row][sample]; 'iterations' numbers the rows (a long run's middle is "
        "thinned, see run.history_limit)",
    )
    return _object(
        {
            **_header(SOLVE_KIND, SOLVE_VERSION),
            "problem": STR,
            "form": {"enum": ["fixed_point", "residual"]},
            "solver": STR,
            "options": ANY_OBJECT,
            "status": STATUS,
            "message": STR,
            "converged": BOOL,
            "batch": {"type": "integer", "minimum": 1},
            "converged_samples": NONNEG,
            "iterations": NONNEG,
            **COUNTS,
            "residual": NUM,
            "relative_residual": NUM,
            "wall_time": {"type": "number"},
            "state_shape": _array(NONNEG),
            "device": STR,
            "dtype": {"enum": ["float32", "float64"]},
            "tolerance": _object(
                {
                    "stop_mode": {"enum": ["abs", "rel"]},
                    "rule": STR,
                    "atol": {"type": "number"},
                    "rtol": {"type": "number"},
                    "max_iter": NONNEG,
                },
                required=["atol", "rtol", "max_iter"],
            ),
            "notes": STRINGS,
            "samples": _array(sample),
            "diagnostics": ANY_OBJECT,
            "history": history,
        },
        required=[
            "kind",
            "schema_version",
            "problem",
            "solver",
            "options",
            "status",
            "message",
            "converged",
            "batch",
            "converged_samples",
            "iterations",
            *COUNTS,
            "residual",
            "relative_residual",
            "wall_time",
            "device",
            "dtype",
            "tolerance",
            "notes",
            "samples",
        ],
    )


def compare_schema() -> dict[str, Any]:
    """``deq compare-solvers --json`` (and ``--save-baseline``)."""
    time = _object(
        {
            "median": {"type": "number"},
            "min": {"type": "number"},
            "max": {"type": "number"},
            "runs": _array({"type": "number"}),
        }
    )
    row = _object(
        {
            "solver": STR,
            "family": STR,
            "status": {"enum": [*STATUS["enum"], "error"]},
            "converged": BOOL,
            "message": STR,
            "reason": _maybe(STR),
            "period": _maybe(INT),
            "samples": NONNEG,
            "converged_samples": NONNEG,
            "iterations": _maybe(NONNEG),
            **{k: _maybe(NONNEG) for k in COUNTS},
            "residual": _maybe(NUM),
            "time": _maybe(time),
            "relative_time": _maybe({"type": "number"}),
            "rank": _maybe({"type": "integer", "minimum": 1}),
            "deterministic": BOOL,
            "options": ANY_OBJECT,
            "notes": STRINGS,
            "result": _maybe(ANY_OBJECT),
            "curve": _maybe(
                _object(
                    {
                        "iteration": _array(NONNEG),
                        "residual": _array(NUM),
                        "time": _array({"type": "number"}),
                    },
                    description="the worst residual over the samples at each kept history row",
                )
            ),
        }
    )
    problem = _object(
        {
            "name": STR,
            "config": STR,
            "kind": STR,
            "form": {"enum": ["fixed_point", "residual"]},
            "description": STR,
            "batch": NONNEG,
            "dim": NONNEG,
            "device": STR,
            "dtype": STR,
            "atol": {"type": "number"},
            "rtol": {"type": "number"},
            "max_iter": NONNEG,
            "solved_by": STRINGS,
            "fastest": _maybe(STR),
            "solvers": _array(row),
        }
    )
    summary_row = _object(
        {
            "solver": STR,
            "solved": NONNEG,
            "problems": NONNEG,
            "wins": NONNEG,
            "errors": NONNEG,
            "geomean_relative_time": _maybe({"type": "number"}),
        }
    )
    return _object(
        {
            **_header(COMPARE_KIND, COMPARE_VERSION),
            "deq_version": STR,
            "created": STR,
            "environment": ANY_OBJECT,
            "settings": _object(
                {
                    "solvers": STRINGS,
                    "repeat": NONNEG,
                    "warmup": NONNEG,
                    "overrides": STRINGS,
                },
            ),
            "problems": _array(problem),
            "summary": _object(
                {
                    "problems": NONNEG,
                    "common": STRINGS,
                    "unsolved": STRINGS,
                    "solvers": _array(summary_row),
                }
            ),
            "baseline": _object(
                {
                    "path": STR,
                    "max_slowdown": {"type": "number"},
                    "compared": NONNEG,
                    "regressions": _array(
                        _object({"problem": STR, "solver": STR, "what": STR, "detail": STR})
                    ),
                    "notes": STRINGS,
                }
            ),
        },
        required=[
            "kind",
            "schema_version",
            "deq_version",
            "created",
            "environment",
            "settings",
            "problems",
            "summary",
        ],
    )


def sweep_schema() -> dict[str, Any]:
    """``deq sweep --json``: every grid point, its samples and the regimes found."""
    axis = _object({"key": STR, "name": STR, "values": {"type": "array"}})
    point = _object(
        {
            "index": _array(NONNEG),
            "assignment": ANY_OBJECT,
            "status": STR,
            "converged": BOOL,
            "classification": STR,
            "label": STR,
            "iterations": NONNEG,
            "residual": _maybe(NUM),
            "samples": _array(ANY_OBJECT),
        },
        required=["index", "assignment", "status"],
    )
    return _object(
        {
            **_header(SWEEP_KIND, SWEEP_VERSION),
            "config": STR,
            "axes": _array(axis),
            "options": ANY_OBJECT,
            "complete": BOOL,
            "points_done": NONNEG,
            "points_total": NONNEG,
            "resumed": NONNEG,
            "wall_time": {"type": "number"},
            "summary": ANY_OBJECT,
            "notes": STRINGS,
            "points": _array(point),
        }
    )


def gradcheck_schema() -> dict[str, Any]:
    """``deq gradcheck --json``: implicit, unrolled and finite-difference gradients, compared."""
    direction = _object(
        {
            "ift": NUM,
            "unrolled": NUM,
            "finite_difference": NUM,
            "error_ift": NUM,
            "error_unrolled": NUM,
            "resolves_converged": BOOL,
        }
    )
    return _object(
        {
            **_header(GRADCHECK_KIND, GRADCHECK_VERSION),
            "problem": STR,
            "ok": BOOL,
            "agree": BOOL,
            "silent_failure": BOOL,
            "loss": _object({"expression": STR, "value": NUM}),
            "parameters": STRINGS,
            "forward": _object(
                {
                    "status": STATUS,
                    "solver": STR,
                    "iterations": NONNEG,
                    "residual": NUM,
                    "atol": {"type": "number"},
                }
            ),
            "ift": _object(
                {
                    "gradient_norm": NUM,
                    "error_vs_fd": NUM,
                    "backward_solve": ANY_OBJECT,
                    "gradient": {"anyOf": [ANY_OBJECT, STR]},
                },
                required=["gradient_norm", "error_vs_fd", "backward_solve", "gradient"],
            ),
            "unrolled": _object(
                {
                    "steps": NONNEG,
                    "final_residual": NUM,
                    "gradient_norm": NUM,
                    "error_vs_fd": NUM,
                    "rel_diff_vs_ift": NUM,
                }
            ),
            "finite_differences": _object(
                {"eps": {"type": "number"}, "directions": _array(direction)},
            ),
            "jacobian_checks": _array(ANY_OBJECT),
            "conditioning": _maybe(ANY_OBJECT),
            "causes": _array({"anyOf": [STR, ANY_OBJECT]}),
            "notes": STRINGS,
        },
        required=[
            "kind",
            "schema_version",
            "problem",
            "ok",
            "agree",
            "silent_failure",
            "loss",
            "parameters",
            "forward",
            "ift",
            "unrolled",
            "finite_differences",
            "notes",
        ],
    )


_BUILDERS = {
    "solve": (solve_schema, "deq solve --json", "one solve: status, counts, samples, history"),
    "compare": (
        compare_schema,
        "deq compare-solvers --json",
        "solvers side by side on problems; also what --save-baseline writes",
    ),
    "sweep": (sweep_schema, "deq sweep --json", "every point of a parameter grid, and the regimes"),
    "gradcheck": (
        gradcheck_schema,
        "deq gradcheck --json",
        "implicit, unrolled and finite-difference gradients of a loss, compared",
    ),
}


def output_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of the document ``name`` (one of ``OUTPUTS``) writes."""
    build, command, what = _BUILDERS[name]
    return {"$schema": DRAFT, "title": f"{command} document", "description": what, **build()}
