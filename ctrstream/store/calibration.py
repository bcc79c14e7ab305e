"""The calibration state in Redis: the calibration job's checkpoints and the served parameters.

Keys (built by :mod:`ctrstream.store.layout`):

* ``cal_key(v)`` - HASH: ``version`` (counter, +1 per checkpoint of ``v``), ``params``
  (JSON, the served parameter dump of ``ctrstream.calibration.params``), ``metrics`` (JSON,
  the rolling metrics), ``updated_ms``;
* ``cal_state_key(v)`` - STRING: pickle of the version's learner, to resume the job;
* ``cal_history_key(v)`` - LIST of JSON metric snapshots (the last :data:`HISTORY_CAP`);
* ``cal_drift_key(v)`` - LIST of JSON drift events (the last :data:`DRIFT_CAP`);
* ``CAL_VERSIONS_KEY`` - SET of the model versions with a calibrator;
* ``CAL_SEQ_KEY`` - STRING counter, +1 on every checkpoint of any version: the one ``GET``
  a reader (:class:`ServedParams`) does to know when to reload;
* ``cal_job_key(name)`` - STRING: pickle of a job's join state and Kafka positions.

A checkpoint writes all of it in one ``MULTI``/``EXEC`` (:meth:`CalibrationStore.checkpoint`),
so a resumed job finds its learners, its join state and its Kafka positions from the same
instant. The learners and the join state are stored with ``pickle``, which runs code on
load: only a trusted Redis may hold them (hardening is tracked as its own issue).
JSON values are written with NaN/inf as ``null``.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ctrstream.config import Settings
from ctrstream.store.connection import redis_client
from ctrstream.store.layout import (
    CAL_SEQ_KEY,
    CAL_VERSIONS_KEY,
    cal_drift_key,
    cal_history_key,
    cal_job_key,
    cal_key,
    cal_state_key,
)

HISTORY_CAP = 2000  # metric snapshots kept per model version
DRIFT_CAP = 500  # drift events kept per model version


class CalibrationStateError(RuntimeError):
    """A stored calibration state could not be loaded."""


def _finite(d: Any) -> Any:
    """JSON-safe copy (NaN and inf -> None)."""
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_finite(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d


def dumps(obj: Any) -> str:
    """JSON of ``obj`` with NaN and inf written as ``null``."""
    return json.dumps(_finite(obj))


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


@dataclass
class VersionCheckpoint:
    """What a checkpoint writes for one model version."""

    model_version: str
    state: Any  # the version's learner (pickled)
    params: dict[str, Any]  # the served parameter dump
    metrics: dict[str, Any]  # the rolling metrics
    snapshot: dict[str, Any]  # appended to the history
    drift_events: list[dict[str, Any]] = field(default_factory=list)  # new since the last one


@dataclass
class Resumed:
    """What :meth:`CalibrationStore.resume` found: the job's own state (None: a new job) and
    the learner of every model version with a calibrator."""

    job_state: Any | None
    versions: dict[str, Any]


class CalibrationStore:
    """Reads and writes the calibration state of every model version (one redis-py client)."""

    def __init__(self, client: Any):
        self.r = client

    @classmethod
    def from_settings(cls, settings: Settings, timeout_s: float = 30.0) -> CalibrationStore:
        return cls(redis_client(settings, timeout_s=timeout_s))

    # -- the job's checkpoint

    def checkpoint(
        self,
        job_name: str,
        job_state: Any,
        versions: Iterable[VersionCheckpoint],
        now_ms: int | None = None,
    ) -> None:
        """Write the versions' learners, parameters, metrics, history and new drift events and
        the job's state in one transaction, then announce it (``CAL_SEQ_KEY`` + 1)."""
        now = int(time.time() * 1000) if now_ms is None else int(now_ms)
        pipe = self.r.pipeline(transaction=True)
        for v in versions:
            mv = v.model_version
            k = cal_key(mv)
            pipe.set(cal_state_key(mv), pickle.dumps(v.state, protocol=pickle.HIGHEST_PROTOCOL))
            pipe.hset(
                k,
                mapping={"params": dumps(v.params), "metrics": dumps(v.metrics), "updated_ms": now},
            )
            pipe.hincrby(k, "version", 1)
            pipe.rpush(cal_history_key(mv), dumps({"t_ms": now, **v.snapshot}))
            pipe.ltrim(cal_history_key(mv), -HISTORY_CAP, -1)
            if v.drift_events:
                pipe.rpush(cal_drift_key(mv), *[json.dumps(e) for e in v.drift_events])
                pipe.ltrim(cal_drift_key(mv), -DRIFT_CAP, -1)
            pipe.sadd(CAL_VERSIONS_KEY, mv)
        pipe.set(cal_job_key(job_name), pickle.dumps(job_state, protocol=pickle.HIGHEST_PROTOCOL))
        pipe.incr(CAL_SEQ_KEY)
        pipe.execute()

    def resume(self, job_name: str) -> Resumed:
        """The job's state and every version's learner, as the last checkpoint left them.

        Raises :class:`CalibrationStateError` naming the key when a state cannot be loaded
        (written by an incompatible ctrstream, or not a calibration state)."""
        job_state = self._load(cal_job_key(job_name), f"the state of calibration job {job_name!r}")
        versions = {}
        for raw in sorted(self.r.smembers(CAL_VERSIONS_KEY)):
            mv = _text(raw)
            state = self._load(cal_state_key(mv), f"the calibrator of model version {mv!r}")
            if state is not None:
                versions[mv] = state
        return Resumed(job_state, versions)

    def _load(self, key: str, what: str) -> Any | None:
        blob = self.r.get(key)
        if not blob:
            return None
        try:
            return pickle.loads(blob)
        except Exception as e:  # unpickling can fail in many ways; all mean the same here
            raise CalibrationStateError(
                f"cannot load {what} from Redis key {key!r}: {type(e).__name__}: {e}. "
                f"Start the job under another name (--job-name), or delete the key "
                f"(redis-cli DEL {key}) to start that state afresh."
            ) from e

    # -- what was written

    def versions(self) -> list[str]:
        """The model versions with a calibrator, sorted."""
        return sorted(_text(v) for v in self.r.smembers(CAL_VERSIONS_KEY))

    def _json_field(self, model_version: str, name: str) -> Any | None:
        raw = self.r.hget(cal_key(model_version), name)
        return json.loads(raw) if raw else None

    def params(self, model_version: str) -> dict[str, Any] | None:
        """The served parameter dump of ``model_version`` (None: no calibrator)."""
        return self._json_field(model_version, "params")

    def metrics(self, model_version: str) -> dict[str, Any] | None:
        """The rolling metrics of the last checkpoint of ``model_version``."""
        return self._json_field(model_version, "metrics")

    def checkpoints(self, model_version: str) -> int:
        """How many checkpoints wrote ``model_version`` (0: none)."""
        return int(self.r.hget(cal_key(model_version), "version") or 0)

    def history(self, model_version: str) -> list[dict[str, Any]]:
        """The metric snapshots of ``model_version``, oldest first."""
        return [json.loads(s) for s in self.r.lrange(cal_history_key(model_version), 0, -1)]

    def drift_events(self, model_version: str) -> list[dict[str, Any]]:
        """The drift events of ``model_version``, oldest first."""
        return [json.loads(s) for s in self.r.lrange(cal_drift_key(model_version), 0, -1)]

    def has_job(self, job_name: str) -> bool:
        """Whether job ``job_name`` has checkpointed."""
        return bool(self.r.exists(cal_job_key(job_name)))

    # -- serving side

    def seq(self) -> bytes | None:
        """The checkpoint counter that readers compare (None: nothing written yet)."""
        value: bytes | None = self.r.get(CAL_SEQ_KEY)
        return value

    def announce(self) -> None:
        """Tell readers to reload (what every checkpoint does last)."""
        self.r.incr(CAL_SEQ_KEY)

    def publish_params(self, model_version: str, params: dict[str, Any]) -> None:
        """Serve ``params`` for ``model_version`` without a learner behind it (a fixed
        calibration, tests) and announce it."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            cal_key(model_version),
            mapping={"params": dumps(params), "updated_ms": int(time.time() * 1000)},
        )
        pipe.hincrby(cal_key(model_version), "version", 1)
        pipe.incr(CAL_SEQ_KEY)
        pipe.execute()


class ServedParams:
    """The latest served parameter dump of each model version asked for, kept fresh cheaply.

    At most every ``check_interval_s`` one ``GET`` of the checkpoint counter; only when it
    changed are the dumps of the cached versions re-read (one pipeline). A version asked
    for the first time is read at once. Redis being down is not an error: the last dumps
    (or None, the identity) keep being returned.
    """

    def __init__(self, client: Any, check_interval_s: float = 1.0):
        self.r = client
        self.check_interval_s = check_interval_s
        self._params: dict[str, dict[str, Any] | None] = {}
        self._seq: bytes | None = None
        self._checked = 0.0
        self.reloads = 0  # how many times dumps were (re-)read

    def _refresh(self, model_version: str) -> None:
        now = time.monotonic()
        missing = model_version not in self._params
        if not missing and now - self._checked < self.check_interval_s:
            return
        try:
            seq = self.r.get(CAL_SEQ_KEY)
            self._checked = now
            if seq != self._seq or missing:
                versions = list(self._params) if seq != self._seq else []
                if missing:
                    versions.append(model_version)
                pipe = self.r.pipeline(transaction=False)
                for v in versions:
                    pipe.hget(cal_key(v), "params")
                for v, raw in zip(versions, pipe.execute()):
                    self._params[v] = json.loads(raw) if raw else None
                self._seq = seq
                self.reloads += 1
        except Exception:  # noqa: BLE001 - Redis down: keep what we have
            self._params.setdefault(model_version, None)

    def get(self, model_version: str) -> dict[str, Any] | None:
        """The served parameter dump of ``model_version`` (None: none, or Redis never
        answered)."""
        self._refresh(model_version)
        return self._params.get(model_version)


__all__ = [
    "DRIFT_CAP",
    "HISTORY_CAP",
    "CalibrationStateError",
    "CalibrationStore",
    "Resumed",
    "ServedParams",
    "VersionCheckpoint",
    "dumps",
]
