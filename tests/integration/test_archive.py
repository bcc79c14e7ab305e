"""The archiver against the real Kafka of the test stack: event-hour partitions, late events,
undecodable records, and every record exactly once across crashes and restarts."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from batch_traffic import make_traffic

from ctrstream import features as F
from ctrstream.batch.archive import (
    CRASH_ENV,
    SCHEMAS,
    list_files,
    list_partitions,
    partition_dir,
    read_events,
    run_archiver,
)
from ctrstream.events import Click, Impression, encode
from ctrstream.kafka.clients import make_producer
from ctrstream.stack.manager import settings_env
from ctrstream.stack.procs import kill_hard, start_job, wait_until

CTRSTREAM = str(Path(sys.executable).parent / "ctrstream")


def produce(settings, it: pa.Table, ct: pa.Table, garbage: int = 0) -> None:
    """Produce the tables' rows (in table order) as the shared codec encodes them."""
    p = make_producer(settings)
    for topic, cls, table in (
        (settings.topics.impressions.name, Impression, it),
        (settings.topics.clicks.name, Click, ct),
    ):
        for row in table.to_pylist():
            ev = cls(**row)
            p.produce(
                topic, key=ev.impression_id.encode(), value=encode(ev), timestamp=ev.event_time_ms
            )
            p.poll(0)
        for k in range(garbage):
            p.produce(topic, key=b"bad", value=b'{"not": "an event"' if k % 2 else b"\xff\x00")
    assert p.flush(30) == 0


def raw_rows(data_dir, kind) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(f).num_rows for f in list_files(data_dir, kind))


