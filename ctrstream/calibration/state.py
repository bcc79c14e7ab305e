"""The calibration job's resumable state as plain data: msgspec structs, no code on load.

The learner of each model version (:class:`LearnerState`) and the job's join state and
Kafka positions (:class:`JobState`) are written to Redis as MessagePack of these structs
(:mod:`ctrstream.store.calibration`), never as Python objects: whatever a Redis value holds, decoding
it builds numbers, strings and lists, and every struct checks its own consistency
(``__post_init__``), so a malformed value is refused with a validation error naming the
field rather than run or half-loaded.

Every top-level state carries ``kind`` (what it is) and ``state_format`` (the layout);
:data:`STATE_FORMAT` changes whenever a field is added, removed or changes meaning, and a
value of another format is refused on load (the job says which key to delete).

River's ADWIN keeps its window in Rust; its own ``__getstate__`` is an opaque bincode
blob that panics on malformed input. :class:`AdwinState` is that window written out field
by field (:func:`adwin_state`), and :func:`adwin_blob` writes the blob back from a
validated :class:`AdwinState` only, so ADWIN's deserializer never sees a byte that did not
come from this module.
"""

from __future__ import annotations

import struct

import msgspec

STATE_FORMAT = 3  # of LearnerState and JobState; a different one is refused on load

LEARNER_KIND = "ctrstream.calibration.learner"
JOB_KIND = "ctrstream.calibration.job"

_MAX_ADWIN_LEVELS = 62  # a level holds buckets of 2**level examples (u64 in the Rust code)


class CalibrationConfigState(msgspec.Struct, forbid_unknown_fields=True):
    """:class:`ctrstream.calibration.calibrator.CalibrationConfig`, field for field."""

    method: str
    context: list[str]
    lr: float
    intercept_lr: float
    drift_boost: float
    drift_boost_examples: int
    avg_half_life: float
    window: int
    adwin_delta: float
    iso_bins: int
    iso_lo: float
    iso_hi: float
    iso_half_life: float
    iso_prior: float

    def __post_init__(self) -> None:
        if self.method not in ("platt", "isotonic"):
            raise ValueError(f"method must be 'platt' or 'isotonic', got {self.method!r}")
        if self.window < 1 or self.iso_bins < 1 or self.avg_half_life <= 0:
            raise ValueError("window, iso_bins and avg_half_life must be positive")
        if not 0 < self.adwin_delta < 1:
            raise ValueError(f"adwin_delta must lie in (0, 1), got {self.adwin_delta}")


class PlattState(msgspec.Struct, forbid_unknown_fields=True):
    """:class:`ctrstream.calibration.calibrator.PlattSGD`."""

    lr: float
    intercept_lr: float
    intercept: float
    weights: dict[str, float]
    lr_multiplier: float


