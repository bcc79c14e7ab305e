"""``ctrstream monitor``: the decay monitor as a Kafka job.

Reads three topics in micro-batches:

* ``predictions`` (``Prediction``: the scorer's and the ad server's, with the model's name
  and version) - the served (calibrated) score of each impression;
* ``labeled`` (``Labeled``, read committed) - the join's label of each impression, with the
  impression's fields (the PSI's families) and the click's delay;
* ``dlq`` - only the join's dead letters of clicks that came after the attribution window
  (connector ``join``, stage ``join``): the labels the training set never sees.

It joins predictions and labels by impression id (either side may come first; bounded as the
calibrate job's join: an entry expires once the other stream's event time has passed it by
``retention_ms``, and each side is capped), looks up the reference score of the impression
(the oracle: :class:`OracleSource`, Parquet files with ``impression_id`` and ``p_click`` - the
generator's oracle file - or ``p_true`` - the closed loop's decision log; none: the gap and
the alarm stay undefined) and feeds :class:`~ctrstream.monitoring.decay.DecayMonitor` one
version at a time (the version is the calibrator id, ``ctr_deep@2``). Degraded predictions
(the fallback score, no model) are not monitored, only counted.

Every ``publish_interval_s`` it sets the Prometheus gauges (``ctrstream_decay_*{version}``,
``ctrstream_label_late_share``, ``ctrstream_label_delay_seconds``), writes the served
version's decay state to the store (``ctrstream.store.monitor.write_decay_state``, what the
controller reads) and commits its Kafka positions (consumer group ``ctrstream-<job name>``).

Bad records: a prediction or label that does not decode (whatever its bytes raise), whose
score is not a probability or whose ``clicked`` is not 0/1 is counted
(``ctrstream_monitor_bad_records_total{topic}``) and dead-lettered (connector ``monitor``)
before the positions that move past it are committed. A dlq record is never dead-lettered
again: one that is not a late click of the join is skipped.

Restart: the windows are statistics over the last hour of event time, not state worth a
checkpoint; a restarted job refills them from its committed positions. What it cannot
measure again comes back from the decay state in the store: each version's baseline gap
(measured over its first ``baseline_ms`` of serving) and a raised alarm (``since_ms`` and
``reason`` unchanged), so the controller never sees an alarm drop, or a decayed model become
the new baseline, because the monitor restarted.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ctrstream.monitoring.decay import DecayConfig, DecayMonitor

log = logging.getLogger("ctrstream.monitor")

JOB = "monitor"
LATE_CLICK_REASON = "click after the attribution window"
# the impression fields the PSI's families are keyed by (ctrstream.monitoring.decay.FAMILIES)
IMPRESSION_FIELDS = (
    "ad_id",
    "campaign_id",
    "advertiser_id",
    "user_id",
    "site_id",
    "ad_category",
    "device_type",
    "country",
    "position",
    "event_time_ms",
)


# --------------------------------------------------------------------------- Prometheus

_METRICS: dict[str, Any] | None = None


def _metrics() -> dict[str, Any]:
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Gauge

        v = ["version"]
        _METRICS = {
            "ne": Gauge("ctrstream_decay_ne", "rolling online NE of the served score", v),
            "oracle_ne": Gauge(
                "ctrstream_decay_oracle_ne", "rolling NE of the reference on the same rows", v
            ),
            "ne_gap": Gauge("ctrstream_decay_ne_gap", "rolling NE / reference NE - 1", v),
            "baseline_gap": Gauge(
                "ctrstream_decay_baseline_gap", "the version's NE gap when it started serving", v
            ),
            "auc": Gauge("ctrstream_decay_auc", "rolling online AUC", v),
            "calibration_ratio": Gauge(
                "ctrstream_decay_calibration_ratio", "rolling mean prediction / observed CTR", v
            ),
            "ece": Gauge("ctrstream_decay_ece", "rolling expected calibration error", v),
            "psi": Gauge(
                "ctrstream_decay_psi",
                "population stability index of a feature family vs training",
                ["version", "family"],
            ),
            "alarm": Gauge("ctrstream_decay_alarm", "1 when the version's decay alarm fired", v),
            "rows": Gauge("ctrstream_decay_window_rows", "joined rows in the rolling window", v),
            "late_share": Gauge(
                "ctrstream_label_late_share",
                "share of clicks that arrived after the join's attribution window (rolling)",
            ),
            "delay": Gauge(
                "ctrstream_label_delay_seconds", "median click delay of the joined clicks (rolling)"
            ),
            "joined": Counter("ctrstream_monitor_joined_total", "joined rows monitored", v),
            "dropped": Counter(
                "ctrstream_monitor_dropped_total", "unmatched or skipped records", ["side", "why"]
            ),
            "bad": Counter(
                "ctrstream_monitor_bad_records_total", "records that could not be used", ["topic"]
            ),
        }
    return _METRICS


def set_gauges(stats: dict[str, Any]) -> None:
    """The Prometheus gauges of :meth:`DecayMonitor.get`'s result (NaN stays NaN)."""
    g = _metrics()
    for version, s in stats["versions"].items():
        for name, key in (
            ("ne", "ne"),
            ("oracle_ne", "oracle_ne"),
            ("ne_gap", "ne_gap"),
            ("baseline_gap", "baseline_gap"),
            ("auc", "auc"),
            ("calibration_ratio", "calibration_ratio"),
            ("ece", "ece"),
        ):
            g[name].labels(version).set(float(s[key]))
        g["alarm"].labels(version).set(1.0 if s["alarm"] else 0.0)
        g["rows"].labels(version).set(s["n"])
        for family, value in s["psi"].items():
            g["psi"].labels(version, family).set(value)
    lab = stats["labels"]
    g["late_share"].set(float(lab["late_share"]))
    g["delay"].set(float(lab["delay_p50_s"]))


