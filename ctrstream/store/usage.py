"""What the views cost in Redis memory: ``MEMORY USAGE`` of their hashes, by entity family.

The capacity plan (``docs/capacity.md``) turns these figures into shards and RAM: bytes per
speed-view day hash of each entity family (with the per-field cost fitted over the sample,
so that a hash with more buckets than the replay produced can be priced), bytes per entity
in a batch-view version (all of the entity's hashes together), and the server's
``used_memory``. Keys come from ``SCAN`` (every node of a cluster client); a random sample
of them is measured with pipelined ``MEMORY USAGE key SAMPLES 0`` (exact for a hash: every
field counted), ``HLEN`` and ``OBJECT ENCODING``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctrstream.store import layout as L
from ctrstream.store.scan import scan_keys, text

CHUNK = 5000  # keys per pipelined round trip


@dataclass(frozen=True)
class FieldCost:
    """A least-squares line ``bytes = base + per_field x fields`` over sampled hashes of one
    encoding (``listpack``: small hashes, ``hashtable``: past ``hash-max-listpack-entries``)."""

    encoding: str
    hashes: int
    base_bytes: float
    per_field_bytes: float
    max_fields: int


@dataclass(frozen=True)
class FamilyUsage:
    """One entity family's memory in a view (the speed view: per day hash; a batch view: per
    entity, all of its hashes summed)."""

    family: str
    count: int  # day hashes (speed view) or entities (batch view) found by SCAN
    sampled: int
    bytes_mean: float
    fields_mean: float
    bytes_p99: float
    keys_per_item: float  # hashes per entity (batch view); 1 for a day hash


@dataclass(frozen=True)
class ViewUsage:
    families: list[FamilyUsage]
    field_costs: list[FieldCost]
    total_keys: int
    sampled_bytes: int


def _measure(client: Any, keys: list[bytes]) -> list[tuple[int, int, str]]:
    """``(MEMORY USAGE, HLEN, encoding)`` of each key, pipelined (0, 0, '' for a key that
    expired since the SCAN)."""
    out: list[tuple[int, int, str]] = []
    for i in range(0, len(keys), CHUNK):
        pipe = client.pipeline(transaction=False)
        for k in keys[i : i + CHUNK]:
            pipe.execute_command("MEMORY", "USAGE", k, "SAMPLES", "0")
            pipe.hlen(k)
            pipe.object("encoding", k)
        replies = pipe.execute(raise_on_error=False)
        for j in range(0, len(replies), 3):
            mem, n, enc = replies[j : j + 3]
            ok = isinstance(mem, int) and isinstance(n, int)
            out.append(
                (
                    mem if ok else 0,
                    n if ok else 0,
                    text(enc) if isinstance(enc, bytes | str) else "",
                )
            )
    return out


def _fit(points: list[tuple[int, int, str]]) -> list[FieldCost]:
    costs = []
    for enc in sorted({e for _, _, e in points if e}):
        xs = np.array([n for m, n, e in points if e == enc and m], dtype=float)
        ys = np.array([m for m, n, e in points if e == enc and m], dtype=float)
        if len(xs) < 2 or np.ptp(xs) == 0:
            slope, base = (0.0, float(ys.mean())) if len(ys) else (0.0, 0.0)
        else:
            slope, base = (float(v) for v in np.polyfit(xs, ys, 1))
        costs.append(FieldCost(enc, len(xs), base, slope, int(xs.max()) if len(xs) else 0))
    return costs


def _speed_family(key: str) -> str | None:
    """The family of a speed-view day hash: its entity, or under a layout that groups
    entities by root (``layout.speed_layout``, where the store has one) its root entity,
    whose hash also holds the crosses rooted at it."""
    layouts = getattr(L, "speed_layout", None)
    if layouts is not None:
        parsed = layouts().parse_key(key)
        return None if parsed is None else parsed[0]
    try:
        entity, eid, _ = L.speed_entity_of(key)
    except ValueError:
        return None
    return entity if eid else None


def speed_view_usage(client: Any, sample: int = 20_000, seed: int = 0) -> ViewUsage:
    """Memory of the speed view's day hashes by entity family: up to ``sample`` random hashes
    of each family measured, and the per-field cost fitted over all of them."""
    if sample < 1:
        raise ValueError(f"sample must be a positive number of hashes, not {sample}")
    keys = scan_keys(client, L.SPEED_PATTERN, _speed_family)
    by_family: dict[str, list[bytes]] = {}
    for k, fam in keys:
        by_family.setdefault(fam, []).append(k)
    rng = random.Random(seed)
    families, points = [], []
    for fam in sorted(by_family):
        ks = by_family[fam]
        picked = ks if len(ks) <= sample else rng.sample(ks, sample)
        got = [g for g in _measure(client, picked) if g[0]]
        points += got
        mem = np.array([m for m, _, _ in got], dtype=float)
        fields = np.array([n for _, n, _ in got], dtype=float)
        families.append(
            FamilyUsage(
                fam,
                len(ks),
                len(got),
                float(mem.mean()) if len(mem) else 0.0,
                float(fields.mean()) if len(fields) else 0.0,
                float(np.percentile(mem, 99)) if len(mem) else 0.0,
                1.0,
            )
        )
    return ViewUsage(families, _fit(points), len(keys), int(sum(m for m, _, _ in points)))


def batch_view_usage(client: Any, version: str, sample: int = 20_000, seed: int = 0) -> ViewUsage:
    """Memory of batch-view version ``version`` by entity family, per entity (its
    per-resolution, long-window and suffix-sum hashes together): up to ``sample`` random
    entities of each family measured."""
    if sample < 1:
        raise ValueError(f"sample must be a positive number of entities, not {sample}")
    keys = scan_keys(
        client, L.batch_version_pattern(version), lambda k: L.batch_entity_of(version, k)
    )
    by_entity: dict[tuple[str, str], list[bytes]] = {}
    for k, (entity, eid, _part) in keys:
        by_entity.setdefault((entity, eid), []).append(k)
    by_family: dict[str, list[tuple[str, str]]] = {}
    for ent in by_entity:
        by_family.setdefault(ent[0], []).append(ent)
    rng = random.Random(seed)
    families, points = [], []
    for fam in sorted(by_family):
        ents = by_family[fam]
        picked = ents if len(ents) <= sample else rng.sample(ents, sample)
        flat = [k for e in picked for k in by_entity[e]]
        got = _measure(client, flat)
        points += [g for g in got if g[0]]
        per_entity, per_fields, i = [], [], 0
        for e in picked:
            n = len(by_entity[e])
            part = got[i : i + n]
            i += n
            per_entity.append(sum(m for m, _, _ in part))
            per_fields.append(sum(f for _, f, _ in part))
        mem = np.array(per_entity, dtype=float)
        families.append(
            FamilyUsage(
                fam,
                len(ents),
                len(picked),
                float(mem.mean()) if len(mem) else 0.0,
                float(np.mean(per_fields)) if per_fields else 0.0,
                float(np.percentile(mem, 99)) if len(mem) else 0.0,
                sum(len(by_entity[e]) for e in ents) / len(ents),
            )
        )
    return ViewUsage(families, _fit(points), len(keys), int(sum(m for m, _, _ in points)))


def used_memory(client: Any) -> int:
    """The server's ``used_memory`` in bytes (summed over the nodes of a cluster client)."""
    info = client.info("memory")
    if "used_memory" in info:
        return int(info["used_memory"])
    return sum(int(v["used_memory"]) for v in info.values() if isinstance(v, dict))


def listpack_limit(client: Any) -> int:
    """``hash-max-listpack-entries``: the field count past which a hash turns into a
    hashtable (and costs more per field)."""
    got = client.config_get("hash-max-listpack-entries")
    return int(next(iter(got.values())))


__all__ = [
    "FamilyUsage",
    "FieldCost",
    "ViewUsage",
    "batch_view_usage",
    "listpack_limit",
    "speed_view_usage",
    "used_memory",
]
