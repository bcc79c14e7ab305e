"""The serving side of calibration: apply each model version's latest served parameters.

Calibrators are per model name and version (:mod:`ctrstream.calibration.ids`): pass the
answering model's name (``model_name``, its published base name or Triton name) with the
version; without a name the version alone selects, as for predictions that carry none.

The scorer and the prediction API hold one :class:`CalibratorClient`. It reads the parameter
dumps that the calibration job checkpoints (through the store's
:class:`ctrstream.store.calibration.ServedParams`: one cheap ``GET`` per
``check_interval_s``, a reload only when a new checkpoint landed, no restart) and applies
them with numpy (:func:`ctrstream.calibration.params.apply_params`). Redis being down is not
an error: the last parameters, or the identity, keep being applied.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ctrstream.calibration.ids import calibrator_of
from ctrstream.calibration.params import Context, Params, apply_params
from ctrstream.config import Settings
from ctrstream.store.calibration import ServedParams


class CalibratorClient:
    """Applies the latest checkpointed calibrator of each model version.

    ``redis_client``: a redis-py client to read from (default: one for ``settings``, or the
    process' settings, with 0.5 s socket timeouts so that a dead Redis costs little)."""

    def __init__(
        self,
        settings: Settings | None = None,
        redis_client: Any = None,
        check_interval_s: float = 1.0,
    ):
        if redis_client is None:
            from ctrstream.config import get_settings
            from ctrstream.store.connection import redis_client as connect

            redis_client = connect(settings or get_settings(), timeout_s=0.5)
        self._served = ServedParams(redis_client, check_interval_s)

    @property
    def reloads(self) -> int:
        """How many times parameter dumps were (re-)read from Redis."""
        return self._served.reloads

    def params(self, model_version: str, model_name: str = "") -> Params | None:
        """The served parameter dump of ``model_name`` version ``model_version`` (None: the
        identity)."""
        return self._served.get(calibrator_of(model_name, model_version))

    def calibrate(
        self,
        raw_scores: ArrayLike,
        model_version: str,
        context: Context | None = None,
        model_name: str = "",
    ) -> NDArray[np.float64]:
        """Calibrated probabilities of ``raw_scores`` answered by ``model_name`` version
        ``model_version`` (``model_name`` "": the calibrator of the bare version)."""
        return apply_params(self.params(model_version, model_name), raw_scores, context)


__all__ = ["CalibratorClient"]
