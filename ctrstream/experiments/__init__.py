"""Online experiments: definitions, the traffic split, the statistics, and a file store.

Pure maths and files (layer 1: imports only ``ctrstream.config`` and ``ctrstream.metrics``
of ctrstream; no Kafka, Redis or Triton), so the closed loop, the CLI and the tests share one
implementation:

* :mod:`.design` - :class:`Arm`, :class:`Guardrails`, :class:`Experiment` (every default);
* :mod:`.assignment` - :func:`assign`: a salted hash of the user id picks the arm;
* :mod:`.stats` - delta method over users, CUPED, the mSPRT (always-valid p-values and
  confidence sequences), the SRM chi-square test;
* :mod:`.analysis` - :class:`ArmData` (per-user aggregates), :func:`analyze` ->
  :class:`Report`, :class:`SequentialState`;
* :mod:`.registry` - :class:`Registry`: definitions, status and sequential state on disk.
"""

from __future__ import annotations

from .analysis import (
    ArmData,
    ArmStats,
    Breach,
    Comparison,
    Estimate,
    Report,
    SequentialState,
    Srm,
    analyze,
    arm_data,
)
from .assignment import assign
from .design import DEFAULT_TAU, Arm, Experiment, Guardrails
from .registry import ExperimentExists, ExperimentRecord, Registry, UnknownExperiment

__all__ = [
    "DEFAULT_TAU",
    "Arm",
    "ArmData",
    "ArmStats",
    "Breach",
    "Comparison",
    "Estimate",
    "Experiment",
    "ExperimentExists",
    "ExperimentRecord",
    "Guardrails",
    "Registry",
    "Report",
    "SequentialState",
    "Srm",
    "UnknownExperiment",
    "analyze",
    "arm_data",
    "assign",
]