# --------------------------------------------------------------------------- the reference


class OracleSource:
    """Impression id -> the reference's click probability, from Parquet files: ``path`` is a
    file or a folder (every ``*.parquet`` under it), with an ``impression_id`` column and a
    ``p_click`` (the generator's oracle) or ``p_true`` (the closed loop's decision log)
    column. Files that appear or change are read on :meth:`refresh`."""

    def __init__(self, path: Path | str | None):
        self.path = None if path is None else Path(path)
        self.p: dict[str, float] = {}
        self._seen: dict[Path, float] = {}
        if self.path is not None and not self.path.exists():
            raise ValueError(
                f"oracle {self.path} does not exist: give the oracle Parquet written by "
                "`ctrstream traffic generate --out DIR` (DIR/oracle.parquet) or the closed "
                "loop's decision log folder"
            )

    def refresh(self) -> int:
        """Read new or changed files; returns how many ids are known."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.path is None:
            return 0
        files = [self.path] if self.path.is_file() else sorted(self.path.rglob("*.parquet"))
        for f in files:
            try:
                mtime = f.stat().st_mtime
            except OSError:  # replaced while we looked: next time
                continue
            if self._seen.get(f) == mtime:
                continue
            try:
                names = pq.read_schema(f).names
                col = "p_click" if "p_click" in names else "p_true" if "p_true" in names else None
                if "impression_id" not in names or col is None:
                    self._seen[f] = mtime
                    continue
                t = pq.read_table(f, columns=["impression_id", col])
            except (OSError, pa.ArrowException) as e:  # being written or replaced: next time
                log.debug("oracle file %s not readable yet: %s", f, e)
                continue
            ids = t.column("impression_id").to_pylist()
            ps = t.column(col).to_numpy(zero_copy_only=False)
            self.p.update(zip(ids, ps.tolist()))
            self._seen[f] = mtime
        return len(self.p)

    def lookup(self, ids: Iterable[str]) -> np.ndarray:
        """The reference's p of each id (NaN where unknown)."""
        get = self.p.get
        return np.fromiter((get(i, math.nan) for i in ids), dtype=np.float64)


# --------------------------------------------------------------------------- the job's logic


