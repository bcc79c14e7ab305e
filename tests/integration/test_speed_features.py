"""The features dataflow against real Kafka and Redis: counts, lateness, dedup, dead letters."""

from __future__ import annotations

import contextlib
import random
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import redis

from ctrstream import events as E
from ctrstream import features as F
from ctrstream.kafka.clients import make_producer
from ctrstream.kafka.deadletters import read_dead_letters
from ctrstream.kafka.heartbeats import send_heartbeat
from ctrstream.kafka.topics import read_topic
from ctrstream.stack.manager import settings_env
from ctrstream.stack.procs import start_job, stop_job, wait_until
from ctrstream.stack.services import free_port
from ctrstream.store import layout as L
from ctrstream.store.speed_view import read_speed_view
from ctrstream.streaming.reference import reference_features

BASE = 1_700_000_000_000 // 3_600_000 * 3_600_000
CTRSTREAM = str(Path(sys.executable).parent / "ctrstream")


def make_stream(seed: int, n_imps: int, lateness_ms: int, span_ms: int = 6 * 60_000):
    """A dirty stream in replay order: (kind, key, value) with out-of-order, late,
    duplicate and malformed records; returns (records, injected counts)."""
    rng = random.Random(seed)
    imps = []
    for i in range(n_imps):
        ad = rng.randrange(20)
        t = BASE + i * span_ms // n_imps
        imps.append(
            E.Impression(
                schema_version=1,
                impression_id=f"imp-{seed}-{i}",
                event_time_ms=t,
                user_id=rng.randrange(40),
                ad_id=ad,
                campaign_id=ad // 4,
                advertiser_id=ad // 8,
                site_id=rng.randrange(8),
                ad_category=ad % 5,
                device_type=rng.choice(["mobile", "desktop"]),
                country="DE",
                position=rng.randrange(3),
            )
        )
    events = []  # (replay position time, kind, event)
    for imp in imps:
        # out of order: replayed up to lateness/2 away from its event time
        events.append(
            (
                imp.event_time_ms + rng.randrange(-lateness_ms // 2, lateness_ms // 2),
                "impressions",
                imp,
            )
        )
        if rng.random() < 0.15:
            delay = rng.randrange(1_000, 40_000)
            c = E.Click(
                schema_version=1,
                click_id=f"clk-{imp.impression_id}",
                impression_id=imp.impression_id,
                event_time_ms=imp.event_time_ms + delay,
                user_id=imp.user_id,
                ad_id=imp.ad_id,
                campaign_id=imp.campaign_id,
                advertiser_id=imp.advertiser_id,
                site_id=imp.site_id,
                ad_category=imp.ad_category,
            )
            events.append((c.event_time_ms + rng.randrange(0, lateness_ms // 3), "clicks", c))
            if rng.random() < 0.3:  # duplicate click
                events.append((c.event_time_ms + rng.randrange(0, lateness_ms // 2), "clicks", c))
        if rng.random() < 0.05:  # duplicate impression, replayed a little later
            events.append(
                (imp.event_time_ms + rng.randrange(0, lateness_ms // 2), "impressions", imp)
            )
    # late: copies of early-looking events replayed 3 x lateness after their time
    n_late = max(3, n_imps // 100)
    for j in range(n_late):
        imp = imps[rng.randrange(n_imps // 2)]
        late = E.Impression(
            **{
                **{f: getattr(imp, f) for f in imp.__struct_fields__},
                "impression_id": f"late-{seed}-{j}",
            }
        )
        events.append((late.event_time_ms + 3 * lateness_ms, "impressions", late))
    events.sort(key=lambda e: e[0])
    records = [(kind, E.key_of(ev), E.encode(ev)) for _, kind, ev in events]
    malformed = [
        b"not json at all",
        b'{"schema_version": 1}',
        E.encode(imps[0]).replace(b'"schema_version":1', b'"schema_version":7'),
        E.encode(imps[1]).replace(b'"ad_id":', b'"ad_id":"x","zz":'),
        b"{" + b" " * (E.MAX_EVENT_BYTES + 10) + b"}",
        None,
    ]
    for k, bad in enumerate(malformed):
        pos = rng.randrange(len(records))
        records.insert(pos, ("impressions" if k % 2 == 0 else "clicks", f"bad-{k}".encode(), bad))
    return records, {"late": n_late, "malformed": len(malformed)}


def produce(settings, records) -> None:
    p = make_producer(settings)
    for kind, key, value in records:
        p.produce(getattr(settings.topics, kind).name, key=key, value=value)
    assert p.flush(30) == 0


class PacedReplay:
    """Produce ``records`` in ``chunks`` equal chunks ``pause_s`` apart on a thread, with one
    idempotent producer that rides out an outage on its own retries - the fault tests'
    replay. ``sent`` grows by each chunk's size as it is handed to the producer; after
    :meth:`join`, ``unsent`` holds what the final flush could not deliver."""

    def __init__(self, settings, records, chunks: int, pause_s: float = 0.3) -> None:
        size = len(records) // chunks + 1
        self._chunks = [records[k * size : (k + 1) * size] for k in range(chunks)]
        self._settings, self._pause_s = settings, pause_s
        self.sent: list[int] = []
        self.unsent: list[int] = []
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        s = self._settings
        producer = make_producer(s)
        for c in self._chunks:
            for kind, key, value in c:
                producer.produce(getattr(s.topics, kind).name, key=key, value=value)
            producer.poll(0)
            self.sent.append(len(c))
            time.sleep(self._pause_s)  # the replay's pace, not synchronisation
        self.unsent.append(producer.flush(120))

    def wait_chunks(self, n: int, timeout: float = 60) -> None:
        wait_until(lambda: len(self.sent) >= n, timeout, what=f"{n} chunks of the replay")

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the replay to end; whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, val = line.rsplit(" ", 1)
            base = name.split("{", 1)[0]
            out[base] = out.get(base, 0.0) + float(val)
            out[name] = float(val)
    return out


def _in_layout(settings, name: str):
    return settings.model_copy(update={"speed": settings.speed.model_copy(update={"layout": name})})


@pytest.fixture(params=L.SPEED_LAYOUTS)
def speed_settings(fresh_topics, request):
    """Fresh topics, Redis db 1, in each speed-view layout (``CTRSTREAM_SPEED__LAYOUT``)."""
    return _in_layout(fresh_topics, request.param).model_copy(
        update={
            "redis": fresh_topics.redis.model_copy(update={"db": 1}),
            "metrics_port": free_port(),
        }
    )


@pytest.fixture(params=L.SPEED_LAYOUTS)
def layout_settings(settings, request):
    """The session's settings in each speed-view layout."""
    return _in_layout(settings, request.param)


def job_env(settings) -> dict:
    import os

    return {
        **os.environ,
        **settings_env(settings),
        "CTRSTREAM_REDIS__DB": str(settings.redis.db),
        "CTRSTREAM_METRICS_PORT": str(settings.metrics_port),
        "CTRSTREAM_ALLOWED_LATENESS_S": str(settings.allowed_lateness_s),
        "CTRSTREAM_ATTRIBUTION_WINDOW_S": str(settings.attribution_window_s),
        "CTRSTREAM_FLUSH_INTERVAL_MS": str(settings.flush_interval_ms),
        "CTRSTREAM_SPEED__LAYOUT": settings.speed.layout,
    }


def test_counts_lateness_dedup_and_dead_letters(speed_settings, tmp_path):
    s = speed_settings
    r = redis.Redis.from_url(s.redis.url)
    r.flushdb()
    lateness = int(s.allowed_lateness_s * 1000)
    records, injected = make_stream(seed=7, n_imps=3000, lateness_ms=lateness)
    produce(s, records)
    job = start_job(
        [CTRSTREAM, "speed", "features", "-w", "2", "--no-recovery"],
        env=job_env(s),
        log_path=tmp_path / "job.log",
    )
    try:
        max_t = max(
            E.decode_impression(v).event_time_ms
            for k, _, v in records
            if k == "impressions" and v and v.startswith(b'{"schema_version":1,"imp')
        )
        send_heartbeat(s, max_t + 2 * 3_600_000)  # closes every bucket of every resolution
        recs = {
            kind: read_topic(s, getattr(s.topics, kind).name) for kind in ("impressions", "clicks")
        }
        ref = reference_features(s, recs)
        # the stream really is dirty, and the reference sees it
        assert ref.stats["late"] == injected["late"]
        assert ref.stats["decode_errors"] == injected["malformed"]
        assert ref.stats["duplicates"] > 50
        assert ref.stats["heartbeats"] == 8
        assert ref.cells
        sl = L.speed_layout(s.speed.layout)
        wait_until(
            lambda: read_speed_view(r, sl) == ref.cells,
            120,
            what="the speed view to equal the reference" + f" (log {tmp_path / 'job.log'})",
        )
        # dead letters: every malformed and late record, with its reason and original bytes
        dlq = {}

        def dlq_complete():
            dlq.clear()
            for d in read_dead_letters(s):
                dlq[(d.source_topic, d.partition, d.offset)] = d
            return len(dlq) == len(ref.dead)

        wait_until(dlq_complete, 60, what="all dead letters")
        originals = {(x.topic, x.partition, x.offset): x for v in recs.values() for x in v}
        for where, (stage, reason) in ref.dead.items():
            d = dlq[where]
            assert d.stage == stage
            assert d.job == "features"
            # Kafka Connect's convention: the original value (null stays null) and key
            assert d.original == originals[where].value
            assert d.key == originals[where].key
            if stage == "decode":
                assert d.reason == reason
            else:
                assert d.reason.startswith("late: ")
        # nothing lost: counted + duplicates + dead = every record that is not a heartbeat
        counted = ref.stats["counted_i"] + ref.stats["counted_c"]
        ad_5m = sum(v for (e, _, res, _, _), v in ref.cells.items() if e == "ad" and res == "5m")
        assert ad_5m == counted
        assert (
            counted + ref.stats["duplicates"] + len(dlq)
            == ref.stats["records"] - ref.stats["heartbeats"]
        )
        # metrics agree, and every closed bucket's state has been freed
        m = wait_until(
            lambda: (lambda m: m if m.get("ctrstream_speed_state_cells", 1) == 0 else None)(
                scrape(s.metrics_port)
            ),
            30,
            what="state cells to be freed",
        )
        assert m["ctrstream_speed_events_in_total"] == ref.stats["records"]
        assert m["ctrstream_speed_events_accepted_total"] == counted
        assert m["ctrstream_speed_duplicates_total"] == ref.stats["duplicates"]
        assert m["ctrstream_speed_late_total"] == ref.stats["late"]
        assert m["ctrstream_speed_dlq_total"] == len(ref.dead)
        assert m["ctrstream_speed_flush_seconds_count"] > 0
        assert m["ctrstream_speed_feature_freshness_seconds_count"] > 0
        # every speed hash has the TTL of layout.speed_hash_ttl_ms (set with its newest hour)
        ttl = L.speed_hash_ttl_ms(lateness)
        assert ttl == 24 * 3_600_000 + lateness + 3_600_000
        pipe = r.pipeline(transaction=False)
        keys = sorted({sl.cell_address(*cell)[0] for cell in ref.cells})
        assert len(keys) < len({cell[:2] for cell in ref.cells}) or not sl.grouped
        for k in keys:
            pipe.pttl(k)
        assert all(0 < t <= ttl for t in pipe.execute()), "a speed hash without its TTL"
    finally:
        stop_job(job)
    assert "Traceback" not in (tmp_path / "job.log").read_text()


def test_shard_snapshot_waits_until_redis_acknowledged_its_flushes(layout_settings, r, unique):
    """The shards write Redis through a writer thread (the job goes on meanwhile), but a
    snapshot records flushed cells as written (not dirty): it must not return before Redis
    has acknowledged them, or a kill -9 right after it would lose those writes for good."""
    from ctrstream.streaming.features_flow import Delta, FlowConfig, ShardLogic

    settings = layout_settings
    cfg = FlowConfig(settings)
    logic = ShardLogic(cfg, "t", None)
    ad = int(unique[-6:], 16)
    t = np.array([BASE + 1_000], dtype=np.int64)
    logic.on_batch([Delta(0, BASE, 0, np.zeros(1, np.int8), np.array([ad], np.int64), t, 1, 2)])
    sl = L.speed_layout(settings.speed.layout)
    key = sl.key("ad", str(ad), L.speed_day(BASE // 60_000, F.RESOLUTIONS[0]))
    try:
        assert r.client_pause(1000, all=False)  # Redis holds every write for a second
        logic.on_notify()  # renders the flush, queues it and returns
        state = logic.snapshot()
        assert r.hget(key, L.speed_field("5m", "i", BASE // 60_000)) == b"1"
        assert not any(tab.dirty.any() for tab in state["tables"].values())
    finally:
        cfg.writer().close()
        r.delete(key)


def test_writer_sends_one_hset_per_hash_and_keys_by_day(layout_settings, r, unique):
    """The writer sends ONE HSET per (entity, day) hash and flush, holding the changed
    buckets of every resolution with absolute values; a hot entity's hash is bounded by its
    event day (the next day goes to a new hash, the old one keeps its buckets and its TTL,
    layout.speed_hash_ttl_ms, renewed with each new hour); nothing is deleted."""
    from ctrstream.streaming.features_flow import FeatureWriter, FlushItem

    def hsets() -> int:
        return int(r.info("commandstats").get("cmdstat_hset", {}).get("calls", 0))

    settings = layout_settings
    sl = L.speed_layout(settings.speed.layout)
    sink = FeatureWriter(settings)
    lateness = int(settings.allowed_lateness_s * 1000)
    hour, minute = F.RESOLUTIONS[2], F.RESOLUTIONS[0]  # 24h (1-hour buckets), 5m (1-minute)
    assert (hour.bucket_ms, minute.bucket_ms) == (F.HOUR_MS, F.MINUTE_MS)
    ad = int(unique[-6:], 16)
    day0 = 20_000
    keys = [sl.key("ad", str(ad), day0 + k) for k in range(3)]
    try:
        for h in range(day0 * 24 + 20, day0 * 24 + 50):  # 30 hours from 20:00 of day0
            bm = h * 60 + 17  # a minute inside hour h
            for count in (1, 2):  # the buckets' first write (new) and an update of them
                before = hsets()
                sink.write(
                    [
                        FlushItem(
                            ent=np.array([0, 0], np.int8),
                            res=np.array([2, 0]),
                            bucket=np.array([h, bm]),
                            eid=np.array([ad, ad], np.int64),
                            cnt=np.array([[count, count - 1], [count, 0]]),
                            new=np.array([count == 1] * 2),
                            ts_first=None,
                            ts_last=None,
                        )
                    ]
                )
                sink.drain()
                assert hsets() - before == 1  # both resolutions in one HSET
            key = sl.key("ad", str(ad), L.speed_day(h, hour))
            assert key == sl.key("ad", str(ad), L.speed_day(bm, minute))
            assert int(r.hget(key, L.speed_field("24h", "i", h))) == 2
            assert int(r.hget(key, L.speed_field("24h", "c", h))) == 1
            assert int(r.hget(key, L.speed_field("5m", "i", bm))) == 2
            # a click count of 0: written as such, or not written in a sparse layout
            assert r.hget(key, L.speed_field("5m", "c", bm)) == (None if sl.sparse_clicks else b"0")
        # a flush of cells of two days for one entity: one HSET per day
        before = hsets()
        sink.write(
            [
                FlushItem(
                    ent=np.array([0, 0], np.int8),
                    res=np.array([2, 2]),
                    bucket=np.array([day0 * 24 + 23, day0 * 24 + 24]),
                    eid=np.array([ad, ad], np.int64),
                    cnt=np.array([[5, 1], [6, 2]]),
                    new=np.array([False, False]),
                    ts_first=None,
                    ts_last=None,
                )
            ]
        )
        sink.drain()
        assert hsets() - before == 2
        held = [sorted(f.decode() for f in r.hkeys(k)) for k in keys]
        # every hour wrote 24h i and c (c = 1) and 5m i and c (c = 0: not written if sparse)
        per_hour = 3 if sl.sparse_clicks else 4
        assert held[0] == sorted(
            L.speed_field(res, t, b)
            for h in range(day0 * 24 + 20, day0 * 24 + 24)
            for res, b in (("24h", h), ("5m", h * 60 + 17))
            for t in "ic"
            if not (sl.sparse_clicks and res == "5m" and t == "c")
        )
        # whole days, nothing deleted
        assert len(held[1]) == 24 * per_hour and len(held[2]) == 2 * per_hour
        assert int(r.hget(keys[0], L.speed_field("24h", "i", day0 * 24 + 23))) == 5
        assert int(r.hget(keys[1], L.speed_field("24h", "c", day0 * 24 + 24))) == 2
        assert all(0 < r.pttl(k) <= L.speed_hash_ttl_ms(lateness) for k in keys)
    finally:
        sink.close()
        r.delete(*keys)


def test_one_line_replies_are_counted_and_errors_still_raise(settings, r, unique):
    """The sink counts its replies (HSET/PEXPIRE/HDEL: one line each) by their line ends; a
    large flush whose replies arrive in many chunks waits for all of them, and an error reply
    anywhere in it - even split across reads - raises with Redis' message."""
    from ctrstream.store.resp import RespPipeline, encode

    pipe = RespPipeline(settings)
    key = f"test:resp:{unique}".encode()
    try:
        n = 60_000  # ~0.3 MB of replies: many recv() calls
        cmds = [encode((b"HSET", key, b"f%d" % k, k)) for k in range(n)]
        pipe.execute_raw(b"".join(cmds) + encode((b"PEXPIRE", key, 60_000)), n + 1, one_line=True)
        assert r.hlen(key) == n and int(r.hget(key, b"f%d" % (n - 1))) == n - 1
        assert 0 < r.pttl(key) <= 60_000
        bad = encode((b"LPUSH", key, b"x"))  # WRONGTYPE on a hash, mid-payload
        with pytest.raises(RuntimeError, match="WRONGTYPE"):
            pipe.execute_raw(
                b"".join(cmds[:30_000]) + bad + b"".join(cmds[30_000:]), n + 1, one_line=True
            )
        # the connection is still in step after an error: the next flush counts right
        pipe.execute_raw(encode((b"HSET", key, b"after", 1)), 1, one_line=True)
        assert r.hget(key, b"after") == b"1"
    finally:
        pipe.close()
        r.delete(key)


def test_background_pipeline_keeps_order_waits_and_raises(settings, r, unique):
    """The features writer's thread: payloads reach Redis in submission order, `drain` returns
    only after every acknowledgement, a full queue blocks the caller (back-pressure), and a
    Redis error surfaces in the caller's thread - on every later call, never silently."""
    from ctrstream.store.resp import BackgroundPipeline, encode

    key = f"test:resp:bg:{unique}".encode()
    acked: list[int] = []
    pipe = BackgroundPipeline(settings, max_pending=1)
    try:
        # Redis holds writes for 300 ms: the first payload stays in flight, so the second
        # submit can only return once the first was acknowledged
        assert r.client_pause(300, all=False)
        for k in range(1, 6):
            pipe.submit(
                encode((b"HSET", key, b"v", k)), 1, one_line=True, done=lambda k=k: acked.append(k)
            )
            assert acked == list(range(1, k))  # submit k returned after k-1 was acknowledged
        pipe.drain()
        assert acked == [1, 2, 3, 4, 5] and r.hget(key, b"v") == b"5"
        pipe.submit(encode((b"LPUSH", key, b"x")), 1, one_line=True)  # WRONGTYPE
        with pytest.raises(RuntimeError, match="WRONGTYPE"):
            pipe.drain()
        with pytest.raises(RuntimeError, match="WRONGTYPE"):
            pipe.submit(encode((b"HSET", key, b"v", 6)), 1, one_line=True)
        assert r.hget(key, b"v") == b"5"  # nothing is sent after an error
    finally:
        with contextlib.suppress(RuntimeError):
            pipe.close()
        r.delete(key)
