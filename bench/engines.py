"""The batch engines' crossover: DuckDB/numpy on this machine vs Apache Spark (local mode).

For every volume, one archive is generated (``steady`` scenario, written as the archiver
would, :func:`ctrstream.batch.archive.write_partitioned`) and each engine builds the
point-in-time training set of it (labels, the window counts of every entity and window,
dense and sparse), each in its own fresh process:

* ``duckdb`` - :func:`ctrstream.batch.point_in_time.training_set` (the result in memory);
* ``spark`` - :func:`ctrstream.batch.spark_engine.training_set_frame` written as Parquet
  (the scale-out path: the output never passes through one process), on a ``local[N]``
  session; its start-up is timed apart.

Reported per (volume, engine): rows (labeled impressions), seconds, rows per second and the
peak memory of the engine's whole process tree (the Python process, and for Spark its JVM
and Python workers: the sum of their resident sets, sampled every 0.2 s). Run:
``ctrstream bench engines [--events 250000,1000000] [--spark-master local[2]]``. Results:
``bench/results/engines.json``; the table and when to switch: docs/batch-engines.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from ctrstream.bench.common import positive_ints

W_MS = 1_800_000


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def tree_rss_kb(pid: int) -> int:
    """The summed resident set of ``pid`` and all its descendants, in KiB."""
    from ctrstream.bench.common import rss_kb

    kids, total, todo = _children(), 0, [pid]
    while todo:
        p = todo.pop()
        total += rss_kb(p, "VmRSS")
        todo += kids.get(p, [])
    return total


class PeakSampler:
    """The peak of :func:`tree_rss_kb` of this process while the block runs."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, tree_rss_kb(os.getpid()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, tree_rss_kb(os.getpid()))


def _write_archive(scenario: str, events: int, seed: int, data_dir: str) -> dict:
    from ctrstream.batch.archive import write_partitioned
    from ctrstream.simulation.generator import generate, load_scenario

    tr = generate(load_scenario(scenario, events=events, seed=seed))
    write_partitioned(data_dir, "impressions", tr.impressions)
    write_partitioned(data_dir, "clicks", tr.clicks)
    return {"impressions": tr.impressions.num_rows, "clicks": tr.clicks.num_rows}


def _duckdb_row(data_dir: str) -> dict:
    from ctrstream.batch.point_in_time import training_set

    with PeakSampler() as peak:
        t0 = time.perf_counter()
        ds = training_set(data_dir, attribution_window_ms=W_MS)
        build_s = time.perf_counter() - t0
    return {"rows": int(len(ds["label"])), "start_s": 0.0, "build_s": build_s, "peak": peak}


def _spark_row(data_dir: str, master: str, driver_memory: str, partitions: int) -> dict:
    from ctrstream.batch import spark_engine as S

    with PeakSampler() as peak, tempfile.TemporaryDirectory(prefix="ctrstream-spark-") as tmp:
        t0 = time.perf_counter()
        spark = S.spark_session(
            master, shuffle_partitions=partitions, driver_memory=driver_memory, local_dir=tmp
        )
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        df = S.training_set_frame(spark, data_dir, attribution_window_ms=W_MS)
        df.write.parquet(str(Path(tmp) / "training-set"))
        build_s = time.perf_counter() - t0
        rows = spark.read.parquet(str(Path(tmp) / "training-set")).count()
        spark.stop()
    return {"rows": int(rows), "start_s": start_s, "build_s": build_s, "peak": peak}


def _measure(engine: str, data_dir: str, args: tuple) -> dict:
    row = _duckdb_row(data_dir) if engine == "duckdb" else _spark_row(data_dir, *args)
    row["peak_gb"] = row.pop("peak").peak_kb / 1e6
    return row


def _isolated(fn, *args):
    """``fn(*args)`` in a fresh process, so that each engine's peak memory is its own."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main(argv: list[str] | None = None) -> int:
    from ctrstream.bench.common import print_table, write_results

    ap = argparse.ArgumentParser(
        prog="ctrstream bench engines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--scenario", default="steady")
    ap.add_argument(
        "--events",
        type=positive_ints,
        default=[250_000, 1_000_000],
        help="impressions per archive, comma-separated",
    )
    ap.add_argument("--seed", type=int, default=1, help="scenario seed")
    ap.add_argument("--engines", default="duckdb,spark", help="comma-separated: duckdb,spark")
    ap.add_argument("--spark-master", default="local[2]")
    ap.add_argument("--spark-driver-memory", default="2g")
    ap.add_argument("--spark-partitions", type=int, default=4, help="shuffle partitions")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ("duckdb", "spark")]
    if bad:
        ap.error(f"unknown engines {bad}: choose from duckdb, spark")

    rows = []
    for events in args.events:
        with tempfile.TemporaryDirectory(prefix="ctrstream-engines-") as data_dir:
            sizes = _isolated(_write_archive, args.scenario, events, args.seed, data_dir)
            for engine in engines:
                spark_args = (args.spark_master, args.spark_driver_memory, args.spark_partitions)
                r = _isolated(_measure, engine, data_dir, spark_args)
                row = {
                    "impressions": events,
                    "engine": engine if engine == "duckdb" else f"spark {args.spark_master}",
                    "rows": r["rows"],
                    "events read": sizes["impressions"] + sizes["clicks"],
                    "start s": r["start_s"],
                    "build s": r["build_s"],
                    "rows/s": r["rows"] / r["build_s"] if r["build_s"] else 0.0,
                    "peak GB": r["peak_gb"],
                }
                rows.append(row)
                # after every row: a long run stopped part way keeps what it measured
                write_results("engines", rows, vars(args), args.out)
                print(
                    f"{events:>10,} impressions, {row['engine']}: {row['build s']:.1f} s "
                    f"(start {row['start s']:.1f} s), {row['rows/s']:,.0f} rows/s, "
                    f"peak {row['peak GB']:.2f} GB",
                    flush=True,
                )
    print_table("training-set build by engine", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