def test_partitions_late_events_and_bad_records(fresh_topics, tmp_path, unique):
    s = fresh_topics
    h0 = F.align_cutoff(1_700_000_000_000) // F.HOUR_MS * F.HOUR_MS + 5 * F.HOUR_MS
    it, ct = make_traffic(n_imps=300, start_ms=h0, span_ms=2 * F.HOUR_MS, seed=3, dup_frac=0.05)
    late = it.slice(0, 1).to_pylist()[0] | {
        "impression_id": "late-1",
        "event_time_ms": h0 - 3 * F.HOUR_MS + 17,
    }
    it = pa.concat_tables([it, pa.Table.from_pylist([late], schema=SCHEMAS["impressions"])])

    # a third of the impressions come from the closed loop: request id, arm and price set
    def closed_loop(iid: str) -> dict:
        k = int(iid.rsplit("-", 1)[1])
        if k % 3:
            return {"request_id": "", "arm": "", "price": 0.0}
        return {"request_id": f"q-{k}", "arm": "lr" if k % 2 else "deep", "price": 0.01 * k}

    it = pa.Table.from_pylist(
        [r | closed_loop(r["impression_id"]) for r in it.to_pylist()],
        schema=SCHEMAS["impressions"],
    )
    produce(s, it, ct, garbage=3)  # the late event is produced last

    stats = run_archiver(
        s, data_dir=tmp_path, until_idle_s=1.0, group_id=f"arch-{unique}", batch_records=100
    )
    assert stats.undecodable == {"impressions": 3, "clicks": 3}
    assert stats.records == {"impressions": it.num_rows, "clicks": ct.num_rows}
    assert stats.flushes >= 3

    # every file holds only events of its own event hour; the late one sits in its hour
    for kind in ("impressions", "clicks"):
        parts = list_partitions(tmp_path, kind)
        assert len(parts) >= 2
        for hour, d in parts:
            assert d == partition_dir(tmp_path, kind, hour)
            t = pa.concat_tables([pa.parquet.read_table(f) for f in d.glob("part-*.parquet")])
            assert (t.column("event_time_ms").to_numpy() // F.HOUR_MS == hour).all()
    late_dir = partition_dir(tmp_path, "impressions", late["event_time_ms"] // F.HOUR_MS)
    when = datetime.fromtimestamp(late["event_time_ms"] / 1000, tz=UTC)
    assert (late_dir.parent.name, late_dir.name) == (f"date={when:%Y-%m-%d}", f"hour={when:%H}")
    ids = pa.concat_tables([pa.parquet.read_table(f) for f in late_dir.glob("part-*.parquet")])
    assert ids.column("impression_id").to_pylist() == ["late-1"]
    assert not list(late_dir.glob(".*.tmp"))

    # source duplicates collapse at read time; ranges select by event time
    got = read_events(tmp_path, "impressions")
    want = sorted(set(it.column("impression_id").to_pylist()))
    assert sorted(got.column("impression_id").to_pylist()) == want
    assert got.num_rows < raw_rows(tmp_path, "impressions")
    # the closed loop's fields are real columns, not extra: read back as they were produced
    for r in got.to_pylist():
        assert {f: r[f] for f in ("request_id", "arm", "price")} == closed_loop(r["impression_id"])
    assert any(r["arm"] for r in got.to_pylist())
    raw_file = pa.parquet.read_table(next(iter(list_files(tmp_path, "impressions"))))
    assert {"request_id", "arm", "price"} <= set(raw_file.schema.names)
    assert raw_file.column("extra").null_count == raw_file.num_rows
    sub = read_events(tmp_path, "impressions", h0, h0 + F.HOUR_MS)
    tt = sub.column("event_time_ms").to_numpy()
    assert sub.num_rows > 0 and tt.min() >= h0 and tt.max() < h0 + F.HOUR_MS


def test_exactly_once_across_crashes(fresh_topics, stack_env, tmp_path, unique):
    """Crash after a write but before its commit (deterministic), then ``kill -9`` mid-stream,
    restart: the archive holds every produced record exactly once after deduplication."""
    s = fresh_topics
    data_dir = tmp_path / "data"
    env = {**stack_env, **settings_env(s), "CTRSTREAM_DATA_DIR": str(data_dir)}
    argv = [
        CTRSTREAM,
        "archive",
        "--group",
        f"arch-{unique}",
        "--batch-records",
        "400",
        "--max-batch-s",
        "0.5",
        "--instance-id",
        f"archiver-{unique}",
    ]
    it1, ct1 = make_traffic(n_imps=3000, seed=11, span_ms=F.DAY_MS)
    it2, ct2 = make_traffic(
        n_imps=2000, seed=12, start_ms=1_700_000_000_000 + F.DAY_MS, span_ms=F.DAY_MS
    )
    produce(s, it1, ct1)

    # 1. exits on its own after the 3rd flush wrote its files, before committing them
    p = start_job(argv, env={**env, CRASH_ENV: "3"}, log_path=tmp_path / "run1.log")
    assert p.wait(120) == 99, (tmp_path / "run1.log").read_text()[-2000:]
    after_crash = raw_rows(data_dir, "impressions") + raw_rows(data_dir, "clicks")
    assert 0 < after_crash < it1.num_rows + ct1.num_rows

    # 2. restarted, then killed hard while it is archiving
    p = start_job(argv, env=env, log_path=tmp_path / "run2.log")
    try:
        wait_until(
            lambda: (
                raw_rows(data_dir, "impressions") + raw_rows(data_dir, "clicks")
                > after_crash + 1000
            ),
            timeout=120,
            what="the archiver to make progress",
        )
    finally:
        kill_hard(p)
    produce(s, it2, ct2)  # more traffic arrives while it is down

    # 3. restarted until caught up
    p = start_job(argv + ["--until-idle", "2"], env=env, log_path=tmp_path / "run3.log")
    assert p.wait(180) == 0, (tmp_path / "run3.log").read_text()[-2000:]
    summary = json.loads((tmp_path / "run3.log").read_text().strip().splitlines()[-1])
    assert summary["archive"]["records"]["impressions"] > 0

    for kind, idf, tables in (
        ("impressions", "impression_id", (it1, it2)),
        ("clicks", "click_id", (ct1, ct2)),
    ):
        produced = pa.concat_tables(tables)
        want = sorted(set(produced.column(idf).to_pylist()))
        got = read_events(data_dir, kind)
        ids = got.column(idf).to_pylist()
        assert len(ids) == len(set(ids))
        assert sorted(ids) == want
        # the record contents survived the round trip
        ref = {r[idf]: r for r in produced.to_pylist()}
        for r in got.slice(0, 200).to_pylist():
            assert r == ref[r[idf]]
    # re-delivery really happened (the crash left written-but-uncommitted records)
    total_unique = (
        read_events(data_dir, "impressions").num_rows + read_events(data_dir, "clicks").num_rows
    )
    produced_rows = sum(t.num_rows for t in (it1, it2, ct1, ct2))
    assert (
        raw_rows(data_dir, "impressions") + raw_rows(data_dir, "clicks")
        > produced_rows
        > total_unique
    )


@pytest.mark.parametrize("kind", ["impressions", "clicks"])
def test_schema_matches_event_struct(kind):
    cls = Impression if kind == "impressions" else Click
    assert SCHEMAS[kind].names == list(cls.__struct_fields__)


def test_sigterm_flushes_and_commits(fresh_topics, stack_env, tmp_path, unique):
    """SIGTERM: the running archiver finishes its batch, commits and exits 0; a later run of
    the same group finds nothing left to archive."""
    from ctrstream.stack.procs import stop_job

    s = fresh_topics
    data_dir = tmp_path / "data"
    env = {**stack_env, **settings_env(s), "CTRSTREAM_DATA_DIR": str(data_dir)}
    it, ct = make_traffic(n_imps=500, seed=21, span_ms=F.HOUR_MS, dup_frac=0.0)
    produce(s, it, ct)
    p = start_job(
        [CTRSTREAM, "archive", "--group", f"arch-{unique}"], env=env, log_path=tmp_path / "run.log"
    )
    try:
        wait_until(
            lambda: (
                raw_rows(data_dir, "impressions") + raw_rows(data_dir, "clicks")
                >= it.num_rows + ct.num_rows
            ),
            timeout=120,
            what="the archiver to catch up",
        )
    finally:
        rc = stop_job(p)  # SIGTERM
    assert rc == 0, (tmp_path / "run.log").read_text()[-2000:]
    summary = json.loads((tmp_path / "run.log").read_text().strip().splitlines()[-1])
    assert summary["archive"]["records"] == {"impressions": it.num_rows, "clicks": ct.num_rows}
    again = run_archiver(s, data_dir=data_dir, until_idle_s=0.5, group_id=f"arch-{unique}")
    assert again.records == {"impressions": 0, "clicks": 0}
    assert raw_rows(data_dir, "impressions") == it.num_rows
