"""The replay plan of generated traffic: the replay order, and in the ``dirty`` scenario the
injected duplicates, out-of-order and late records and the malformed ones (see
:mod:`ctrstream.simulation.generator`, "Replay order")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctrstream.events import MAX_EVENT_BYTES, Click, Impression
from ctrstream.simulation.records import (
    _STRING_FIELDS,
    CLICK_FIELDS,
    EXPECTED_REASON,
    IMPRESSION_FIELDS,
    MALFORMED_SCHEMA,
    TOPIC_KINDS,
    encode_rows,
)
from ctrstream.simulation.scenarios import MALFORMED_KINDS, Scenario


@dataclass
class Plan:
    order: np.ndarray  # positions into the concatenated record arrays, in replay order
    src_kind: np.ndarray  # 0 impression row, 1 click row, 2 malformed row
    src_idx: np.ndarray
    timestamp: np.ndarray  # Kafka record timestamp (event time; arrival time for malformed)
    injected: dict
    malformed: pa.Table = field(default_factory=lambda: MALFORMED_SCHEMA.empty_table())


def make_plan(tr: Any) -> Plan:
    sc = tr.scenario
    n_i, n_c = tr.impressions.num_rows, tr.clicks.num_rows
    imp_t = tr.impressions.column("event_time_ms").to_numpy()
    clk_t = tr.clicks.column("event_time_ms").to_numpy()
    src_kind = [np.zeros(n_i, np.int8), np.ones(n_c, np.int8)]
    src_idx = [np.arange(n_i), np.arange(n_c)]
    ts = [imp_t, clk_t]
    pos = [imp_t, clk_t]
    counts = {"duplicates": 0, "out_of_order": 0, "late": 0}
    by_topic = {
        k: {"clean": n, "duplicates": 0, "out_of_order": 0, "late": 0, "malformed": 0}
        for k, n in zip(TOPIC_KINDS, (n_i, n_c))
    }
    mal_counts = {k: 0 for k in MALFORMED_KINDS}
    malformed = MALFORMED_SCHEMA.empty_table()
    n_clean = n_i + n_c
    dirty = sc.duplicate_rate or sc.out_of_order_rate or sc.late_event_rate or sc.malformed_rate
    if dirty and n_clean:
        rng = np.random.default_rng([sc.seed, 0xD1])
        all_t = np.concatenate([imp_t, clk_t])
        t_lo, t_hi = int(all_t.min()), int(all_t.max())
        clicked = pc.is_in(
            tr.impressions.column("impression_id"),
            value_set=tr.clicks.column("impression_id").combine_chunks(),
        ).to_numpy(zero_copy_only=False)
        # candidates: records that are the last event of their key (order per key is kept)
        cand = np.concatenate([np.flatnonzero(~clicked), n_i + np.arange(n_c)])
        cand = cand[rng.permutation(len(cand))]
        lateness = int(sc.allowed_lateness_s * 1000)
        late_disp = lateness + rng.integers(60_000, 600_000, len(cand))
        late_ok = all_t[cand] + late_disp + 60_000 <= t_hi
        n_late = min(int(round(sc.late_event_rate * n_clean)), int(late_ok.sum()))
        late_sel = cand[late_ok][:n_late]
        late_d = late_disp[late_ok][:n_late]
        rest = cand[~np.isin(cand, late_sel)]
        n_ooo = min(int(round(sc.out_of_order_rate * n_clean)), len(rest))
        ooo_sel = rest[:n_ooo]
        ooo_d = rng.integers(1_000, int(sc.out_of_order_max_s * 1000) + 1, n_ooo)
        n_dup = min(int(round(sc.duplicate_rate * n_clean)), len(rest) - n_ooo)
        dup_sel = rest[n_ooo : n_ooo + n_dup]
        dup_d = rng.integers(1, 2_001, n_dup)
        disp = np.zeros(n_clean, dtype=np.int64)
        disp[late_sel] = late_d
        disp[ooo_sel] = ooo_d
        pos = [imp_t + disp[:n_i], clk_t + disp[n_i:]]
        for name, sel in (("late", late_sel), ("out_of_order", ooo_sel), ("duplicates", dup_sel)):
            counts[name] = len(sel)
            by_topic["impressions"][name] = int((sel < n_i).sum())
            by_topic["clicks"][name] = int((sel >= n_i).sum())
        # duplicates: exact copies, shortly after the original
        dup_kind = (dup_sel >= n_i).astype(np.int8)
        dup_idx = np.where(dup_kind == 1, dup_sel - n_i, dup_sel)
        src_kind.append(dup_kind)
        src_idx.append(dup_idx)
        ts.append(all_t[dup_sel])
        pos.append(all_t[dup_sel] + dup_d)
        # malformed records
        malformed = _malformed(tr, sc, rng, n_clean, t_lo, t_hi)
        for k in MALFORMED_KINDS:
            mal_counts[k] = int(pc.sum(pc.equal(malformed["kind"], k)).as_py() or 0)
        for tk in TOPIC_KINDS:
            by_topic[tk]["malformed"] = int(pc.sum(pc.equal(malformed["topic"], tk)).as_py() or 0)
        nm = malformed.num_rows
        mts = malformed["timestamp_ms"].to_numpy()
        src_kind.append(np.full(nm, 2, np.int8))
        src_idx.append(np.arange(nm))
        ts.append(mts)
        pos.append(mts)
    src_kind_a = np.concatenate(src_kind)
    src_idx_a = np.concatenate(src_idx).astype(np.int64)
    ts_a = np.concatenate(ts).astype(np.int64)
    pos_a = np.concatenate(pos).astype(np.int64)
    order = np.lexsort((np.arange(len(pos_a)), pos_a))
    for tk in TOPIC_KINDS:
        b = by_topic[tk]
        b["records"] = b["clean"] + b["duplicates"] + b["malformed"]
    injected = {
        **counts,
        "malformed": mal_counts,
        "malformed_total": sum(mal_counts.values()),
        "by_topic": by_topic,
        "records": int(len(order)),
    }
    return Plan(
        order=order,
        src_kind=src_kind_a,
        src_idx=src_idx_a,
        timestamp=ts_a,
        injected=injected,
        malformed=malformed,
    )


_INT_FIELDS_IMP = [
    f for f in IMPRESSION_FIELDS if f not in _STRING_FIELDS and f != "schema_version"
]
_INT_FIELDS_CLK = [f for f in CLICK_FIELDS if f not in _STRING_FIELDS and f != "schema_version"]


def _malformed(tr: Any, sc: Scenario, rng, n_clean: int, t_lo: int, t_hi: int) -> pa.Table:
    per_kind = int(round(sc.malformed_rate * n_clean))
    rows: dict[str, list] = {k: [] for k in MALFORMED_SCHEMA.names}
    imp_cols, _, clk_cols, _ = tr._encoding_columns()
    n_i, n_c = tr.impressions.num_rows, tr.clicks.num_rows
    for kind in MALFORMED_KINDS:
        for j in range(per_kind):
            topic = 1 if (n_c and rng.random() < 0.5) else 0
            if topic == 0:
                src = encode_rows(imp_cols, np.array([rng.integers(0, n_i)]), Impression)[0]
                ints, pad_field = _INT_FIELDS_IMP, "country"
            else:
                src = encode_rows(clk_cols, np.array([rng.integers(0, n_c)]), Click)[0]
                ints, pad_field = _INT_FIELDS_CLK, "click_id"
            doc = msgspec.json.decode(src)
            if kind == "bad_json":
                value = src[: int(rng.integers(1, len(src) - 1))]
            elif kind == "wrong_type":
                f = ints[int(rng.integers(0, len(ints)))]
                doc[f] = str(doc[f])
                value = msgspec.json.encode(doc)
            elif kind == "missing_field":
                f = list(doc)[int(rng.integers(1, len(doc)))]
                del doc[f]
                value = msgspec.json.encode(doc)
            else:  # oversized: schema-valid, only too big
                doc[pad_field] = doc[pad_field] + "x" * (
                    MAX_EVENT_BYTES + int(rng.integers(1, 512))
                )
                value = msgspec.json.encode(doc)
            rows["key"].append(f"malformed-{kind}-{j}")
            rows["topic"].append(TOPIC_KINDS[topic])
            rows["kind"].append(kind)
            rows["reason"].append(EXPECTED_REASON[kind])
            rows["timestamp_ms"].append(int(rng.integers(t_lo, t_hi + 1)))
            rows["value"].append(value)
    return pa.Table.from_pydict(rows, schema=MALFORMED_SCHEMA)