class AdwinBucketState(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """One level of ADWIN's exponential histogram: ``current_idx`` summaries in use."""

    max_size: int
    current_idx: int
    totals: list[float]
    variances: list[float]


class AdwinState(msgspec.Struct, forbid_unknown_fields=True):
    """``river.drift.ADWIN``: its parameters, its window (``river``'s ``AdaptiveWindowing``,
    field for field) and whether its last update detected a drift."""

    delta: float
    clock: int
    max_buckets: int
    min_window_length: float
    grace_period: float
    total: float
    variance: float
    width: float
    total_width: float
    n_buckets: int
    max_n_buckets: int
    tick: int
    n_detections: int
    buckets: list[AdwinBucketState]
    drift_detected: bool

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise ValueError(f"ADWIN delta must lie in (0, 1), got {self.delta}")
        if not 1 <= self.clock < 2**31 or not 1 <= self.max_buckets < 2**16:
            raise ValueError("ADWIN clock and max_buckets must be positive")
        if not 1 <= len(self.buckets) <= _MAX_ADWIN_LEVELS:
            raise ValueError(f"ADWIN has 1 to {_MAX_ADWIN_LEVELS} levels, got {len(self.buckets)}")
        for i32 in (self.n_buckets, self.max_n_buckets, self.tick, self.n_detections):
            if not -(2**31) <= i32 < 2**31:
                raise ValueError(f"ADWIN counter {i32} out of range")
        cap = self.max_buckets + 1
        for level, b in enumerate(self.buckets):
            if b.max_size != self.max_buckets or len(b.totals) != cap or len(b.variances) != cap:
                raise ValueError(
                    f"ADWIN level {level}: {len(b.totals)} totals and {len(b.variances)} "
                    f"variances of size {b.max_size}, expected {cap} of size {self.max_buckets}"
                )
            if not 0 <= b.current_idx <= self.max_buckets:
                raise ValueError(f"ADWIN level {level}: {b.current_idx} summaries in use")
        if len(self.buckets) > 1 and self.buckets[-1].current_idx == 0:
            raise ValueError("ADWIN's oldest level is empty")
        held = sum(b.current_idx << level for level, b in enumerate(self.buckets))
        if held != self.width:
            raise ValueError(f"ADWIN's window of width {self.width} holds {held} examples")
        for name, v in (
            ("min_window_length", self.min_window_length),
            ("grace", self.grace_period),
        ):
            if v != int(v) or not 1 <= v < 2**31:
                raise ValueError(f"ADWIN {name} must be a positive integer, got {v}")


class LearnerState(msgspec.Struct, forbid_unknown_fields=True):
    """:class:`ctrstream.calibration.calibrator.VersionCalibrator`: the learner of one model
    version, its counters, drift detector, isotonic sums and rolling-metrics windows."""

    kind: str
    state_format: int
    model_version: str
    cfg: CalibrationConfigState
    platt: PlattState
    iso_n: list[float]  # decayed impressions per isotonic bin
    iso_clicks: list[float]  # decayed clicks per isotonic bin
    adwin: AdwinState
    n_seen: int
    n_clicks: int
    drift_events: list[dict[str, int | float | str]]
    last_event_time_ms: int
    boost_left: int
    ctx_mean: dict[str, float]
    avg: dict[str, float] | None  # the served average of the SGD iterates
    reset_avg: bool
    rolling: dict[str, list[float]]  # "raw", "platt", "iso", "y": the last `window` examples

    def __post_init__(self) -> None:
        bins = self.cfg.iso_bins
        if len(self.iso_n) != bins or len(self.iso_clicks) != bins:
            raise ValueError(
                f"{len(self.iso_n)} and {len(self.iso_clicks)} isotonic sums for {bins} bins"
            )
        if sorted(self.rolling) != ["iso", "platt", "raw", "y"]:
            raise ValueError(
                f"rolling windows raw, platt, iso, y expected, got {sorted(self.rolling)}"
            )
        lengths = {len(v) for v in self.rolling.values()}
        if len(lengths) != 1 or lengths.pop() > self.cfg.window:
            raise ValueError(
                f"rolling windows of lengths {[len(v) for v in self.rolling.values()]} "
                f"(equal, at most {self.cfg.window}, expected)"
            )
        if self.n_seen < 0 or self.n_clicks < 0 or self.n_clicks > self.n_seen:
            raise ValueError(f"{self.n_clicks} clicks in {self.n_seen} examples")
        if abs(self.adwin.delta - self.cfg.adwin_delta) > 0:
            raise ValueError("the drift detector's delta differs from the configuration's")


class JobState(msgspec.Struct, forbid_unknown_fields=True):
    """:class:`ctrstream.calibration.job.JoinState`: the unmatched predictions and labels,
    the recently joined ids, both watermarks and the Kafka positions, in order (oldest
    first: expiry and the caps evict from the front)."""

    kind: str
    state_format: int
    preds: list[tuple[str, str, float, int]]  # impression id, model version, raw, event time
    labels: list[tuple[str, int, int, int, str]]  # id, clicked, event time, position, device
    done: list[str]
    pred_watermark: int
    label_watermark: int
    offsets: list[tuple[str, int, int]]  # topic, partition, next offset

    def __post_init__(self) -> None:
        for t, p, off in self.offsets:
            if p < 0 or off < 0:
                raise ValueError(f"Kafka position {t}[{p}]@{off} is negative")


# --------------------------------------------------------------------------- ADWIN's window

_ADWIN_HEAD = struct.Struct("<di Q dd dddd iiii Q")
_BUCKET_HEAD = struct.Struct("<QQ")
_U64 = struct.Struct("<Q")
# the Python binding's copy of the constructor's arguments, after the window
_ADWIN_TAIL = struct.Struct("<di Q ii")


def _floats(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}d")


def adwin_state(blob: bytes, drift_detected: bool) -> AdwinState:
    """``AdaptiveWindowing.__getstate__()`` (river's bincode of its Rust struct) read into an
    :class:`AdwinState`. Raises ``ValueError`` when the layout is not the one this module
    knows (another river version: pin it, or extend this reader)."""
    try:
        (
            delta,
            clock,
            max_buckets,
            min_wl,
            grace,
            total,
            variance,
            width,
            total_width,
            n_buckets,
            max_n_buckets,
            tick,
            n_detections,
            levels,
        ) = _ADWIN_HEAD.unpack_from(blob, 0)
        pos = _ADWIN_HEAD.size
        buckets = []
        for _ in range(levels):
            max_size, current_idx = _BUCKET_HEAD.unpack_from(blob, pos)
            pos += _BUCKET_HEAD.size
            arrays = []
            for _ in range(2):
                (n,) = _U64.unpack_from(blob, pos)
                pos += _U64.size
                arrays.append(list(_floats(n).unpack_from(blob, pos)))
                pos += 8 * n
            buckets.append(AdwinBucketState(max_size, current_idx, arrays[0], arrays[1]))
        tail = _ADWIN_TAIL.unpack_from(blob, pos)
        pos += _ADWIN_TAIL.size
    except struct.error as e:
        raise ValueError(f"river's ADWIN state has an unknown layout: {e}") from e
    if tail != (delta, clock, max_buckets, int(min_wl), int(grace)):
        raise ValueError(f"river's ADWIN state has an unknown layout (arguments {tail})")
    if pos != len(blob):
        raise ValueError(
            f"river's ADWIN state has an unknown layout ({len(blob) - pos} bytes left)"
        )
    return AdwinState(
        delta,
        clock,
        max_buckets,
        min_wl,
        grace,
        total,
        variance,
        width,
        total_width,
        n_buckets,
        max_n_buckets,
        tick,
        n_detections,
        buckets,
        drift_detected,
    )


def adwin_blob(s: AdwinState) -> bytes:
    """The ``AdaptiveWindowing.__setstate__`` bytes of a validated :class:`AdwinState`."""
    parts = [
        _ADWIN_HEAD.pack(
            s.delta,
            s.clock,
            s.max_buckets,
            s.min_window_length,
            s.grace_period,
            s.total,
            s.variance,
            s.width,
            s.total_width,
            s.n_buckets,
            s.max_n_buckets,
            s.tick,
            s.n_detections,
            len(s.buckets),
        )
    ]
    for b in s.buckets:
        parts.append(_BUCKET_HEAD.pack(b.max_size, b.current_idx))
        for arr in (b.totals, b.variances):
            parts.append(_U64.pack(len(arr)))
            parts.append(_floats(len(arr)).pack(*arr))
    parts.append(
        _ADWIN_TAIL.pack(
            s.delta, s.clock, s.max_buckets, int(s.min_window_length), int(s.grace_period)
        )
    )
    return b"".join(parts)


__all__ = [
    "JOB_KIND",
    "LEARNER_KIND",
    "STATE_FORMAT",
    "AdwinBucketState",
    "AdwinState",
    "CalibrationConfigState",
    "JobState",
    "LearnerState",
    "PlattState",
    "adwin_blob",
    "adwin_state",
]
