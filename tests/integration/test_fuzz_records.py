"""No record stops a job: a corpus of bad records from a FOREIGN client (raw
``confluent_kafka.Producer`` bytes, JSON written with the standard library, not the project's
encoder or producer settings), interleaved with good records, while the speed features job,
the join, the archive, the scorer and the calibrate job consume the topics.

Checked: every job is alive and consumed to the end; every bad record is in ``dlq`` exactly
once per consuming job, with its reason, its original value and key (Kafka Connect's
dead-letter format); every good record is counted (the Redis speed view equals the
record-by-record reference, every impression is labeled once); the accounting closes for
every consumer (records in = accepted + duplicates + dead letters + heartbeats). The table
of input class -> outcome per job is printed (``-s``) for the hardening note.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
import redis
from confluent_kafka import Producer
from test_speed_features import BASE, CTRSTREAM, job_env, scrape

from ctrstream import events as E
from ctrstream.kafka.deadletters import read_dead_letters
from ctrstream.kafka.heartbeats import HEARTBEAT_KEY, send_heartbeat
from ctrstream.kafka.topics import read_topic
from ctrstream.stack.procs import start_job, stop_job, wait_until
from ctrstream.stack.services import free_port
from ctrstream.store.speed_view import read_speed_view
from ctrstream.streaming.reference import reference_features, reference_labels

N_IMPS = 1200
FUTURE = "event time in the year 3000"
# a copy with the right key in another partition (what a client with another partitioner,
# kcat's default consistent_random for one, does)
WRONG_PARTITION = "right key, wrong partition (a copy)"
# records only the speed layer rejects: the archive keeps them (it deduplicates by event id
# when read), the scorer scores them
SPEED_ONLY = (FUTURE, WRONG_PARTITION)
# a heartbeat in the old, unsigned form (null value, time in the key) whose time overflows
# int64: a control record the speed layer rejects (stage control); the archive and the
# scorer skip control records (no events), as they skip the genuine ones
UNSIGNED_HEARTBEAT = "unsigned heartbeat, old form (time overflows int64)"
SPAN_MS = 10 * 60_000
YEAR_3000_MS = 32_503_680_000_000
HUGE_BYTES = 800_000  # "about 750 KB or more": its dead letter must still be written


def good_impression(i: int) -> dict:
    return {
        "schema_version": 1,
        "impression_id": f"fz-{i}",
        "event_time_ms": BASE + i * SPAN_MS // N_IMPS,
        "user_id": i % 37,
        "ad_id": i % 11,
        "campaign_id": i % 5,
        "advertiser_id": i % 3,
        "site_id": i % 7,
        "ad_category": i % 4,
        "device_type": "mobile" if i % 2 else "desktop",
        "country": "NL",
        "position": i % 3,
    }


def good_click(imp: dict, delay: int) -> dict:
    return {
        "schema_version": 1,
        "click_id": f"clk-{imp['impression_id']}",
        "impression_id": imp["impression_id"],
        "event_time_ms": imp["event_time_ms"] + delay,
        **{k: imp[k] for k in ("user_id", "ad_id", "campaign_id", "advertiser_id", "site_id")},
        "ad_category": imp["ad_category"],
    }


def js(d: dict) -> bytes:
    return json.dumps(d).encode()


def with_(d: dict, **over) -> dict:
    return {**d, **over}


def without(d: dict, field: str) -> dict:
    return {k: v for k, v in d.items() if k != field}


# input class -> (key, value) from a good event (dict) of the topic it goes to; key None:
# the event's own key (its impression id)
def _classes() -> dict:
    def own(d):
        return d["impression_id"].encode()

    def text_field(d):
        return "country" if "country" in d else "click_id"

    return {
        "invalid UTF-8 in a JSON string": lambda d: (
            own(d),
            js(with_(d, **{text_field(d): "PLACEHOLDER"})).replace(b"PLACEHOLDER", b"N\xffL"),
        ),
        "binary": lambda d: (own(d), bytes(range(256)) * 3),
        "NUL bytes": lambda d: (own(d), b"\x00" * 200),
        "deep nesting": lambda d: (own(d), b"[" * 2000 + b"]" * 2000),
        "deep nesting in a field": lambda d: (
            own(d),
            js(with_(d, user_id="X")).replace(b'"X"', b"[" * 1500 + b"]" * 1500),
        ),
        "huge number (> 64 bits)": lambda d: (own(d), js(with_(d, user_id=10**30))),
        "int64 overflow": lambda d: (own(d), js(with_(d, ad_id=2**63))),
        "float where an int belongs": lambda d: (own(d), js(with_(d, site_id=2.5))),
        "exponent float for an int": lambda d: (own(d), js(with_(d, event_time_ms=1.7e12))),
        "empty value": lambda d: (own(d), b""),
        "null value (not a heartbeat)": lambda d: (own(d), None),
        "JSON null": lambda d: (own(d), b"null"),
        "JSON array": lambda d: (own(d), js([d])),
        "empty impression id": lambda d: (b"", js(with_(d, impression_id=""))),
        "event time in year 10000+": lambda d: (own(d), js(with_(d, event_time_ms=10**16))),
        "event time 0": lambda d: (own(d), js(with_(d, event_time_ms=0))),
        "unknown schema_version": lambda d: (own(d), js(with_(d, schema_version=7))),
        "wrong type (dirty: wrong_type)": lambda d: (own(d), js(with_(d, user_id="17"))),
        "missing field (dirty: missing_field)": lambda d: (own(d), js(without(d, "user_id"))),
        "bad JSON (dirty: bad_json)": lambda d: (own(d), js(d)[:40]),
        "oversized (dirty: oversized)": lambda d: (
            own(d),
            js(with_(d, **{text_field(d): "x" * (E.MAX_EVENT_BYTES + 100)})),
        ),
        f"huge record ({HUGE_BYTES // 1000} KB)": lambda d: (own(d), b"x" * HUGE_BYTES),
        UNSIGNED_HEARTBEAT: lambda d: (
            HEARTBEAT_KEY + b":99999999999999999999",
            None,
        ),
        "wrong key (a copy under another key)": lambda d: (b"another-key", js(d)),
        WRONG_PARTITION: lambda d: (own(d), js(d)),
        "no key (a copy without key)": lambda d: (None, js(d)),
    }


# bad records of the calibrate job's topics
CAL_CLASSES = {
    "predictions: invalid UTF-8": (b"p", b'{"impression_id":"\xff"}'),
    "predictions: raw_score 7.5": (
        b"p",
        js(
            {
                "impression_id": "p",
                "event_time_ms": BASE,
                "model_version": "1",
                "raw_score": 7.5,
                "calibrated_score": 0.5,
                "degraded": False,
            }
        ),
    ),
    "predictions: raw_score 1e400 (inf)": (
        b"p",
        b'{"impression_id":"p","event_time_ms":1,"model_version":"1","raw_score":1e400,'
        b'"calibrated_score":0.5,"degraded":false}',
    ),
    "predictions: null value": (b"p", None),
    "predictions: huge record": (b"p", b"y" * HUGE_BYTES),
    "labeled: binary": (b"l", bytes(range(256))),
    "labeled: clicked 2": (
        b"l",
        js({"impression": good_impression(0), "clicked": 2, "click_delay_ms": None}),
    ),
    "labeled: empty value": (b"l", b""),
}


def _short(reason: str, n: int = 70) -> str:
    """A reason for the table: one line, cut, no table separators."""
    reason = reason.replace("|", "/").replace("\n", " ")
    return reason if len(reason) <= n else reason[: n - 3] + "..."


def partition_of(key: bytes | None, n: int, k: int) -> int:
    """The partition the foreign client's ``murmur2_random`` partitioner picks for ``key``
    (the contract of ``ctrstream.events``; checked against the client when read back);
    keyless records are spread by their index."""
    return E.partition_for(key, n) if key else k % n


@pytest.fixture
def fuzz_settings(fresh_topics):
    return fresh_topics.model_copy(
        update={"redis": fresh_topics.redis.model_copy(update={"db": 3}), "metrics_port": 0}
    )


def _build_corpus(s):
    """(kind, partition, key, value, class or None) in produce order, and the future record."""
    n = s.topics.impressions.partitions
    imps = [good_impression(i) for i in range(N_IMPS)]
    good: list[tuple[int, str, dict]] = []
    for imp in imps:
        good.append((imp["event_time_ms"], "impressions", imp))
        if int(imp["impression_id"][3:]) % 5 == 0:
            c = good_click(imp, 1000 + int(imp["impression_id"][3:]) % 20_000)
            good.append((c["event_time_ms"], "clicks", c))
    good.sort(key=lambda g: g[0])
    out = []
    for _, kind, d in good:
        key = d["impression_id"].encode()
        out.append((kind, partition_of(key, n, 0), key, js(d), None))
    out.insert(len(out) // 2, out[len(out) // 2 - 2])  # a duplicate with its right key
    # bad records: every class on both topics, spread over the stream's second half
    classes = _classes()
    pos = len(out) // 2
    step = max(1, (len(out) - pos) // (2 * len(classes) + 2))
    k = 0
    for name, make in classes.items():
        for kind in ("impressions", "clicks"):
            src = next(g for g in good[pos // 2 :] if g[1] == kind)[2]
            key, value = make(src)
            part = partition_of(key, n, k)
            if name == WRONG_PARTITION:
                part = (part + 1) % n
            out.insert(pos, (kind, part, key, value, name))
            pos += step + 1
            k += 1
    # one impression in the year 3000, early: most of its partition's valid events follow it
    fut = with_(good_impression(N_IMPS // 10), impression_id="fz-year-3000")
    fut["event_time_ms"] = YEAR_3000_MS
    fkey = fut["impression_id"].encode()
    at = next(
        i
        for i, r in enumerate(out)
        if r[0] == "impressions" and r[1] == partition_of(fkey, n, 0) and i > len(out) // 10
    )
    out.insert(at, ("impressions", partition_of(fkey, n, 0), fkey, js(fut), FUTURE))
    return out, (partition_of(fkey, n, 0), at)


def test_no_record_stops_a_job(fuzz_settings, tmp_path, unique, capsys):
    from bytewax.testing import run_main

    from ctrstream.batch.archive import run_archiver
    from ctrstream.calibration import job as cal_job
    from ctrstream.serving.scorer import BatchScorer, build_flow
    from ctrstream.serving.triton_client import Scorer

    s = fuzz_settings
    r = redis.Redis.from_url(s.redis.url)
    r.flushdb()
    ports = {"features": free_port(), "join": free_port()}
    jobs = {
        name: start_job(
            [CTRSTREAM, "speed", name, "--no-recovery"],
            env=job_env(s.model_copy(update={"metrics_port": ports[name]})),
            log_path=tmp_path / f"{name}.log",
        )
        for name in ("features", "join")
    }
    try:
        corpus, _ = _build_corpus(s)
        # the foreign client: default settings but the partitioner of the key contract (kcat:
        # -X partitioner=murmur2_random) and a larger request size for the huge record; the
        # good records go where it puts them, the bad ones to chosen partitions
        p = Producer(
            {
                "bootstrap.servers": s.kafka.bootstrap_servers,
                "partitioner": "murmur2_random",
                "message.max.bytes": 2_000_000,
            }
        )
        for kind, part, key, value, _ in corpus:
            # every record to an explicit partition (a good record's is its key's murmur2
            # partition): a keyed record without one waits in the producer's unassigned
            # queue until it has the topic's metadata, and can then land after records
            # produced later to the same partition, which breaks the match by order below;
            # the replay tests produce through the partitioner itself
            p.produce(getattr(s.topics, kind).name, value=value, key=key, partition=part)
            p.poll(0)
        for k, (name, (key, value)) in enumerate(CAL_CLASSES.items()):
            topic = s.topics.predictions if name.startswith("pred") else s.topics.labeled
            p.produce(topic.name, value=value, key=key, partition=k % topic.partitions)
        assert p.flush(30) == 0
        max_t = max(json.loads(v)["event_time_ms"] for _, _, _, v, c in corpus if c is None and v)
        n_hb = send_heartbeat(s, max_t + 2 * 3_600_000)  # closes every bucket and window

        recs = {k: read_topic(s, getattr(s.topics, k).name) for k in ("impressions", "clicks")}
        where = {}  # (topic, partition, offset) -> the record read back
        k_of = {}  # (topic, partition, offset) -> its input class (None: a good record)
        classes_at = defaultdict(list)
        for rs in recs.values():
            for x in rs:
                where[(x.topic, x.partition, x.offset)] = x
        # the records as read back, matched to the corpus by (kind, partition, order)
        seq: dict[tuple[str, int], list] = defaultdict(list)
        for kind, part, key, value, cls in corpus:
            seq[(kind, part)].append((key, value, cls))
        for kind, rs in recs.items():
            by_part = defaultdict(list)
            for x in rs:
                if not (x.key == HEARTBEAT_KEY and x.value is not None):  # not one of ours
                    by_part[x.partition].append(x)
            for part, xs in by_part.items():
                want = seq[(kind, part)]
                assert len(xs) == len(want), (kind, part)
                for x, (key, value, cls) in zip(xs, want):
                    assert (x.key, x.value) == (key, value)
                    k_of[(x.topic, x.partition, x.offset)] = cls
                    if cls is not None:
                        classes_at[cls].append(x)
        bad = {
            w: c
            for w, c in k_of.items()
            if c is not None and c not in SPEED_ONLY and c != UNSIGNED_HEARTBEAT
        }
        speed_bad = {w: c for w, c in k_of.items() if c is not None}

        # -- features: the speed view equals the record-by-record reference
        ref = reference_features(s, recs)
        wait_until(
            lambda: read_speed_view(r) == ref.cells,
            120,
            what=f"the speed view to equal the reference (log {tmp_path / 'features.log'})",
        )
        # -- join: every good impression labeled once
        want_labels = reference_labels(ref, int(s.attribution_window_s * 1000))
        labeled: Counter = Counter()

        def all_labeled():
            labeled.clear()
            for x in read_topic(s, s.topics.labeled.name):
                if x.key != b"l":  # not one of the calibrate job's bad records
                    labeled[E.decode_labeled(x.value).impression.impression_id] += 1
            return len(labeled) >= len(want_labels)

        wait_until(all_labeled, 120, what=f"every label (log {tmp_path / 'join.log'})")
        assert set(labeled) == set(want_labels) and set(labeled.values()) == {1}

        # -- archive, scorer (no model served: degraded scores), calibrate: each to the end
        arch = run_archiver(s, tmp_path / "data", until_idle_s=2, max_batch_s=1)
        scorer = Scorer(s, model_name=f"fuzz-none-{unique}", max_rows=1000, timeout_s=0.2)
        bs = BatchScorer(s, model_name=f"fuzz-none-{unique}", batch_size=1000, scorer=scorer)
        try:
            run_main(build_flow(s, batch_size=1000, stop_at_end=True, batch_scorer=bs))
        finally:
            scorer.close()
        cal_name = f"calibrate-{unique}"
        cal = cal_job.run(s, job_name=cal_name, idle_exit_s=2, checkpoint_interval_s=0.5)

        # -- every job alive (the speed jobs still running, the others returned normally)
        for name, j in jobs.items():
            assert j.poll() is None, f"{name} died: see {tmp_path / (name + '.log')}"

        # -- dead letters: once per consuming job, reason, original value and key
        letters = read_dead_letters(s)
        by_job: dict[str, Counter] = defaultdict(Counter)
        dl_of: dict[tuple, E.DeadLetter] = {}
        for d in letters:
            w = (d.source_topic, d.partition, d.offset)
            by_job[d.job][w] += 1
            dl_of[(d.job, *w)] = d
        consumers = {
            "features": (s.topics.impressions.name, s.topics.clicks.name),
            "join": (s.topics.impressions.name, s.topics.clicks.name),
            "archive": (s.topics.impressions.name, s.topics.clicks.name),
            "scorer": (s.topics.impressions.name,),
        }
        for job, topics in consumers.items():
            mine = {
                w for w in (speed_bad if job in ("features", "join") else bad) if w[0] in topics
            }
            assert set(by_job[job]) >= mine, (job, sorted(mine - set(by_job[job]))[:5])
            assert all(by_job[job][w] == 1 for w in mine), job
            for w in mine:
                d = dl_of[(job, *w)]
                assert d.reason and d.original == where[w].value and d.key == where[w].key
        # the features job: exactly the reference's dead letters, the future one included
        assert set(by_job["features"]) == set(ref.dead)
        fut = classes_at[FUTURE][0]
        fw = (fut.topic, fut.partition, fut.offset)
        assert dl_of[("features", *fw)].reason.startswith("future: ")
        assert dl_of[("features", *fw)].stage == "future"
        assert dl_of[("join", *fw)].stage == "future"
        after = [
            x
            for x in recs["impressions"]
            if x.partition == fut.partition
            and x.offset > fut.offset
            and k_of.get((x.topic, x.partition, x.offset), "hb") is None
        ]
        assert len(after) >= 200
        # the future record made none late
        assert [d for d in letters if d.stage == "lateness"] == []
        assert all(json.loads(x.value)["impression_id"] in labeled for x in after)
        # the copies under another key or in another partition were not counted twice (the
        # speed view equals the reference, where they are dead)
        for cls in ("wrong key (a copy under another key)", WRONG_PARTITION):
            for x in classes_at[cls]:
                for job in ("features", "join"):
                    assert dl_of[(job, x.topic, x.partition, x.offset)].stage == "key"
        # the calibrate job: its topics' bad records
        cal_topics = (s.topics.predictions.name, s.topics.labeled.name)
        cal_bad = {
            (x.topic, x.partition, x.offset): x
            for t in cal_topics
            for x in read_topic(s, t)
            if (x.key in (b"p", b"l"))
        }
        assert set(by_job[cal_name]) == set(cal_bad)
        assert all(n == 1 for n in by_job[cal_name].values())
        for w, x in cal_bad.items():
            assert dl_of[(cal_name, *w)].original == x.value

        # -- the dlq topic takes any source record plus its dead letter's headers
        from confluent_kafka.admin import ConfigResource

        from ctrstream.kafka.clients import admin

        res = ConfigResource(ConfigResource.Type.TOPIC, s.topics.dlq.name)
        client = admin(s)  # held while its future resolves
        conf = client.describe_configs([res])[res].result(30)
        assert int(conf["max.message.bytes"].value) == s.topics.dead_letter_max_bytes()
        assert s.topics.dead_letter_max_bytes() > s.topics.impressions.max_message_bytes

        # -- consumed to the end, and the accounting closes per consumer
        n_in = {k: len(v) for k, v in recs.items()}
        assert sum(n_in.values()) == len(corpus) + n_hb
        mf, mj = scrape(ports["features"]), scrape(ports["join"])
        hb = n_hb // 2  # per topic
        for kind in ("impressions", "clicks"):
            t = getattr(s.topics, kind).name
            lbl = f'flow="features",topic="{t}"'
            f_in = mf[f"ctrstream_speed_events_in_total{{{lbl}}}"]
            f_ok = mf[f"ctrstream_speed_events_accepted_total{{{lbl}}}"]
            f_dup = mf.get(f"ctrstream_speed_duplicates_total{{{lbl}}}", 0)
            f_dlq = sum(
                v
                for k2, v in mf.items()
                if k2.startswith("ctrstream_speed_dlq_total{")
                and 'flow="features"' in k2
                and f'topic="{t}"' in k2
            )
            assert f_in == n_in[kind] and f_in == f_ok + f_dup + f_dlq + hb, (
                kind,
                f_in,
                f_ok,
                f_dup,
                f_dlq,
            )
            assert f_ok == ref.stats["counted_" + kind[0]]
            lbl = f'flow="join",topic="{t}"'
            j_in = mj[f"ctrstream_speed_events_in_total{{{lbl}}}"]
            j_dup = mj.get(f"ctrstream_speed_duplicates_total{{{lbl}}}", 0)
            j_late = mj.get(f"ctrstream_speed_late_total{{{lbl}}}", 0)
            j_dlq = sum(1 for w in by_job["join"] if w[0] == t)
            j_ok = len(labeled) if kind == "impressions" else ref.stats["counted_c"]
            assert j_in == n_in[kind] == j_ok + j_dup + j_late + j_dlq + hb, (
                kind,
                j_in,
                j_ok,
                j_dup,
                j_late,
                j_dlq,
            )
        a_in = (
            sum(arch.records.values())
            + sum(arch.undecodable.values())
            + sum(arch.wrong_key.values())
            + sum(arch.control.values())
        )
        assert a_in == sum(n_in.values())
        assert sum(arch.undecodable.values()) + sum(arch.wrong_key.values()) == len(
            [w for w in by_job["archive"]]
        )
        n_pred = len(read_topic(s, s.topics.predictions.name)) - len(
            [w for w in cal_bad if w[0] == s.topics.predictions.name]
        )
        s_dlq = len(by_job["scorer"])
        n_unsigned = sum(
            1 for x in classes_at[UNSIGNED_HEARTBEAT] if x.topic == s.topics.impressions.name
        )
        assert n_pred + s_dlq + hb + n_unsigned == n_in["impressions"]
        ends = {(t, x.partition): x.offset + 1 for t in cal_topics for x in read_topic(s, t)}
        assert all(cal.state.offsets.get(tp, 0) >= off for tp, off in ends.items())

        # -- the table for the note
        rows = []
        names = list(_classes()) + [FUTURE]
        for cls in names:
            xs = classes_at[cls]
            cells = []
            for job, topics in consumers.items():
                outs = set()
                for x in xs:
                    if x.topic not in topics:
                        continue
                    d = dl_of.get((job, x.topic, x.partition, x.offset))
                    if d:
                        outs.add(f"dlq/{d.stage}")
                    elif cls == UNSIGNED_HEARTBEAT:
                        outs.add("skipped (control record)")
                    else:
                        outs.add({"archive": "archived", "scorer": "scored"}.get(job, "counted"))
                cells.append(", ".join(sorted(outs)) or "-")
            d = dl_of.get(("features", xs[0].topic, xs[0].partition, xs[0].offset))
            rows.append((cls, *cells, "-", _short(d.reason if d else "")))
        for cls, (key, value) in CAL_CLASSES.items():
            w = next(w for w, x in cal_bad.items() if (x.key, x.value) == (key, value))
            d = dl_of.get((cal_name, *w))
            rows.append(
                (
                    cls,
                    "-",
                    "-",
                    "-",
                    "-",
                    f"dlq/{d.stage}" if d else "learned",
                    _short(d.reason if d else ""),
                )
            )
        with capsys.disabled():
            head = ("input class", "features", "join", "archive", "scorer", "calibrate", "reason")
            print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
            for row in rows:
                print("| " + " | ".join(row) + " |")
            print(
                f"good records: {len(corpus) - len(speed_bad)} ({ref.stats['counted_i']} impressions and {ref.stats['counted_c']} clicks counted, {ref.stats['duplicates']} duplicate), heartbeats {n_hb}"
            )
    finally:
        for j in jobs.values():
            stop_job(j)
    for name in jobs:
        assert "Traceback" not in (tmp_path / f"{name}.log").read_text(), name
