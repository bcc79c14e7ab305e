"""Which calibrator a prediction belongs to: its model's published base name and version.

Two models' version 1 (``ctr_lr`` v1 and ``ctr_deep`` v1, served side by side in an
experiment) must learn into two calibrators, so calibration state is keyed by the model name
and version (:func:`ctrstream.store.layout.calibrator_id`: ``ctr_lr@1``). The name is the
published base name whichever Triton flavour served it (``ctr_lr_py`` -> ``ctr_lr``: both
flavours of a version are the same ONNX file); a prediction without a name (records written
before predictions carried one) keys by its version alone, as it always did.
"""

from __future__ import annotations

from ctrstream.models.publish import base_model_name
from ctrstream.store.layout import calibrator_id, parse_calibrator_id


def calibrator_of(model_name: str, model_version: str) -> str:
    """The calibrator id of a prediction of ``model_name`` (either flavour's Triton name, or
    "") version ``model_version``; ``ValueError`` when the name cannot be part of an id."""
    return calibrator_id(base_model_name(model_name) if model_name else "", model_version)


def metric_labels(cal_id: str) -> tuple[str, str]:
    """``(model, model_version)``: the Prometheus labels of a calibrator's metrics."""
    return parse_calibrator_id(cal_id)


__all__ = ["calibrator_of", "metric_labels"]