class Monitor:
    """The job without Kafka: ``process(predictions, labeled, late_clicks)`` then
    ``publish()``."""

    def __init__(
        self,
        cfg: DecayConfig | None = None,
        oracle: OracleSource | None = None,
        store: Any = None,
        profiles: dict[str, dict] | None = None,
        default_profile: dict | None = None,
        retention_ms: int = 2 * 3_600_000,
        max_pending: int = 1_000_000,
    ):
        self.monitor = DecayMonitor(cfg, profiles, default_profile)
        self.oracle = oracle or OracleSource(None)
        self.store = store  # a redis client (ctrstream.store.monitor) or None
        self.retention_ms = int(retention_ms)
        self.max_pending = int(max_pending)
        self.preds: OrderedDict[str, tuple[str, float, int]] = OrderedDict()
        self.labels: OrderedDict[str, tuple[int, int, dict]] = OrderedDict()
        self.done: OrderedDict[str, None] = OrderedDict()
        self.pred_watermark = 0
        self.label_watermark = 0
        self.n_joined = 0
        self.n_late = 0  # the join's late clicks seen
        self.alarms: list[dict] = []
        self._restored: dict | None = None
        if store is not None:
            from ctrstream.store.monitor import read_decay_state

            self._restored = read_decay_state(store)

    def _version_of(self, model_name: str, model_version: str) -> str:
        from ctrstream.models.publish import base_model_name
        from ctrstream.store.layout import calibrator_id

        return calibrator_id(base_model_name(model_name) if model_name else "", model_version)

    def process(
        self,
        predictions: list,
        labeled: list,
        late_clicks: list | None = None,
        watermarks: tuple[int, int] | None = None,
    ) -> int:
        """Join one micro-batch of decoded records and monitor every completed pair; returns
        how many pairs were completed. ``watermarks`` (predictions, labels): how far each
        stream has come in event time - the Kafka loop passes the slowest partition's, since
        a backlog is read partition by partition and one partition's time says nothing of
        another's; without it, the latest event time seen."""
        dropped = _metrics()["dropped"]
        matched: dict[str, list[tuple[float, int, int, dict, str]]] = {}
        for p in predictions:
            iid = p.impression_id
            self.pred_watermark = max(self.pred_watermark, p.event_time_ms)
            if p.degraded or not p.model_version:
                dropped.labels("pred", "degraded").inc()
                self.labels.pop(iid, None)
                self.done[iid] = None
                continue
            if iid in self.done:
                dropped.labels("pred", "duplicate").inc()
                continue
            version = self._version_of(p.model_name, p.model_version)
            lab = self.labels.pop(iid, None)
            if lab is not None:
                matched.setdefault(version, []).append(
                    (p.calibrated_score, lab[0], lab[1], lab[2], iid)
                )
                self.done[iid] = None
            else:
                self.preds[iid] = (version, float(p.calibrated_score), int(p.event_time_ms))
        t_lab, c_lab, d_lab = [], [], []
        for lb in labeled:
            imp = lb.impression
            iid = imp.impression_id
            self.label_watermark = max(self.label_watermark, imp.event_time_ms)
            t_lab.append(imp.event_time_ms)
            c_lab.append(int(lb.clicked))
            d_lab.append(lb.click_delay_ms)
            if iid in self.done:
                dropped.labels("label", "duplicate").inc()
                continue
            cols = {f: getattr(imp, f) for f in IMPRESSION_FIELDS}
            pred = self.preds.pop(iid, None)
            if pred is not None:
                matched.setdefault(pred[0], []).append(
                    (pred[1], int(lb.clicked), int(imp.event_time_ms), cols, iid)
                )
                self.done[iid] = None
            else:
                self.labels[iid] = (int(lb.clicked), int(imp.event_time_ms), cols)
        if watermarks is not None:
            self.pred_watermark, self.label_watermark = int(watermarks[0]), int(watermarks[1])
        if t_lab:
            self.monitor.labels.update_labels(t_lab, c_lab, d_lab)
        if late_clicks:
            self.monitor.labels.update_late([c.event_time_ms for c in late_clicks])
            self.n_late += len(late_clicks)
        n = 0
        for version, rows in matched.items():
            p_, y_, t_, cols_, ids = zip(*rows)
            columns = {f: np.asarray([c[f] for c in cols_]) for f in IMPRESSION_FIELDS}
            if version not in self.monitor.versions:
                self._restore(version)
            ev = self.monitor.update_many(
                version,
                np.asarray(p_, dtype=np.float64),
                np.asarray(y_, dtype=np.float64),
                np.asarray(t_, dtype=np.int64),
                self.oracle.lookup(ids),
                columns,
            )
            for e in ev:
                log.warning(
                    "decay alarm for %s at event time %d: %s", version, e["t_ms"], e["reason"]
                )
            self.alarms += ev
            _metrics()["joined"].labels(version).inc(len(rows))
            n += len(rows)
        self.n_joined += n
        self._expire()
        return n

    def _restore(self, version: str) -> None:
        """What the store held for ``version`` before a restart: its baseline gap (measured
        when it started serving, which a restarted job cannot see again) and a raised alarm."""
        r = self._restored
        if not r:
            return
        prior = (r.get("versions") or {}).get(version)
        if prior is None and r.get("version") == version:
            prior = r
        if not prior:
            return
        self.monitor.version(version).restore(
            baseline_gap=prior.get("baseline_gap"),
            alarm=bool(prior.get("alarm")),
            since_ms=prior.get("since_ms"),
            reason=str(prior.get("reason", "")),
        )

    def _expire(self) -> None:
        dropped = _metrics()["dropped"]
        sides: tuple[tuple[str, OrderedDict[str, Any], int, int], ...] = (
            ("pred", self.preds, self.label_watermark, 2),
            ("label", self.labels, self.pred_watermark, 1),
        )
        for side, d, wm_other, tpos in sides:
            limit = wm_other - self.retention_ms
            while d:
                _, v = next(iter(d.items()))
                if int(v[tpos]) < limit:
                    d.popitem(last=False)
                    dropped.labels(side, "expired").inc()
                elif len(d) > self.max_pending:
                    d.popitem(last=False)
                    dropped.labels(side, "capped").inc()
                else:
                    break
        while len(self.done) > self.max_pending:
            self.done.popitem(last=False)

    def publish(self) -> dict[str, Any] | None:
        """Check the alarm rules on the windows as they are, set the gauges and write the
        served version's decay state; returns the state."""
        for e in self.monitor.check():
            log.warning(
                "decay alarm for %s at event time %d: %s", e["version"], e["t_ms"], e["reason"]
            )
            self.alarms.append(e)
        stats = self.monitor.get()
        set_gauges(stats)
        state = self.monitor.decay_state(stats)
        if state is not None and self.store is not None:
            from ctrstream.store.monitor import write_decay_state

            write_decay_state(self.store, state)
        return state


