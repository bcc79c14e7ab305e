"""The calibration state in Redis: the calibration job's checkpoints and the served parameters.

Calibrators are keyed by a **calibrator id** (:func:`ctrstream.store.layout.calibrator_id`:
``{model_name}@{version}``, or the bare version for predictions that name no model); the
``model_version`` arguments below are such ids, ``v`` in the keys is one.

Keys (built by :mod:`ctrstream.store.layout`):

* ``cal_key(v)`` - HASH: ``version`` (counter, +1 per checkpoint of ``v``), ``params``
  (JSON, the served parameter dump of ``ctrstream.calibration.params``), ``metrics`` (JSON,
  the rolling metrics), ``updated_ms``;
* ``cal_state_key(v)`` - STRING: MessagePack of the version's learner state, to resume the
  job;
* ``cal_history_key(v)`` - LIST of JSON metric snapshots (the last :data:`HISTORY_CAP`);
* ``cal_drift_key(v)`` - LIST of JSON drift events (the last :data:`DRIFT_CAP`);
* ``CAL_VERSIONS_KEY`` - SET of the calibrator ids with a calibrator;
* ``CAL_SEQ_KEY`` - STRING counter, +1 on every checkpoint of any version: the one ``GET``
  a reader (:class:`ServedParams`) does to know when to reload;
* ``cal_job_key(name)`` - STRING: MessagePack of a job's join state and Kafka positions.

A checkpoint writes all of it in one ``MULTI``/``EXEC`` (:meth:`CalibrationStore.checkpoint`),
so a resumed job finds its learners, its join state and its Kafka positions from the same
instant. The states are data, never code: msgspec structs (their types are the caller's,
:mod:`ctrstream.calibration.state`) encoded as MessagePack. Loading one decodes numbers,
strings and lists into the given struct type and validates it; whatever another program
wrote at the key (a serialized Python object, a state of another format, garbage) is
refused with :class:`CalibrationStateError`, which names the key and what to do. Nothing
stored is ever turned into code.
JSON values are written with NaN/inf as ``null``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec

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


S = TypeVar("S", bound=msgspec.Struct)
T = TypeVar("T")


class _Header(msgspec.Struct):
    """The two fields read before anything else (the rest is ignored here)."""

    kind: str | None = None
    state_format: int | None = None


@dataclass(frozen=True)
class StateCodec(Generic[S, T]):
    """How a resumed state is read: its struct ``type`` (a msgspec struct whose ``kind`` and
    ``state_format`` fields must equal ``kind`` and ``format``) and ``build``, which turns a
    decoded struct into the live object (raising ``ValueError`` or ``TypeError`` when the
    struct is consistent but not usable)."""

    type: type[S]
    build: Callable[[S], T]
    kind: str
    format: int


def encode_state(state: msgspec.Struct) -> bytes:
    """MessagePack of a state struct (what :meth:`CalibrationStore.checkpoint` stores)."""
    return msgspec.msgpack.encode(state)


def decode_state(blob: bytes, codec: StateCodec[S, T], key: str, what: str) -> T:
    """The live object of a stored state; :class:`CalibrationStateError` naming ``key`` and
    the way out when the value is not such a state. Never runs code from ``blob``."""
    kind, fmt = codec.kind, codec.format

    def refuse(why: str) -> CalibrationStateError:
        return CalibrationStateError(
            f"cannot load {what} from Redis key {key!r}: {why}. Nothing in it was run. "
            f"Start the job under another name (--job-name), or delete the key "
            f"(redis-cli DEL {key}) to start that state afresh."
        )

    try:
        head = msgspec.msgpack.decode(blob, type=_Header)
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        raise refuse(
            f"not a ctrstream state (no MessagePack map with kind and state_format: {e}; "
            f"a serialized Python object or another program's value)"
        ) from e
    if head.kind != kind:
        raise refuse(f"it holds {head.kind!r}, not {kind!r}")
    if head.state_format != fmt:
        raise refuse(
            f"a state of format {head.state_format}, this ctrstream reads format {fmt}: it was "
            f"written by another version of ctrstream"
        )
    try:
        state = msgspec.msgpack.decode(blob, type=codec.type)
        return codec.build(state)
    except (msgspec.DecodeError, ValueError, TypeError) as e:
        raise refuse(f"invalid {kind} state: {e}") from e


@dataclass
class VersionCheckpoint:
    """What a checkpoint writes for one model version."""

    model_version: str
    state: msgspec.Struct  # the version's learner, as data (``kind``, ``state_format``)
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
        job_state: msgspec.Struct,
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
            pipe.set(cal_state_key(mv), encode_state(v.state))
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
        pipe.set(cal_job_key(job_name), encode_state(job_state))
        pipe.incr(CAL_SEQ_KEY)
        pipe.execute()

    def resume(
        self, job_name: str, job: StateCodec[Any, Any], learner: StateCodec[Any, Any]
    ) -> Resumed:
        """The job's state and every version's learner, as the last checkpoint left them,
        decoded with the ``job`` and ``learner`` codecs.

        Raises :class:`CalibrationStateError` naming the key when a state cannot be loaded
        (written by an incompatible ctrstream, or not a calibration state at all)."""
        job_state = self._load(
            cal_job_key(job_name), job, f"the state of calibration job {job_name!r}"
        )
        versions = {}
        for raw in sorted(self.r.smembers(CAL_VERSIONS_KEY)):
            mv = _text(raw)
            state = self._load(
                cal_state_key(mv), learner, f"the calibrator of model version {mv!r}"
            )
            if state is not None:
                versions[mv] = state
        return Resumed(job_state, versions)

    def _load(self, key: str, codec: StateCodec[Any, Any], what: str) -> Any | None:
        blob = self.r.get(key)
        if not blob:
            return None
        return decode_state(blob, codec, key, what)

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
    "StateCodec",
    "VersionCheckpoint",
    "decode_state",
    "dumps",
    "encode_state",
]
