"""``ctrstream calibrate``: join predictions with labels and train the calibrators.

Reads the ``predictions`` topic (``Prediction``) and the ``labeled`` topic (``Labeled``) in
micro-batches (``Consumer.consume(num_messages=...)``), joins them by impression id (either
side may arrive first) and feeds each joined (raw score, clicked, context) to the
``VersionCalibrator`` of the prediction's model name and version
(``ctrstream.calibration.calibrator``; keyed by :func:`ctrstream.calibration.ids.calibrator_of`,
``ctr_lr@1`` - a prediction without a model name keys by its version alone, as before).
Degraded predictions (Triton's fallback score, no model version) are not learned from.

Join state is bounded: an unmatched prediction is dropped once the label stream's event
time has passed it by ``retention_ms`` (its label is not coming: the attribution window
closed long ago), an unmatched label once the prediction stream has passed it by as much,
and either side is capped at ``max_pending`` entries (oldest evicted first). Every drop is
counted (``ctrstream_calibration_join_dropped_total{side, why}``, ``why`` one of expired,
capped, degraded - a fallback score, not learned from - and duplicate), so joined + dropped
predictions always add up to the predictions read.

Exactly-once state: the job assigns itself every partition of both topics (one instance
per deployment: the calibrators are tiny, one process keeps up with the stream) and keeps
its Kafka positions in its own checkpoint. A checkpoint - the versions' learners, the
served parameters, the join state and the positions - is written to Redis in one
transaction every ``checkpoint_interval_s`` (``ctrstream.store.calibration``); a restarted
job resumes from exactly that point.

Bad records: a record of either topic that does not decode (whatever its bytes raise), a
prediction whose raw score is not a probability or a label whose ``clicked`` is not 0/1 is
counted (``ctrstream_calibration_bad_records_total``) and written to ``dlq`` (connector
name ``calibrate``, ``ctrstream.kafka.deadletters``); its dead letters are acknowledged
before the checkpoint that moves past it.

The gauges (``ctrstream_calibration_logloss`` / ``_mean_pred`` / ``_observed_ctr`` /
``_ece``) are the calibrators' rolling metrics, ``ctrstream.metrics.summary`` - the same
definitions as the model card and the demo's report; labelled by ``model`` (the base name,
"" for predictions without one) and ``model_version``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ctrstream.calibration.calibrator import CalibrationConfig, VersionCalibrator
from ctrstream.calibration.ids import calibrator_of, metric_labels
from ctrstream.calibration.state import (
    JOB_KIND,
    LEARNER_KIND,
    STATE_FORMAT,
    JobState,
    LearnerState,
)
from ctrstream.store.calibration import CalibrationStore, StateCodec, VersionCheckpoint

log = logging.getLogger("ctrstream.calibrate")

CONTEXT_FIELDS = ("position", "device_type")


# --------------------------------------------------------------------------- Prometheus

_METRICS = None


def _metrics():
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Gauge

        _METRICS = {
            "joined": Counter(
                "ctrstream_calibration_joined_total",
                "(prediction, label) pairs learned from",
                ["model", "model_version"],
            ),
            "dropped": Counter(
                "ctrstream_calibration_join_dropped_total",
                "unmatched join entries dropped",
                ["side", "why"],
            ),
            "bad": Counter(
                "ctrstream_calibration_bad_records_total",
                "records that could not be decoded",
                ["topic"],
            ),
            "pending": Gauge(
                "ctrstream_calibration_join_pending", "unmatched join entries held", ["side"]
            ),
            "drift": Counter(
                "ctrstream_calibration_drift_total",
                "drift detections (ADWIN on the residual)",
                ["model", "model_version"],
            ),
            "logloss": Gauge(
                "ctrstream_calibration_logloss",
                "rolling log loss",
                ["model", "model_version", "score"],
            ),
            "mean_pred": Gauge(
                "ctrstream_calibration_mean_pred",
                "rolling mean predicted CTR",
                ["model", "model_version", "score"],
            ),
            "observed": Gauge(
                "ctrstream_calibration_observed_ctr",
                "rolling observed CTR",
                ["model", "model_version"],
            ),
            "ece": Gauge(
                "ctrstream_calibration_ece",
                "rolling expected calibration error",
                ["model", "model_version", "score"],
            ),
            "checkpoints": Counter(
                "ctrstream_calibration_checkpoints_total", "checkpoints written to Redis"
            ),
        }
    return _METRICS


def _set_gauges(m: dict) -> None:
    g = _metrics()
    name, mv = metric_labels(m["model_version"])  # the calibrator id
    for score in ("raw", "platt", "iso"):
        s = m[score]
        if s["n"]:
            g["logloss"].labels(name, mv, score).set(s["log_loss"])
            g["mean_pred"].labels(name, mv, score).set(s["mean_pred"])
            g["ece"].labels(name, mv, score).set(s["ece"])
    if m["raw"]["n"]:
        g["observed"].labels(name, mv).set(m["raw"]["observed_ctr"])


# --------------------------------------------------------------------------- the join + learner


@dataclass
class JoinState:
    # id -> (calibrator id, raw, event_time_ms)
    preds: OrderedDict = field(default_factory=OrderedDict)
    labels: OrderedDict = field(default_factory=OrderedDict)  # id -> (clicked, t, position, device)
    done: OrderedDict = field(default_factory=OrderedDict)  # recently joined ids (dedup)
    pred_watermark: int = 0
    label_watermark: int = 0
    offsets: dict = field(default_factory=dict)  # (topic, partition) -> next offset

    def to_state(self) -> JobState:
        """The join state as plain data (:mod:`ctrstream.calibration.state`), in order."""
        return JobState(
            kind=JOB_KIND,
            state_format=STATE_FORMAT,
            preds=[(iid, mv, float(raw), int(t)) for iid, (mv, raw, t) in self.preds.items()],
            labels=[
                (iid, int(c), int(t), int(pos), str(dev))
                for iid, (c, t, pos, dev) in self.labels.items()
            ],
            done=list(self.done),
            pred_watermark=int(self.pred_watermark),
            label_watermark=int(self.label_watermark),
            offsets=[(t, int(p), int(off)) for (t, p), off in self.offsets.items()],
        )

    @classmethod
    def from_state(cls, state: JobState) -> JoinState:
        """The join state :meth:`to_state` wrote."""
        return cls(
            preds=OrderedDict((iid, (mv, raw, t)) for iid, mv, raw, t in state.preds),
            labels=OrderedDict((iid, (c, t, pos, dev)) for iid, c, t, pos, dev in state.labels),
            done=OrderedDict.fromkeys(state.done),
            pred_watermark=state.pred_watermark,
            label_watermark=state.label_watermark,
            offsets={(t, p): off for t, p, off in state.offsets},
        )


# how the job's checkpoints are read back (data only: see ctrstream.store.calibration)
JOB_CODEC: StateCodec[JobState, JoinState] = StateCodec(
    JobState, JoinState.from_state, JOB_KIND, STATE_FORMAT
)
LEARNER_CODEC: StateCodec[LearnerState, VersionCalibrator] = StateCodec(
    LearnerState, VersionCalibrator.from_state, LEARNER_KIND, STATE_FORMAT
)


class Calibrate:
    """The job's logic without Kafka: ``process(predictions, labeled)`` then ``checkpoint()``."""

    def __init__(
        self,
        settings,
        cfg: CalibrationConfig | None = None,
        store: CalibrationStore | None = None,
        job_name: str = "calibrate",
        retention_ms: int | None = None,
        max_pending: int = 1_000_000,
        resume: bool = True,
    ):
        self.settings = settings
        self.cfg = cfg or CalibrationConfig()
        self.store = store or CalibrationStore.from_settings(settings)
        self.job_name = job_name
        self.retention_ms = (
            retention_ms
            if retention_ms is not None
            else int(2 * settings.allowed_lateness_s * 1000 + 5 * 60_000)
        )
        self.max_pending = max_pending
        self.cals: dict[str, VersionCalibrator] = {}
        self.state = JoinState()
        self._dirty: set[str] = set()
        self._drift_new: dict[str, list] = {}
        self.n_joined = 0
        self.dropped = {
            "pred_expired": 0,
            "label_expired": 0,
            "pred_capped": 0,
            "label_capped": 0,
            "duplicate": 0,
            "degraded": 0,
        }
        if resume:
            self._resume()

    # -- state
    def _resume(self) -> None:
        found = self.store.resume(self.job_name, JOB_CODEC, LEARNER_CODEC)
        if found.job_state is not None:
            self.state = found.job_state
        self.cals.update(found.versions)

    def calibrator(self, cal_id: str) -> VersionCalibrator:
        """The learner of calibrator ``cal_id`` (:func:`calibrator_of`), made on first use."""
        c = self.cals.get(cal_id)
        if c is None:
            c = self.cals[cal_id] = VersionCalibrator(cal_id, self.cfg)
        return c

    # -- the join
    def process(self, predictions, labeled) -> int:
        """Join one micro-batch of decoded records and learn from every completed pair."""
        st = self.state
        matched: dict[str, list] = {}  # calibrator id -> rows (raw, y, t, position, device)

        def emit(mv, raw, lab):
            matched.setdefault(mv, []).append((raw, lab[0], lab[1], lab[2], lab[3]))

        for p in predictions:
            iid = p.impression_id
            st.pred_watermark = max(st.pred_watermark, p.event_time_ms)
            if p.degraded or not p.model_version:  # fallback scores: no model to calibrate
                self.dropped["degraded"] += 1
                _metrics()["dropped"].labels("pred", "degraded").inc()
                st.labels.pop(iid, None)
                st.done[iid] = None  # its label, when it comes, is dropped too
                continue
            if iid in st.done:
                self.dropped["duplicate"] += 1
                _metrics()["dropped"].labels("pred", "duplicate").inc()
                continue
            cid = calibrator_of(p.model_name, p.model_version)
            lab = st.labels.pop(iid, None)
            if lab is not None:
                emit(cid, p.raw_score, lab)
                st.done[iid] = None
            else:
                st.preds[iid] = (cid, p.raw_score, p.event_time_ms)
        for lb in labeled:
            imp = lb.impression
            iid = imp.impression_id
            st.label_watermark = max(st.label_watermark, imp.event_time_ms)
            if iid in st.done:
                self.dropped["duplicate"] += 1
                _metrics()["dropped"].labels("label", "duplicate").inc()
                continue
            lab = (int(lb.clicked), imp.event_time_ms, imp.position, imp.device_type)
            pred = st.preds.pop(iid, None)
            if pred is not None:
                emit(pred[0], pred[1], lab)
                st.done[iid] = None
            else:
                st.labels[iid] = lab
        n = 0
        for mv, rows in matched.items():
            arr = list(zip(*rows))
            raw = np.asarray(arr[0], dtype=np.float64)
            y = np.asarray(arr[1], dtype=np.float64)
            ctx = {"position": np.asarray(arr[3]), "device_type": np.asarray(arr[4])}
            events = self.calibrator(mv).learn_many(raw, y, ctx, event_time_ms=np.asarray(arr[2]))
            if events:
                self._drift_new.setdefault(mv, []).extend(events)
                _metrics()["drift"].labels(*metric_labels(mv)).inc(len(events))
                log.warning(
                    "calibration drift detected for model %s at %d examples "
                    "(residual mean %.4f); learning-rate boost on",
                    mv,
                    events[-1]["n_seen"],
                    events[-1]["window_mean_residual"],
                )
            self._dirty.add(mv)
            _metrics()["joined"].labels(*metric_labels(mv)).inc(len(raw))
            n += len(raw)
        self.n_joined += n
        self._expire()
        return n

    def _expire(self) -> None:
        st = self.state
        g = _metrics()
        for side, d, wm_other in (
            ("pred", st.preds, st.label_watermark),
            ("label", st.labels, st.pred_watermark),
        ):
            tpos = 2 if side == "pred" else 1
            limit = wm_other - self.retention_ms
            while d:
                iid, v = next(iter(d.items()))
                if v[tpos] < limit:
                    d.popitem(last=False)
                    self.dropped[f"{side}_expired"] += 1
                    g["dropped"].labels(side, "expired").inc()
                elif len(d) > self.max_pending:
                    d.popitem(last=False)
                    self.dropped[f"{side}_capped"] += 1
                    g["dropped"].labels(side, "capped").inc()
                else:
                    break
            g["pending"].labels(side).set(len(d))
        while len(st.done) > self.max_pending:
            st.done.popitem(last=False)

    # -- checkpoint
    def checkpoint(self) -> None:
        """Write the dirty versions' learners, parameters and metrics, the join state and the
        Kafka positions to Redis in one transaction."""
        versions = []
        for mv in sorted(self._dirty):
            c = self.cals[mv]
            m = c.metrics()
            _set_gauges(m)
            snap = {
                "n_seen": m["n_seen"],
                "last_event_time_ms": m["last_event_time_ms"],
                **{s: m[s] for s in ("raw", "platt", "iso")},
                "drift_count": m["drift_count"],
            }
            versions.append(
                VersionCheckpoint(
                    mv, c.to_state(), c.params(), m, snap, self._drift_new.get(mv, [])
                )
            )
        self.store.checkpoint(self.job_name, self.state.to_state(), versions)
        self._dirty.clear()
        self._drift_new.clear()
        _metrics()["checkpoints"].inc()