# --------------------------------------------------------------------------- the Kafka loop


def check_prediction(p: Any) -> None:
    """Raise ``ValueError`` with the reason when a decoded prediction cannot be monitored."""
    for name in ("raw_score", "calibrated_score"):
        v = getattr(p, name)
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"invalid: {name}={v!r} is not a probability in [0, 1]")


def late_click_of(msg: Any) -> Any:
    """The click of a dlq record that is the join's late click, else None."""
    from ctrstream.events import decode_click
    from ctrstream.kafka.deadletters import from_record
    from ctrstream.kafka.topics import Record

    headers = msg.headers() or []
    dl = from_record(
        Record(
            msg.topic(),
            msg.partition(),
            msg.offset(),
            msg.key(),
            msg.value(),
            0,
            [(k, v or b"") for k, v in headers],
        )
    )
    if dl is None or dl.job != "join" or not dl.reason.startswith(LATE_CLICK_REASON):
        return None
    if dl.original is None:
        return None
    try:
        return decode_click(dl.original)
    except Exception:  # noqa: BLE001 - the join checked it once; whatever it raises, skip it
        return None


def _slowest(part_time: dict[tuple[str, int], int], t_pred: str, t_lab: str) -> tuple[int, int]:
    """The slowest partition's event time of each topic (0 before any record)."""
    pred = [v for (t, _), v in part_time.items() if t == t_pred]
    lab = [v for (t, _), v in part_time.items() if t == t_lab]
    return (min(pred) if pred else 0, min(lab) if lab else 0)


