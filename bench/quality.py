"""Model quality against the truth, by data volume: the issue's NE target, measured.

For every (impressions, scenario seed) this runs exactly what ``ctrstream train --scenario
NAME --events N --scenario-seed S`` runs (point-in-time training set, 1 h warm-up, last
10 % of event time = validation, LR baseline and DCN-v2 with their defaults, ONNX export)
and reports each model's NE gap to the oracle on the same validation rows:
``gap = model NE / oracle NE - 1``. The target (issue 5) is a deep gap <= 3 % and a deep
NE below the baseline's.

Why by volume: the scenario's ad, site and site x category effects are learnable only as
well as the training rows pin them down (an ad with 300 impressions has about 6 clicks),
so the gap falls as the same 6 h marketplace gets more impressions per entity.
``--floor`` adds ``bench/ne_floor.py``'s estimate of the floor under any model's gap on the
same rows (it generates the scenario a second time).

Run: ``ctrstream bench quality`` (defaults: ``steady``, 1M / 2M / 4M / 8M impressions,
scenario seeds 1, 2, 3: 27 min on 2 cores with ``--floor``; peak RSS 16.3 GB training and
17.5 GB for the floor at 8M). Results:
``bench/results/quality.json``. See docs/training.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ctrstream.bench.common import positive_ints

TARGET_GAP = 0.03


def _peak_rss_gb() -> float:
    import os

    from ctrstream.bench.common import rss_kb

    return rss_kb(os.getpid()) / 1e6


def _train_row(
    scenario: str, events: int, seed: int, training_seed: int, warmup_hours: float
) -> dict:
    """One ``ctrstream train`` run, evaluated; runs in its own process (see :func:`_isolated`)."""
    from ctrstream.batch.pipeline import run_training
    from ctrstream.cli.train import load_training_data
    from ctrstream.config import get_settings

    settings = get_settings()
    t0 = time.perf_counter()
    ds, oracle, source = load_training_data(settings, scenario, events, seed, log=lambda *a: None)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="ctrstream-quality-") as tmp:
        summary = run_training(
            settings,
            ds,
            oracle,
            ("lr", "deep"),
            Path(tmp),
            seed=training_seed,
            source=source,
            progress=False,
            log=lambda *a: None,
            warmup_hours=warmup_hours,
        )
    ev = {k: v["evaluation"] for k, v in summary["models"].items()}
    oracle_ne = ev["deep"]["oracle"]["ne"]
    row = {
        "events": events,
        "seed": seed,
        "train_seed": training_seed,
        "val_rows": summary["val_rows"],
        "val_clicks": ev["deep"]["clicks"],
        "oracle_ne": oracle_ne,
        "lr_ne": ev["lr"]["model"]["ne"],
        "deep_ne": ev["deep"]["model"]["ne"],
        "lr_gap_pct": 100 * (ev["lr"]["model"]["ne"] / oracle_ne - 1),
        "deep_gap_pct": 100 * (ev["deep"]["model"]["ne"] / oracle_ne - 1),
        "deep_auc": ev["deep"]["model"]["auc"],
        "oracle_auc": ev["deep"]["oracle"]["auc"],
        "build_s": build_s,
        "lr_train_s": summary["models"]["lr"]["train_seconds"],
        "deep_train_s": summary["models"]["deep"]["train_seconds"],
        "peak_rss_gb": _peak_rss_gb(),
    }
    row["target_met"] = bool(
        row["deep_gap_pct"] <= 100 * TARGET_GAP and row["deep_ne"] < row["lr_ne"]
    )
    return row


def _floor_row(scenario: str, events: int, seed: int, warmup_hours: float) -> dict:
    from ctrstream.bench.ne_floor import report
    from ctrstream.simulation.generator import load_scenario

    res = report(load_scenario(scenario, events=events, seed=seed), warmup_hours)
    all_key = "all: marginalised + ad, site, site x category estimated"
    return {
        "floor_gap_pct": 100 * (res[all_key] / res["oracle"] - 1),
        "floor_peak_rss_gb": _peak_rss_gb(),
    }


def _isolated(fn, *args):
    """``fn(*args)`` in a fresh process: each data set's memory (16 GB at 8M
    impressions) is returned to the system before the next one is built."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def measure(
    scenario: str,
    events: int,
    seed: int,
    training_seed: int,
    floor: bool,
    warmup_hours: float = 1.0,
) -> dict:
    row = _isolated(_train_row, scenario, events, seed, training_seed, warmup_hours)
    if floor:
        row |= _isolated(_floor_row, scenario, events, seed, warmup_hours)
    return row


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def main(argv: list[str] | None = None) -> int:
    from ctrstream.bench.common import print_table, write_results

    ap = argparse.ArgumentParser(
        prog="ctrstream bench quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--scenario", default="steady")
    ap.add_argument(
        "--events",
        type=positive_ints,
        default=[1_000_000, 2_000_000, 4_000_000, 8_000_000],
        help="impressions per data set, comma-separated",
    )
    ap.add_argument(
        "--seeds", type=positive_ints, default=[1, 2, 3], help="scenario seeds, comma-separated"
    )
    ap.add_argument("--train-seed", type=int, default=0, help="training seed (data order, init)")
    ap.add_argument(
        "--floor", action="store_true", help="also estimate the floor (bench/ne_floor.py)"
    )
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)

    rows = []
    for events in args.events:
        for seed in args.seeds:
            t0 = time.perf_counter()
            row = measure(args.scenario, events, seed, args.train_seed, args.floor)
            rows.append(row)
            print(
                f"{events:>10,} impressions, seed {seed}: deep gap {row['deep_gap_pct']:+.2f} %, "
                f"LR gap {row['lr_gap_pct']:+.2f} % ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    summary = []
    for events in args.events:
        rs = [r for r in rows if r["events"] == events]
        summary.append(
            {
                "events": events,
                "data sets": len(rs),
                "deep gap % (mean)": _mean(rs, "deep_gap_pct"),
                "deep gap % (max)": max(r["deep_gap_pct"] for r in rs),
                "LR gap % (mean)": _mean(rs, "lr_gap_pct"),
                **({"floor % (mean)": _mean(rs, "floor_gap_pct")} if args.floor else {}),
                "met (deep <= 3 %, < LR)": f"{sum(r['target_met'] for r in rs)}/{len(rs)}",
                "deep train s": _mean(rs, "deep_train_s"),
            }
        )
    cols = (
        [
            "events",
            "seed",
            "val_rows",
            "val_clicks",
            "oracle_ne",
            "lr_ne",
            "deep_ne",
            "lr_gap_pct",
            "deep_gap_pct",
        ]
        + (["floor_gap_pct"] if args.floor else [])
        + ["target_met", "build_s", "deep_train_s", "peak_rss_gb"]
    )
    print_table(
        f"NE gap to the oracle, scenario {args.scenario} (validation = last 10 % of time)",
        [r | {"target_met": "yes" if r["target_met"] else "no"} for r in rows],
        cols,
    )
    print_table("by data volume (target: deep gap <= 3 % and below LR)", summary)
    path = write_results(
        "quality",
        rows,
        meta=dict(
            scenario=args.scenario,
            train_seed=args.train_seed,
            target_gap=TARGET_GAP,
            summary=summary,
        ),
        out_dir=args.out,
    )
    print(f"results: {path}")
    return 0