# --------------------------------------------------------------------------- the Kafka loop


def check_prediction(p) -> None:
    """Raise ``ValueError`` with the reason when a decoded prediction cannot be learned from."""
    for name in ("raw_score", "calibrated_score"):
        v = getattr(p, name)
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"invalid: {name}={v!r} is not a probability in [0, 1]")
    if p.model_version and not p.degraded:
        try:
            calibrator_of(p.model_name, p.model_version)
        except ValueError as e:
            raise ValueError(f"invalid: {e}") from None


def run(
    settings,
    cfg: CalibrationConfig | None = None,
    *,
    job_name: str = "calibrate",
    batch_size: int = 2000,
    checkpoint_interval_s: float = 2.0,
    stop=None,
    idle_exit_s: float | None = None,
    from_beginning: bool = True,
    progress=None,
) -> Calibrate:
    """Consume, join, learn and checkpoint until ``stop(job)`` is true, or until nothing new
    arrived for ``idle_exit_s`` (``None``: forever). Always checkpoints before returning."""
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, TopicPartition

    from ctrstream.events import (
        bad_record_reason,
        check_labeled,
        decode_labeled,
        decode_prediction,
    )
    from ctrstream.kafka.clients import make_consumer
    from ctrstream.kafka.deadletters import DlqWriter, dead_letter

    job = Calibrate(settings, cfg, job_name=job_name)
    topics = (settings.topics.predictions.name, settings.topics.labeled.name)
    consumer = make_consumer(settings, group_id=f"ctrstream-{job_name}")
    dlq = DlqWriter(settings)
    try:
        md = consumer.list_topics(timeout=10)
        assign = []
        for t in topics:
            if t not in md.topics:
                raise RuntimeError(
                    f"topic {t!r} does not exist: start the stack (`ctrstream "
                    f"stack up`) or check CTRSTREAM_TOPICS__*__NAME"
                )
            for p in md.topics[t].partitions:
                off = job.state.offsets.get((t, p))
                if off is None:
                    off = OFFSET_BEGINNING if from_beginning else OFFSET_END
                assign.append(TopicPartition(t, p, off))
        consumer.assign(assign)
        last_ckpt = time.monotonic()
        last_data = time.monotonic()
        bad = _metrics()["bad"]
        while not (stop and stop(job)):
            msgs = consumer.consume(num_messages=batch_size, timeout=0.2)
            preds, labs = [], []
            for msg in msgs:
                err = msg.error()
                if err:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("kafka error: %s", err)
                    continue
                t, part, off = msg.topic(), msg.partition(), msg.offset()
                assert (
                    t is not None and part is not None and off is not None
                )  # set on every consumed record
                job.state.offsets[(t, part)] = off + 1
                value = msg.value()
                try:
                    if value is None:
                        raise ValueError("empty record: value is null")
                    if t == topics[0]:
                        pred = decode_prediction(value)
                        check_prediction(pred)
                        preds.append(pred)
                    else:
                        lab = decode_labeled(value)
                        check_labeled(lab)
                        labs.append(lab)
                except Exception as e:  # noqa: BLE001 - whatever a record's bytes raise: its dead letter
                    bad.labels(t).inc()
                    reason = bad_record_reason(e)
                    log.warning("bad record %s[%d]@%d: %s", t, part, off, reason)
                    dlq.write(
                        [
                            dead_letter(
                                reason, t, part, off, value, "decode", key=msg.key(), job=job_name
                            )
                        ]
                    )
            if msgs:
                last_data = time.monotonic()
                job.process(preds, labs)
                if progress:
                    progress(job)
            if time.monotonic() - last_ckpt >= checkpoint_interval_s:
                dlq.flush()  # the dead letters before the positions that move past them
                job.checkpoint()
                last_ckpt = time.monotonic()
            if idle_exit_s is not None and time.monotonic() - last_data > idle_exit_s:
                break
        dlq.flush()
        job.checkpoint()
    finally:
        consumer.close()
    return job
