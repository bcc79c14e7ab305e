"""``ctrstream monitor`` against the real stack: predictions and labels in Kafka, the oracle in
Parquet, a model that goes wrong half way -> the decay alarm in the store and in Prometheus,
the join's late clicks counted, a bad record dead-lettered, a restart that keeps the alarm
and repeats nothing."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from ctrstream.events import SCHEMA_VERSION, Click, Impression, Labeled, Prediction, encode
from ctrstream.kafka.deadletters import dead_letter, dead_letter_headers
from ctrstream.monitoring.job import run
from ctrstream.store.monitor import read_decay_state

HOUR = 3_600_000
T0 = 1_767_571_200_000
# each half of the test is a 2-hour backlog read partition by partition: the join keeps an
# unmatched record longer than the job's default (2 h, what live traffic needs)
RETENTION_MS = 6 * HOUR


def _world(n: int, seed: int):
    """4 hours of a market; the served model is the truth (noisy) until 2 h, then ranks by a
    stale fraction of the signal."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, 4 * HOUR, n))
    logit = rng.normal(-3.5, 0.8, n)
    o = 1 / (1 + np.exp(-logit))
    noise = rng.normal(0, 0.15, n)
    served = np.where(t >= 2 * HOUR, -3.5 + 0.4 * (logit + 3.5) + noise, logit + noise)
    p = 1 / (1 + np.exp(-served))
    y = (rng.random(n) < o).astype(int)
    return p, y, t + T0, o


def _impression(iid: str, t: int, i: int) -> Impression:
    return Impression(
        schema_version=SCHEMA_VERSION,
        impression_id=iid,
        event_time_ms=int(t),
        user_id=i % 101,
        ad_id=i % 17,
        campaign_id=i % 5,
        advertiser_id=i % 3,
        site_id=i % 11,
        ad_category=i % 7,
        device_type="mobile",
        country="US",
        position=i % 3,
    )


def _deadline(seconds: float):
    end = time.monotonic() + seconds

    def check(job=None) -> bool:
        if time.monotonic() > end:
            what = (
                ""
                if job is None
                else f": joined {job.n_joined}, labels {job.monitor.labels.get()}, "
                f"late {job.n_late}, pending {len(job.preds)} predictions and "
                f"{len(job.labels)} labels"
            )
            raise TimeoutError("the monitor did not get there in time" + what)
        return False

    return check


@pytest.fixture
def client(settings):
    from ctrstream.store import layout as L

    c = redis.Redis.from_url(settings.redis.url)
    saved = c.get(L.DECAY_STATE_KEY)
    yield c
    if saved is None:
        c.delete(L.DECAY_STATE_KEY)
    else:
        c.set(L.DECAY_STATE_KEY, saved)
    c.close()


def test_monitor_job_raises_the_alarm_counts_late_clicks_and_resumes(
    fresh_topics, client, unique, tmp_path
):
    from prometheus_client import REGISTRY

    from ctrstream.kafka.clients import make_producer

    s = fresh_topics
    n = 60_000
    p, y, t, o = _world(n, seed=11)
    ids = [f"{unique}-{i}" for i in range(n)]
    pq.write_table(pa.table({"impression_id": ids, "p_click": o}), tmp_path / "oracle.parquet")
    prod = make_producer(s)

    def produce(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            pred = Prediction(
                impression_id=ids[i],
                event_time_ms=int(t[i]),
                model_version="3",
                raw_score=float(p[i]),
                calibrated_score=float(p[i]),
                degraded=False,
                model_name="ctr_deep",
            )
            lab = Labeled(
                impression=_impression(ids[i], t[i], i),
                clicked=int(y[i]),
                click_delay_ms=15_000 if y[i] else None,
            )
            key = ids[i].encode()
            prod.produce(s.topics.predictions.name, key=key, value=encode(pred))
            prod.produce(s.topics.labeled.name, key=key, value=encode(lab))
        assert prod.flush(60) == 0

    produce(0, n // 2)
    # a bad prediction, and 50 clicks the join dead-lettered as after the attribution window
    prod.produce(s.topics.predictions.name, key=b"bad", value=b'{"impression_id": 7}')
    for k in range(50):
        click = Click(
            schema_version=SCHEMA_VERSION,
            click_id=f"c-{unique}-{k}",
            impression_id=ids[k],
            event_time_ms=int(t[n // 2 - 50 + k]),  # late clicks of the last minutes
            user_id=1,
            ad_id=1,
            campaign_id=1,
            advertiser_id=1,
            site_id=1,
            ad_category=1,
        )
        dl = dead_letter(
            "click after the attribution window: delay 3600000 ms > 1800000 ms",
            s.topics.clicks.name,
            0,
            k,
            encode(click),
            "join",
            key=ids[k].encode(),
            job="join",
        )
        prod.produce(
            s.topics.dlq.name, value=dl.original, key=dl.key, headers=dead_letter_headers(dl)
        )
    assert prod.flush(60) == 0

    tick = _deadline(120)
    job = run(
        s,
        oracle_path=tmp_path,
        job_name=f"mon-{unique}",
        publish_interval_s=0.2,
        store=client,
        retention_ms=RETENTION_MS,
        stop=lambda j: tick(j) or (j.n_joined >= n // 2 and j.n_late >= 50),
    )
    assert job.n_joined == n // 2
    st = read_decay_state(client)
    assert st is not None and st["version"] == "ctr_deep@3"
    assert st["alarm"] is False  # the first two hours: the model is fine
    lab = job.monitor.labels.get()
    assert lab["late_clicks"] == 50 and 0 < lab["late_share"] < 1
    assert REGISTRY.get_sample_value("ctrstream_label_late_share") == pytest.approx(
        lab["late_share"]
    )
    assert (
        REGISTRY.get_sample_value(
            "ctrstream_monitor_bad_records_total", {"topic": s.topics.predictions.name}
        )
        >= 1
    )

    # the rest, to a restarted job: it resumes from its committed positions
    produce(n // 2, n)
    tick = _deadline(120)
    job2 = run(
        s,
        oracle_path=tmp_path,
        job_name=f"mon-{unique}",
        publish_interval_s=0.2,
        store=client,
        retention_ms=RETENTION_MS,
        stop=lambda j: tick(j) or j.n_joined >= n - n // 2,
    )
    assert job2.n_joined == n - n // 2  # nothing monitored twice
    st = read_decay_state(client)
    assert st is not None and st["alarm"] is True, st
    # after the model went wrong (how long after depends on the order a backlog's partitions
    # are read in: ``ctrstream bench decay`` measures the delay on records in time order)
    assert T0 + 2 * HOUR <= st["since_ms"] <= T0 + 4 * HOUR
    assert st["ne_gap"] > st["baseline_gap"]
    assert REGISTRY.get_sample_value("ctrstream_decay_alarm", {"version": "ctr_deep@3"}) == 1.0
    assert REGISTRY.get_sample_value("ctrstream_decay_ne_gap", {"version": "ctr_deep@3"}) == (
        pytest.approx(st["ne_gap"])
    )

    # the bad record is the monitor's dead letter
    from ctrstream.kafka.deadletters import read_dead_letters

    mine = [d for d in read_dead_letters(s, timeout_s=30) if d.job == f"mon-{unique}"]
    assert len(mine) == 1 and mine[0].source_topic == s.topics.predictions.name
    assert "invalid" in mine[0].reason or "malformed" in mine[0].reason
