"""Generated (or recorded) traffic: its clean tables, the oracle, the replay stream, and its
files on disk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctrstream.events import Click, Impression
from ctrstream.simulation.dirty import Plan, make_plan
from ctrstream.simulation.records import (
    _STRING_FIELDS,
    CLICK_FIELDS,
    CLICK_SCHEMA,
    IMPRESSION_FIELDS,
    IMPRESSION_SCHEMA,
    ORACLE_SCHEMA,
    TOPIC_KINDS,
    as_object,
    encode_rows,
)
from ctrstream.simulation.scenarios import Scenario, load_scenario


class Traffic:
    """Generated (or recorded) traffic: clean event tables, the oracle, and the replay plan."""

    def __init__(
        self,
        scenario: Scenario,
        impressions: pa.Table,
        clicks: pa.Table,
        oracle: pa.Table,
        meta: dict | None = None,
    ):
        self.scenario = scenario
        self.impressions = impressions
        self.clicks = clicks
        self.oracle = oracle
        self.meta = dict(meta or {})
        # per-impression terms of the hidden logit (numpy arrays in impression order: logit,
        # user, ad, site, heat, interest, site_category, fatigue, trend; intercept): set by
        # ``generate`` only, kept in memory, never written (bench/ne_gap.py decomposes with it)
        self.truth: dict | None = None
        self._plan_cache: Plan | None = None
        self._enc_cols: tuple | None = None

    def __repr__(self) -> str:
        return (
            f"Traffic(scenario={self.scenario.name!r}, impressions={self.impressions.num_rows}, "
            f"clicks={self.clicks.num_rows}, records={self.n_records})"
        )

    # -- the replay plan ------------------------------------------------------------------
    @property
    def _plan(self) -> Plan:
        if self._plan_cache is None:
            self._plan_cache = make_plan(self)
        return self._plan_cache

    @property
    def injected(self) -> dict:
        """Counts of what the dirty scenario injected (all zero for clean traffic)."""
        return self._plan.injected

    @property
    def malformed(self) -> pa.Table:
        """The injected malformed records: key, topic, kind, expected reason, timestamp, value."""
        return self._plan.malformed

    @property
    def n_records(self) -> int:
        return len(self._plan.order)

    def __len__(self) -> int:
        return self.n_records

    def record_blocks(self, block: int = 65_536) -> Iterator[tuple[list, list, list, list]]:
        """The replay stream in blocks of parallel lists: (topic kinds, keys, values, timestamps)."""
        plan = self._plan
        imp_cols, imp_keys, clk_cols, clk_keys = self._encoding_columns()
        kind_names = np.array(TOPIC_KINDS + ("?",), dtype=object)
        mal_topic = np.array(
            [TOPIC_KINDS.index(t) for t in plan.malformed["topic"].to_pylist()], dtype=np.int8
        )
        mal_vals = np.array(plan.malformed["value"].to_pylist() + [b""], dtype=object)[:-1]
        mal_keys = np.array(
            [k.encode() for k in plan.malformed["key"].to_pylist()] + [b""], dtype=object
        )[:-1]
        for lo in range(0, len(plan.order), block):
            sel = plan.order[lo : lo + block]
            src, idx = plan.src_kind[sel], plan.src_idx[sel]
            m = len(sel)
            values = np.empty(m, dtype=object)
            keys = np.empty(m, dtype=object)
            topic = src.copy()
            for s, cols, key_arr, cls in (
                (0, imp_cols, imp_keys, Impression),
                (1, clk_cols, clk_keys, Click),
            ):
                mask = src == s
                if not mask.any():
                    continue
                rows = idx[mask]
                values[mask] = as_object(encode_rows(cols, rows, cls))
                keys[mask] = key_arr[rows]
            mask = src == 2
            if mask.any():
                rows = idx[mask]
                values[mask] = mal_vals[rows]
                keys[mask] = mal_keys[rows]
                topic[mask] = mal_topic[rows]
            yield (
                kind_names[topic].tolist(),
                keys.tolist(),
                values.tolist(),
                plan.timestamp[sel].tolist(),
            )

    def records(self, block: int = 65_536) -> Iterator[tuple[str, bytes, bytes, int]]:
        """(topic kind, key, value, Kafka timestamp ms) in replay order, injections included."""
        for kinds, keys, values, ts in self.record_blocks(block):
            yield from zip(kinds, keys, values, ts)

    def encoded(self, kind: str, block: int = 65_536) -> Iterator[list[bytes]]:
        """The clean events of one table, encoded, in blocks (table order)."""
        imp_cols, _, clk_cols, _ = self._encoding_columns()
        cols, cls, n = (
            (imp_cols, Impression, self.impressions.num_rows)
            if kind == "impressions"
            else (clk_cols, Click, self.clicks.num_rows)
        )
        for lo in range(0, n, block):
            yield encode_rows(cols, np.arange(lo, min(n, lo + block)), cls)

    def _encoding_columns(self):
        if self._enc_cols is None:

            def cols(table: pa.Table, fields):
                out = []
                for f in fields:
                    col = table.column(f).combine_chunks()
                    out.append(col if f in _STRING_FIELDS else col.to_numpy())
                return out

            imp_keys = np.array(
                self.impressions.column("impression_id")
                .combine_chunks()
                .cast(pa.binary())
                .to_pylist()
                + [b""],
                dtype=object,
            )[:-1]
            clk_keys = np.array(
                self.clicks.column("impression_id").combine_chunks().cast(pa.binary()).to_pylist()
                + [b""],
                dtype=object,
            )[:-1]
            self._enc_cols = (
                cols(self.impressions, IMPRESSION_FIELDS),
                imp_keys,
                cols(self.clicks, CLICK_FIELDS),
                clk_keys,
            )
        return self._enc_cols


def write_traffic(tr: Traffic, out_dir, jsonl: bool = False) -> Path:
    """Write impressions/clicks/oracle Parquet, scenario.json (scenario, meta, injected) and,
    when there are any, malformed.parquet; with ``jsonl`` also the clean events as JSONL."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = dict(compression="zstd", use_dictionary=True)
    pq.write_table(tr.impressions, out / "impressions.parquet", **opts)
    pq.write_table(tr.clicks, out / "clicks.parquet", **opts)
    pq.write_table(tr.oracle, out / "oracle.parquet", **opts)
    if tr.malformed.num_rows:
        pq.write_table(tr.malformed, out / "malformed.parquet", **opts)
    doc = {"format": 1, "scenario": tr.scenario.to_dict(), "meta": tr.meta, "injected": tr.injected}
    (out / "scenario.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    if jsonl:
        for kind in TOPIC_KINDS:
            with open(out / f"{kind}.jsonl", "wb") as fh:
                for blk in tr.encoded(kind):
                    fh.write(b"\n".join(blk) + (b"\n" if blk else b""))
    return out


def read_traffic(out_dir) -> Traffic:
    """Read what :func:`write_traffic` wrote. The replay plan (dirty injections included) is
    recomputed from the tables and the scenario, so ``records()`` is identical."""
    d = Path(out_dir)
    missing = [f for f in ("impressions.parquet", "clicks.parquet") if not (d / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"{d} has no {', '.join(missing)}: not a traffic directory "
            "(write one with `ctrstream generate --out DIR`)"
        )
    imps = pq.read_table(d / "impressions.parquet").cast(IMPRESSION_SCHEMA)
    clicks = pq.read_table(d / "clicks.parquet").cast(CLICK_SCHEMA)
    oracle = (
        pq.read_table(d / "oracle.parquet").cast(ORACLE_SCHEMA)
        if (d / "oracle.parquet").exists()
        else ORACLE_SCHEMA.empty_table()
    )
    if (d / "scenario.json").exists():
        doc = json.loads((d / "scenario.json").read_text())
        sc = load_scenario(str(d / "scenario.json"))
        meta = doc.get("meta", {})
    else:
        sc = Scenario(name="recorded", events=max(1, imps.num_rows))
        meta = {}
    return Traffic(sc, imps, clicks, oracle, meta)
