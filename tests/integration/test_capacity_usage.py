"""Redis memory by entity family (ctrstream.store.usage), the capacity plan's memory input:
every day hash found and measured per family, the per-field cost fitted per encoding."""

from __future__ import annotations

import pytest
import redis

from ctrstream import features as F
from ctrstream.store import usage
from ctrstream.store.speed_view import repair_speed_cells

DB = 13  # a database of its own: the measurement scans the whole keyspace
DAY = 20_000  # an event day (days since the epoch)
MINUTE_RES = next(r for r in F.RESOLUTIONS if r.bucket_ms == F.MINUTE_MS)


@pytest.fixture
def client(settings):
    c = redis.Redis(
        host=settings.redis.host, port=settings.redis.port, password=settings.redis.password, db=DB
    )
    c.flushdb()
    yield c
    c.flushdb()
    c.close()


def cells(entity: str, eid: str, n: int) -> dict:
    """``n`` impression cells of one entity on day DAY (one minute bucket each)."""
    first = DAY * F.DAY_MS // F.MINUTE_MS
    return {(entity, eid, MINUTE_RES.name, "i", first + k): k + 1 for k in range(n)}


def test_speed_view_memory_by_family_and_the_per_field_cost(client):
    limit = usage.listpack_limit(client)
    repairs: dict = {}
    for u in range(50):  # small hashes: 1..10 fields (listpack)
        repairs |= cells("user", str(u), 1 + u % 10)
    for s, extra in enumerate((20, 60, 140)):  # past the listpack limit (hashtable)
        repairs |= cells("site", str(s), limit + extra)
    repair_speed_cells(client, repairs, hash_ttl_ms=3_600_000)

    got = usage.speed_view_usage(client, sample=20)
    fam = {f.family: f for f in got.families}
    assert set(fam) == {"user", "site"} and got.total_keys == 53
    assert fam["user"].count == 50 and fam["user"].sampled == 20
    assert 1 <= fam["user"].fields_mean <= 10 and fam["user"].bytes_mean > 0
    assert fam["site"].count == 3 and fam["site"].sampled == 3
    assert fam["site"].fields_mean == pytest.approx(limit + 220 / 3)
    assert fam["site"].bytes_mean > 10 * fam["user"].bytes_mean
    enc = {c.encoding: c for c in got.field_costs}
    assert set(enc) == {"listpack", "hashtable"}
    assert enc["listpack"].hashes == 20 and enc["listpack"].per_field_bytes > 0
    assert enc["hashtable"].hashes == 3 and enc["hashtable"].per_field_bytes > 0
    # the fit prices the measured hashes back to within a few percent
    site_fit = (
        enc["hashtable"].base_bytes + enc["hashtable"].per_field_bytes * fam["site"].fields_mean
    )
    assert site_fit == pytest.approx(fam["site"].bytes_mean, rel=0.05)
    assert usage.used_memory(client) > got.sampled_bytes > 0
    with pytest.raises(ValueError, match="positive"):
        usage.speed_view_usage(client, sample=0)