def run(
    settings: Any,
    cfg: DecayConfig | None = None,
    *,
    oracle_path: Path | None = None,
    job_name: str = JOB,
    batch_size: int = 5000,
    publish_interval_s: float = 2.0,
    oracle_refresh_s: float = 5.0,
    stop: Callable[[Monitor], bool] | None = None,
    idle_exit_s: float | None = None,
    from_beginning: bool = True,
    store: Any = None,
    default_profile: dict | None = None,
    retention_ms: int = 2 * 3_600_000,
) -> Monitor:
    """Consume, join, monitor and publish until ``stop(job)`` is true, or until nothing new
    arrived for ``idle_exit_s`` (``None``: forever). Always publishes before returning.
    ``retention_ms``: how far (event time) the other stream's slowest partition may pass an
    unmatched record before it is dropped - a label comes at most an attribution window and
    the allowed lateness after its prediction, so the default (2 h) only drops what will
    never match."""
    from confluent_kafka import KafkaError

    from ctrstream.events import (
        bad_record_reason,
        check_labeled,
        decode_labeled,
        decode_prediction,
    )
    from ctrstream.kafka.clients import make_consumer
    from ctrstream.kafka.deadletters import DlqWriter, dead_letter

    if store is None:
        from ctrstream.store.connection import redis_client

        # a reply deadline of seconds, not the default second: on a loaded machine a busy
        # Redis (a batch view landing) answers late, and a timeout here ends the job
        store = redis_client(settings, timeout_s=10.0)
    oracle = OracleSource(oracle_path)
    oracle.refresh()
    job = Monitor(
        cfg,
        oracle=oracle,
        store=store,
        default_profile=default_profile,
        retention_ms=retention_ms,
    )
    t_pred, t_lab = settings.topics.predictions.name, settings.topics.labeled.name
    t_dlq = settings.topics.dlq.name
    consumer = make_consumer(
        settings,
        group_id=f"ctrstream-{job_name}",
        **{
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "isolation.level": "read_committed",
        },
    )
    dlq = DlqWriter(settings)
    bad = _metrics()["bad"]
    try:
        md = consumer.list_topics(timeout=10)
        for t in (t_pred, t_lab, t_dlq):
            if t not in md.topics:
                raise RuntimeError(
                    f"topic {t!r} does not exist: start the stack (`ctrstream stack up`) or "
                    "check CTRSTREAM_TOPICS__*__NAME"
                )
        consumer.subscribe([t_pred, t_lab, t_dlq])
        last_pub = last_oracle = last_data = time.monotonic()
        uncommitted = False
        part_time: dict[tuple[str, int], int] = {}  # the latest event time per partition
        while not (stop and stop(job)):
            msgs = consumer.consume(num_messages=batch_size, timeout=0.2)
            preds, labs, late = [], [], []
            for msg in msgs:
                err = msg.error()
                if err:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("kafka error: %s", err)
                    continue
                t, part, off, value = msg.topic(), msg.partition(), msg.offset(), msg.value()
                assert t is not None and part is not None and off is not None
                if t == t_dlq:
                    click = late_click_of(msg)
                    if click is not None:
                        late.append(click)
                    continue
                try:
                    if value is None:
                        raise ValueError("empty record: value is null")
                    if t == t_pred:
                        pred = decode_prediction(value)
                        check_prediction(pred)
                        preds.append(pred)
                        et = pred.event_time_ms
                    else:
                        lab = decode_labeled(value)
                        check_labeled(lab)
                        labs.append(lab)
                        et = lab.impression.event_time_ms
                    part_time[(t, part)] = max(part_time.get((t, part), et), et)
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
                uncommitted = True
                job.process(preds, labs, late, _slowest(part_time, t_pred, t_lab))
            now = time.monotonic()
            if now - last_oracle >= oracle_refresh_s:
                oracle.refresh()
                last_oracle = now
            if now - last_pub >= publish_interval_s:
                dlq.flush()  # the dead letters before the positions that move past them
                job.publish()
                if uncommitted:
                    consumer.commit(asynchronous=False)
                    uncommitted = False
                last_pub = now
            if idle_exit_s is not None and now - last_data > idle_exit_s:
                break
        dlq.flush()
        job.publish()
        if uncommitted:
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return job
