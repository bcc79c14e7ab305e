"""No record stops a job: every decoding path turns whatever a record's bytes raise into that
record's dead letter, with its reason (the codec, the features flow's batched decode and its
per-record fallback, the watermark's future bound, the key contract, the dead-letter
format)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctrstream import events as E
from ctrstream.config import DEAD_LETTER_OVERHEAD_BYTES, Settings
from ctrstream.kafka.deadletters import dead_letter, dead_letter_headers, from_record
from ctrstream.kafka.heartbeats import NO_TIME
from ctrstream.kafka.topics import Record
from ctrstream.streaming.features_flow import Codec, FlowConfig, _EventsPartition

T0 = 1_700_000_000_000


def imp(i: int = 0, **over) -> dict:
    d = dict(
        schema_version=1,
        impression_id=f"imp-{i}",
        event_time_ms=T0 + i,
        user_id=1,
        ad_id=2,
        campaign_id=3,
        advertiser_id=4,
        site_id=5,
        ad_category=6,
        device_type="mobile",
        country="DE",
        position=0,
    )
    d.update(over)
    return d


def raw(d: dict) -> bytes:
    return json.dumps(d).encode()


# one bad value per class the codec must turn into a DecodeError (never another exception)
BAD_VALUES = {
    "invalid UTF-8 in a string": raw(imp()).replace(b'"DE"', b'"D\xff"'),
    "invalid UTF-8 in an id": raw(imp()).replace(b"imp-0", b"imp-\xc3\x28"),
    "binary": bytes(range(256)),
    "NUL bytes": b"\x00" * 64,
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep nesting in a field": raw(imp()).replace(b'"DE"', b"[" * 5000 + b"]" * 5000),
    "huge number": raw(imp(user_id=10**20)),
    "int64 overflow": raw(imp(ad_id=2**63)),
    "float where an int belongs": raw(imp(user_id=1.5)),
    "float-valued int": raw(imp(position=1e300)),
    "empty value": b"",
    "null value": None,
    "JSON null": b"null",
    "empty impression id": raw(imp(impression_id="")),
    "event time beyond year 9999": raw(imp(event_time_ms=10**16)),
    "negative event time": raw(imp(event_time_ms=-1)),
    "oversized": raw(imp(country="x" * 5000)),
}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_the_codec_rejects_every_bad_value_with_a_reason(name):
    with pytest.raises(E.DecodeError) as e:
        E.decode_impression(BAD_VALUES[name])
    assert e.value.reason


def test_a_click_with_an_empty_click_id_is_invalid():
    c = dict(
        schema_version=1,
        click_id="",
        impression_id="imp-0",
        event_time_ms=T0,
        user_id=1,
        ad_id=2,
        campaign_id=3,
        advertiser_id=4,
        site_id=5,
        ad_category=6,
    )
    with pytest.raises(E.DecodeError, match="click_id is empty"):
        E.decode_click(raw(c))


def test_the_batched_decode_gives_each_bad_record_its_own_reason():
    """One bad record among good ones: the batch falls back record by record, whatever the
    bad one raises (``UnicodeDecodeError`` escaped the batched msgspec call)."""
    codec = Codec("impressions")
    for name, bad in BAD_VALUES.items():
        values = [raw(imp(1)), bad, raw(imp(2))]
        keys = [b"imp-1", b"imp-0", b"imp-2"]
        rows, ids, ok, errors = codec.decode(values, keys)
        assert ids == ["imp-1", "imp-2"], name
        assert ok.tolist() == [0, 2], name
        assert [(i, stage) for i, _, stage in errors] == [(1, "decode")], name
        assert rows.shape == (2, rows.shape[1])


def test_a_record_whose_key_is_not_its_impression_id_is_rejected():
    codec = Codec("impressions")
    values = [raw(imp(1)), raw(imp(2)), raw(imp(3))]
    rows, ids, ok, errors = codec.decode(values, [b"imp-1", b"other", None])
    assert ids == ["imp-1"]
    assert [(i, stage) for i, _, stage in errors] == [(1, "key"), (2, "key")]
    assert "expected the impression id b'imp-2'" in errors[0][1]
    assert "no key" in errors[1][1]
    assert E.key_error(b"imp-1", E.decode_impression(values[0])) is None
    # the per-record fallback applies the same contract
    rows, ids, ok, errors = codec.decode([b"{", raw(imp(2))], [b"x", b"wrong"])
    assert ids == [] and [s for _, _, s in errors] == ["decode", "key"]


def _partition(max_t: int, ahead_ms: int, stop_at_end: bool = True, others=None):
    """A features source partition with no Kafka behind it (only the watermark logic)."""
    p = _EventsPartition.__new__(_EventsPartition)
    p.cfg = FlowConfig(Settings(), stop_at_end=stop_at_end)
    p.cfg.part_max.update(others or {})
    p.part_idx, p.max_t, p.ahead = 0, max_t, ahead_ms
    return p


def test_an_event_far_ahead_of_the_watermark_does_not_move_it():
    ahead = 3_600_000
    p = _partition(T0, ahead)
    t = np.array([T0 + 1, 32_503_680_000_000] + [T0 + 2 + k for k in range(200)], np.int64)
    fut = p.future_mask(t, np.ones(len(t), bool))
    assert fut.tolist() == [False, True] + [False] * 200
    # a heartbeat (not a candidate) moves the watermark as far as it says
    t2 = np.array([T0 + 10 * ahead, T0 + 10 * ahead + 5], np.int64)
    assert p.future_mask(t2, np.array([False, True])).tolist() == [False, False]
    # several in a row: each against the watermark the ones before it left
    t3 = np.array([T0 + 2 * ahead, T0 + 3 * ahead, T0 + ahead, T0 + 2 * ahead], np.int64)
    assert p.future_mask(t3, np.ones(4, bool)).tolist() == [True, True, False, False]


def test_a_partitions_first_event_is_bounded_by_the_others_and_the_wall_clock():
    ahead = 3_600_000
    t = np.array([32_503_680_000_000, T0], np.int64)
    cand = np.ones(2, bool)
    # nothing known: no bound for a finite replay
    assert _partition(NO_TIME, ahead).future_mask(t, cand).tolist() == [False, False]
    # another partition of the job knows the time
    p = _partition(NO_TIME, ahead, others={3: T0})
    assert p.future_mask(t, cand).tolist() == [True, False]
    # a live stream: the wall clock
    p = _partition(NO_TIME, ahead, stop_at_end=False)
    assert p.future_mask(t, cand).tolist() == [True, False]


def test_a_dead_letter_is_the_original_record_with_the_error_in_connect_headers():
    value = b"\xff\x00 not json"
    dl = dead_letter("malformed JSON: x" * 10_000, "impressions", 3, 42, value, key=b"k", job="j")
    assert len(dl.reason) < DEAD_LETTER_OVERHEAD_BYTES // 4
    headers = dead_letter_headers(dl)
    names = [h for h, _ in headers]
    for h in ("topic", "partition", "offset", "stage", "exception.message", "connector.name"):
        assert f"__connect.errors.{h}" in names
    rec = Record("dlq", 0, 7, b"k", value, 0, [(h, v) for h, v in headers])  # type: ignore[misc]
    back = from_record(rec)
    assert back == dl
    # null stays null
    dl = dead_letter("empty record: value is null", "clicks", 0, 1, None, job="j")
    rec = Record("dlq", 0, 8, None, None, 0, dead_letter_headers(dl))  # type: ignore[arg-type]
    assert from_record(rec) == dl
    assert from_record(Record("dlq", 0, 9, None, b"x", 0, None)) is None


def test_the_dlq_accepts_any_source_record_plus_its_headers():
    s = Settings()
    biggest = max(t.max_message_bytes for t in s.topics.all() if t.name != s.topics.dlq.name)
    assert s.topics.dead_letter_max_bytes() == biggest + DEAD_LETTER_OVERHEAD_BYTES
    assert s.topics.max_message_bytes(s.topics.dlq) == s.topics.dead_letter_max_bytes()
    assert s.max_event_ahead_s > 0


def test_a_huge_records_dead_letter_fits_the_dead_letter_producer():
    """A value of about 750 KB or more (the source topic accepts 8 MiB) has a dead letter the
    producer takes: the producer checks the size when the record is queued, before any
    broker is involved."""
    from ctrstream.config import KafkaSettings
    from ctrstream.kafka.deadletters import DlqWriter

    s = Settings(kafka=KafkaSettings(bootstrap="127.0.0.1:9"))  # never reached
    w = DlqWriter(s)
    for size in (750_000, 1_000_000, 8 * 1024 * 1024 - 200):
        w.write([dead_letter("oversized", "impressions", 0, size, b"x" * size, job="t")])
    assert len(w.producer) == 3
    w.producer.purge()


def test_murmur2_is_kafkas_default_partitioner():
    """The Java client's test vectors (``UtilsTest.testMurmur2``), and the vectorized version
    the features job uses agrees with the scalar one on keys of every length."""
    import random

    from ctrstream.streaming.features_flow import murmur2_partitions

    vectors = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for key, java in vectors.items():
        assert E.murmur2(key) == java & 0xFFFFFFFF
    rng = random.Random(1)
    keys = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))) for _ in range(3000)]
    for n in (1, 4, 7):
        assert murmur2_partitions(keys, n).tolist() == [E.partition_for(k, n) for k in keys]
    k = b"imp-42"
    assert E.partition_error(k, E.partition_for(k, 4), 4) is None
    wrong = (E.partition_for(k, 4) + 1) % 4
    assert "murmur2_random" in (E.partition_error(k, wrong, 4) or "")


def test_a_bad_label_gets_its_dead_letter_reason():
    """The labeled topic's consumers (the calibrator, the decay monitor) share one check and
    one reason per kind of failure."""
    fields = dict(
        schema_version=1, event_time_ms=1_700_000_000_000, user_id=1, ad_id=2, campaign_id=3,
        advertiser_id=4, site_id=5, ad_category=6, device_type="mobile", country="US", position=0,
    )  # fmt: skip
    imp = E.Impression(impression_id="i1", **fields)
    E.check_labeled(E.Labeled(impression=imp, clicked=1, click_delay_ms=5))
    with pytest.raises(ValueError, match="clicked=2 must be 0 or 1") as e:
        E.check_labeled(E.Labeled(impression=imp, clicked=2, click_delay_ms=5))
    assert E.bad_record_reason(e.value) == "invalid: clicked=2 must be 0 or 1"
    empty = E.Impression(impression_id="", **fields)
    with pytest.raises(ValueError, match="impression_id is empty"):
        E.check_labeled(E.Labeled(impression=empty, clicked=0, click_delay_ms=None))
    with pytest.raises(Exception) as bad_json:
        E.decode_labeled(b"{not json")
    assert E.bad_record_reason(bad_json.value).startswith("malformed JSON: ")
    with pytest.raises(Exception) as bad_type:
        E.decode_labeled(b'{"impression": {}, "clicked": "yes"}')
    assert E.bad_record_reason(bad_type.value).startswith("invalid: ")
    assert E.bad_record_reason(KeyError("x")) == "malformed: KeyError: 'x'"
