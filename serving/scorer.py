"""``ctrstream score``: the streaming scorer, a Bytewax dataflow.

impressions (Kafka, micro-batches of ``batch_size``) -> per batch:

1. decode: a record that does not decode (whatever its bytes raise) or whose key is not its
   impression id is counted and written to ``dlq`` (connector name ``scorer``,
   ``ctrstream.kafka.deadletters``; acknowledged before the batch's predictions are
   produced); watermark heartbeats are skipped;
2. **features as of each impression's event time**: the lambda-merged window counts from
   Redis (``ctrstream.store.reader.FeatureStore``, the same read the API does, via
   ``ctrstream.serving.assembly``). Every bucket boundary is a whole minute and the window value at
   ``t`` depends on ``t`` only through its buckets, so the rows of one event-time minute share
   one Redis call (a batch spans a few minutes: a few calls, not one per row);
3. **one Triton request per batch** (``ctrstream.serving.triton_client.Scorer`` with
   ``max_rows = batch_size``); when Triton cannot answer, the fallback score (the ad's smoothed
   historical CTR) flagged ``degraded``; when Redis cannot answer, all-zero counts, also
   ``degraded``;
4. the current calibrator of the answering model name and version
   (``ctrstream.calibration.client.CalibratorClient``: reloads when a new checkpoint lands, no
   restart); degraded scores are not calibrated;
5. one ``Prediction`` per impression to the ``predictions`` topic, key = impression id, with
   the shared idempotent producer settings, naming the model (its published base name) and
   version, which the calibration job keys its calibrators by.

Run it with ``ctrstream score`` (or ``python -m bytewax.run "ctrstream.serving.scorer:get_flow()"``).
The Kafka source keeps its offsets in Bytewax's recovery snapshots when recovery is on;
without it the job starts at the beginning of the topic (``--from-end``: at its end).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from ctrstream import features as F
from ctrstream.config import Settings, get_settings
from ctrstream.stack.stopping import stop_on_signals, stop_requested

if TYPE_CHECKING:
    from ctrstream.kafka.deadletters import DlqWriter
    from ctrstream.store.reader import Mode

log = logging.getLogger("ctrstream.score")

_METRICS = None


def _metrics():
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Histogram

        _METRICS = {
            "predictions": Counter(
                "ctrstream_score_predictions_total", "predictions written", ["degraded"]
            ),
            "bad": Counter("ctrstream_score_undecodable_total", "impressions that did not decode"),
            "read": Counter(
                "ctrstream_score_records_total",
                "impressions-topic records handled (scored, skipped by --since-ms, or "
                "undecodable), counted once their batch's features were read and "
                "scored - the demo's lockstep replay waits on it",
            ),
            "batch": Histogram(
                "ctrstream_score_batch_seconds",
                "seconds per scored batch",
                ["stage"],
                buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3),
            ),
            "rows": Histogram(
                "ctrstream_score_batch_rows",
                "impressions per batch",
                buckets=(1, 10, 100, 300, 1000, 3000, 10000),
            ),
        }
    return _METRICS


def impression_columns(imps) -> dict[str, np.ndarray]:
    """Impression structs -> the column arrays ``features.sparse_ids`` and assembly take."""
    cols = {}
    for f in (
        "user_id",
        "ad_id",
        "campaign_id",
        "advertiser_id",
        "site_id",
        "ad_category",
        "position",
        "event_time_ms",
    ):
        cols[f] = np.fromiter((getattr(i, f) for i in imps), dtype=np.int64, count=len(imps))
    cols["device_type"] = np.array([i.device_type for i in imps], dtype=object)
    cols["country"] = np.array([i.country for i in imps], dtype=object)
    return cols


class BatchScorer:
    """Scores one micro-batch of raw Kafka values into encoded ``Prediction`` records.

    The collaborators are built lazily (in the worker process) and can be injected."""

    def __init__(
        self,
        settings: Settings,
        model: str = "ctr_deep",
        model_name: str | None = None,
        batch_size: int = 1000,
        store=None,
        scorer=None,
        calibrator=None,
        feature_mode: Mode = "lambda",
        since_ms: int | None = None,
    ):
        self.settings = settings
        # impressions with an earlier event time are skipped (start scoring mid-stream)
        self.since_ms = since_ms
        self.model, self.model_name = model, model_name
        self.batch_size = batch_size
        self.feature_mode = feature_mode
        self._store, self._scorer, self._cal = store, scorer, calibrator
        self._dlq: DlqWriter | None = None  # the dead-letter producer, made on the first bad record

    def _deps(self):
        if self._store is None:
            from ctrstream.store.connection import redis_client
            from ctrstream.store.reader import FeatureStore

            self._store = FeatureStore(redis_client(self.settings), mode=self.feature_mode)
        if self._scorer is None:
            from ctrstream.serving.triton_client import Scorer

            self._scorer = Scorer(
                self.settings,
                model=self.model,
                model_name=self.model_name,
                max_rows=self.batch_size,
            )
        if self._cal is None:
            from ctrstream.calibration.client import CalibratorClient

            self._cal = CalibratorClient(self.settings)
        return self._store, self._scorer, self._cal

    def features(self, cols: dict) -> tuple[np.ndarray, np.ndarray, bool]:
        """(sparse, dense, degraded) for every row at its own event time (one read per
        event-time minute: ``ctrstream.serving.assembly.counts_at_event_times``)."""
        from ctrstream.serving.assembly import counts_at_event_times

        read = counts_at_event_times(self._deps()[0], cols)
        if read.error is not None:
            log.warning(
                "%s: scoring with all-zero window counts, predictions flagged degraded",
                read.error,
            )
        return F.sparse_ids(cols), F.dense_from_counts(read.counts), bool(read.degraded.any())

    def score_messages(self, msgs: list) -> list[tuple[bytes, bytes]]:
        """Decode one micro-batch of Kafka messages (``KafkaSourceMessage``) and score it; the
        records that cannot be scored become dead letters."""
        from ctrstream.events import DecodeError, decode_impression, key_error
        from ctrstream.kafka.deadletters import dead_letter
        from ctrstream.kafka.heartbeats import is_control

        imps, dead = [], []
        for m in msgs:
            try:
                ev = decode_impression(m.value)
                stage, reason = "key", key_error(m.key, ev)
            except DecodeError as e:
                if is_control(m.key, m.headers):
                    continue  # control records (watermark heartbeats) are no impressions; the
                    # speed layer verifies them and dead-letters forged ones
                stage, reason = "decode", e.reason
            if reason is None:
                imps.append(ev)
                continue
            dead.append(
                dead_letter(
                    reason,
                    m.topic or self.settings.topics.impressions.name,
                    -1 if m.partition is None else m.partition,
                    -1 if m.offset is None else m.offset,
                    m.value,
                    stage,
                    key=m.key,
                    job="scorer",
                )
            )
        if dead:
            _metrics()["bad"].inc(len(dead))
            if self._dlq is None:
                from ctrstream.kafka.deadletters import DlqWriter

                self._dlq = DlqWriter(self.settings)
            self._dlq.write(dead)
            self._dlq.flush()
        return self.score_events(imps, len(msgs))

    def score_events(self, imps: list, n_read: int) -> list[tuple[bytes, bytes]]:
        """Score decoded impressions (``n_read``: the records of the batch they came from)."""
        from ctrstream.events import Prediction, encode

        g = _metrics()
        t0 = time.perf_counter()
        if self.since_ms is not None:
            imps = [i for i in imps if i.event_time_ms >= self.since_ms]
        if not imps:
            g["read"].inc(n_read)
            return []
        _, scorer, cal = self._deps()
        cols = impression_columns(imps)
        sparse, dense, feat_degraded = self.features(cols)
        t1 = time.perf_counter()
        res = scorer.score(sparse, dense)
        t2 = time.perf_counter()
        raw = np.asarray(res.raw, dtype=np.float64).reshape(-1)
        # the published base name: predictions and calibrators are keyed by name + version
        name = getattr(scorer, "base_name", "") or ""
        if res.degraded or not res.model_version:
            calibrated, mv = raw, res.model_version or ""
        else:
            mv = res.model_version
            calibrated = cal.calibrate(
                raw,
                mv,
                {"position": cols["position"], "device_type": cols["device_type"]},
                model_name=name,
            )
        degraded = bool(res.degraded or feat_degraded)
        out = [
            (
                i.impression_id.encode(),
                encode(
                    Prediction(
                        impression_id=i.impression_id,
                        event_time_ms=i.event_time_ms,
                        model_version=mv,
                        raw_score=float(raw[k]),
                        calibrated_score=float(calibrated[k]),
                        degraded=degraded,
                        model_name=name,
                    )
                ),
            )
            for k, i in enumerate(imps)
        ]
        t3 = time.perf_counter()
        g["batch"].labels("features").observe(t1 - t0)
        g["batch"].labels("triton").observe(t2 - t1)
        g["batch"].labels("total").observe(t3 - t0)
        g["rows"].observe(len(imps))
        g["predictions"].labels(str(degraded).lower()).inc(len(out))
        g["read"].inc(n_read)
        return out


def _stoppable_source():
    """Bytewax's ``KafkaSource`` whose partitions end when a stop is requested (SIGTERM):
    the dataflow then completes and snapshots its offsets before the job exits."""
    from bytewax.connectors.kafka import KafkaSource
    from bytewax.inputs import StatefulSourcePartition

    class _Stoppable(StatefulSourcePartition):
        def __init__(self, inner: StatefulSourcePartition):
            self.inner = inner

        def next_batch(self):
            if stop_requested():
                raise StopIteration
            return self.inner.next_batch()

        def next_awake(self):
            return self.inner.next_awake()

        def snapshot(self):
            return self.inner.snapshot()

        def close(self):
            self.inner.close()

    class StoppableKafkaSource(KafkaSource):
        def build_part(self, step_id, for_part, resume_state):
            return _Stoppable(super().build_part(step_id, for_part, resume_state))

    return StoppableKafkaSource


def build_flow(
    settings: Settings,
    *,
    model: str = "ctr_deep",
    model_name: str | None = None,
    batch_size: int = 1000,
    stop_at_end: bool = False,
    from_end: bool = False,
    batch_scorer: BatchScorer | None = None,
    since_ms: int | None = None,
):
    """The dataflow: KafkaSource(impressions) -> flat_map_batch(score) -> KafkaSink(predictions).
    ``stop_at_end``: stop once the topic's current end is reached (tests, backfills)."""
    import bytewax.operators as op
    from bytewax.connectors.kafka import (
        KafkaSink,
        KafkaSinkMessage,
        KafkaSourceMessage,
    )
    from bytewax.dataflow import Dataflow
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END

    from ctrstream.kafka.clients import producer_config

    _StoppableKafkaSource = _stoppable_source()
    bs = batch_scorer or BatchScorer(settings, model, model_name, batch_size, since_ms=since_ms)
    brokers = [settings.kafka.bootstrap_servers]
    flow = Dataflow("ctrstream_score")
    src = _StoppableKafkaSource(
        brokers,
        [settings.topics.impressions.name],
        tail=not stop_at_end,
        starting_offset=OFFSET_END if from_end else OFFSET_BEGINNING,
        batch_size=batch_size,
        raise_on_errors=False,
    )
    msgs = op.input("impressions", flow, src)

    def score(batch: list) -> list:
        msgs = [m for m in batch if isinstance(m, KafkaSourceMessage)]
        for m in batch:
            if not isinstance(m, KafkaSourceMessage):
                log.warning("kafka source error: %s", getattr(m, "err", m))
        return [KafkaSinkMessage(key=k, value=v) for k, v in bs.score_messages(msgs)]

    preds = op.flat_map_batch("score", msgs, score)
    conf = {k: str(v) for k, v in producer_config(settings).items() if k != "bootstrap.servers"}
    op.output(
        "predictions", preds, KafkaSink(brokers, settings.topics.predictions.name, add_config=conf)
    )
    return flow


def get_flow(
    model: str = "ctr_deep",
    batch_size: int = 1000,
    stop_at_end: bool = False,
    from_end: bool = False,
    model_name: str | None = None,
    since_ms: int | None = None,
):
    """Entry point for ``python -m bytewax.run "ctrstream.serving.scorer:get_flow()"`` (one
    process of ``ctrstream score -p N``: process ``k`` serves its metrics on
    ``metrics_port + k``, ``CTRSTREAM_SPEED_PROCESS_INDEX``)."""
    import os

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop_on_signals()  # SIGTERM / Ctrl-C: the source ends, the last epoch is snapshotted
    settings = get_settings()
    if settings.metrics_port:
        from prometheus_client import start_http_server

        port = settings.metrics_port + int(os.environ.get("CTRSTREAM_SPEED_PROCESS_INDEX", "0"))
        start_http_server(port, addr=settings.metrics_host)
    return build_flow(
        settings,
        model=model,
        model_name=model_name,
        batch_size=batch_size,
        stop_at_end=stop_at_end,
        from_end=from_end,
        since_ms=since_ms,
    )
