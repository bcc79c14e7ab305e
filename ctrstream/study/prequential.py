"""The project's online calibrator run as the calibration job runs it, on a study's rows.

:func:`calibrate_prequential` replays one model's raw scores through a fresh
:class:`ctrstream.calibration.calibrator.Calibrator` in event time: every row is predicted
with the parameters the calibrator had at the row's time, having learned only the rows whose
labels were final by then (``t_j + window_ms <= t``, the join's attribution window). It is
what serving with the calibration job in the loop would have returned (predict, then learn
once the label is known), without Kafka or Redis. Labels arrive in steps of ``step_ms`` (the
job's micro-batches): a label may reach the calibrator up to one step later than it could.
"""

from __future__ import annotations

import numpy as np

from ctrstream.calibration.calibrator import CalibrationConfig, Calibrator

STEP_MS = 60_000


def calibrate_prequential(
    raw: np.ndarray,
    t: np.ndarray,
    labels: np.ndarray,
    window_ms: int,
    *,
    step_ms: int = STEP_MS,
    cfg: CalibrationConfig | None = None,
) -> np.ndarray:
    """Calibrated probabilities of ``raw`` (rows sorted by ``t``), each predicted before any
    label that was not final at its time was learned (see the module docstring)."""
    raw = np.asarray(raw, dtype=np.float64)
    t = np.asarray(t, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.float64)
    if not (len(raw) == len(t) == len(labels)):
        raise ValueError(f"{len(raw)} scores, {len(t)} times, {len(labels)} labels: give one each")
    if len(t) and np.any(np.diff(t) < 0):
        raise ValueError("rows must be sorted by event time (StudyData rows are)")
    if step_ms <= 0 or window_ms < 0:
        raise ValueError(f"need step_ms > 0 and window_ms >= 0, got {step_ms}, {window_ms}")
    out = np.empty(len(raw))
    if len(raw) == 0:
        return out
    cal = Calibrator(cfg)
    ready = t + int(window_ms)  # when each row's label is final (sorted, as t is)
    learned = 0
    t0 = int(t[0])
    starts = np.arange(t0, int(t[-1]) + step_ms, step_ms, dtype=np.int64)
    bounds = np.searchsorted(t, starts, side="left")
    for k, s in enumerate(starts):
        lo = int(bounds[k])
        hi = int(bounds[k + 1]) if k + 1 < len(bounds) else len(t)
        # learn every label final by the step's start, then serve the step's rows
        upto = int(np.searchsorted(ready, s, side="right"))
        if upto > learned:
            cal.learn_many(raw[learned:upto], labels[learned:upto], event_time_ms=t[learned:upto])
            learned = upto
        if hi > lo:
            out[lo:hi] = cal.predict_many(raw[lo:hi])
    return out


__all__ = ["calibrate_prequential", "STEP_MS"]
