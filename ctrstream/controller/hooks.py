"""Test hooks of the controller: environment variables that make a cycle go wrong on
purpose, so that an unattended run can show a rollback that is caused, not luck
(``docs/controller.md`` "Test hooks"). Nothing reads them unless they are set.

``CTRSTREAM_CONTROLLER_DEGRADE_CYCLE=N`` - cycle ``N``'s challenger is tried online as an
**over-predicting copy** of the model the offline gate passed: its click probability times
``CTRSTREAM_CONTROLLER_DEGRADE_FACTOR`` (default 4), capped below 1. It stands for a
training/serving skew that the offline gate, which scores the trained file, cannot see. The
shadow stage measures the served copy's calibration on the shown impressions, finds it
outside the guardrail band (``Guardrails.calibration_ratio``, (0.5, 2.0) by default) and the
cycle is rolled back before the challenger decides any request; the champion never stops
serving. Were the copy promoted, the promotion would publish the same copy (what was tried
is what is promoted).
"""

from __future__ import annotations

import os
from pathlib import Path

DEGRADE_ENV = "CTRSTREAM_CONTROLLER_DEGRADE_CYCLE"
DEGRADE_FACTOR_ENV = "CTRSTREAM_CONTROLLER_DEGRADE_FACTOR"
DEFAULT_DEGRADE_FACTOR = 4.0
CAP = 0.999  # a probability times the factor stays below 1


def degraded_cycle() -> int | None:
    """The cycle whose challenger is degraded (``CTRSTREAM_CONTROLLER_DEGRADE_CYCLE``), or
    None; a value that is not a cycle number is a clear error."""
    raw = os.environ.get(DEGRADE_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(
            f"{DEGRADE_ENV}={raw!r}: give the number of the cycle (1, 2, ...) whose challenger "
            "is tried as an over-predicting copy, or unset it"
        )
    return n


def degrade_factor() -> float:
    """The over-prediction factor (``CTRSTREAM_CONTROLLER_DEGRADE_FACTOR``, default 4)."""
    raw = os.environ.get(DEGRADE_FACTOR_ENV, "").strip()
    if not raw:
        return DEFAULT_DEGRADE_FACTOR
    try:
        f = float(raw)
    except ValueError:
        f = 0.0
    if not f > 0 or f == 1.0:
        raise ValueError(
            f"{DEGRADE_FACTOR_ENV}={raw!r}: give a factor > 0 other than 1 (4: the served copy "
            "predicts four times the clicks)"
        )
    return f


def overpredicting_onnx(src: str | Path, dst: str | Path, factor: float) -> Path:
    """Write to ``dst`` the model of ``src`` with its probability output multiplied by
    ``factor`` and capped at :data:`CAP` (two nodes appended to the graph; the inputs, the
    output's name, type and shape unchanged, so Triton serves it as the same model).
    Deterministic: writing it again writes the same file."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from ctrstream import features

    model = onnx.load(str(src))
    g = model.graph
    out = next((o for o in g.output if o.name == features.OUTPUT_PROB), None)
    if out is None:
        raise ValueError(
            f"{src}: no output {features.OUTPUT_PROB!r} to degrade (outputs: "
            f"{[o.name for o in g.output]})"
        )
    inner = f"{features.OUTPUT_PROB}_undegraded"
    for node in g.node:
        node.output[:] = [inner if o == features.OUTPUT_PROB else o for o in node.output]
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array(factor, dtype=np.float32), "degrade_factor"),
            numpy_helper.from_array(np.array(CAP, dtype=np.float32), "degrade_cap"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("Mul", [inner, "degrade_factor"], ["degrade_scaled"]),
            helper.make_node("Min", ["degrade_scaled", "degrade_cap"], [features.OUTPUT_PROB]),
        ]
    )
    onnx.checker.check_model(model)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, dst)
    return dst


__all__ = [
    "CAP",
    "DEFAULT_DEGRADE_FACTOR",
    "DEGRADE_ENV",
    "DEGRADE_FACTOR_ENV",
    "degrade_factor",
    "degraded_cycle",
    "overpredicting_onnx",
]
