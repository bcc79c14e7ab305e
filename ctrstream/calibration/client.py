"""The serving side of calibration: apply each model version's latest served parameters.

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

    def params(self, model_version: str) -> Params | None:
        """The served parameter dump of ``model_version`` (None: the identity)."""
        return self._served.get(model_version)

    def calibrate(
        self, raw_scores: ArrayLike, model_version: str, context: Context | None = None
    ) -> NDArray[np.float64]:
        """Calibrated probabilities of ``raw_scores`` answered by ``model_version``."""
        return apply_params(self.params(model_version), raw_scores, context)


__all__ = ["CalibratorClient"]
