"""Peak memory of the batch layer by data volume: the out-of-core builds, measured.

For every volume (impressions) this writes an archive in pieces (:func:`write_archive`,
never holding the whole traffic), then runs, each in its own fresh process so that each
peak RSS (``VmHWM``) is its own:

* ``build``: the chunked point-in-time training set into shards
  (``ctrstream.batch.point_in_time_chunked.training_set_chunked``);
* ``train``: streamed training from those shards, when ``ctrstream.models.training``
  offers ``train_streamed`` (``n/a`` otherwise);
* ``cli``: the whole ``ctrstream train --model all`` on the archive (chunked build, both
  models streamed, evaluation, ONNX export), as a user runs it;
* ``viewbuild``: the bounded batch-view build alone (``views.iter_batch_view``), every part
  computed and dropped - the view's own memory at volumes whose view outgrows one Redis;
* ``view``: the bounded batch-view build and its publication
  (``ctrstream.batch.views.publish_batch_view``) into a private ``redis-server`` started
  for the run (its memory is Redis's, reported apart as ``redis_used_gb``);
* with ``--before``: the in-memory paths for comparison (``point_in_time.training_set`` and
  ``compute_batch_view`` over ``read_events``, computed but not written).

The archive: ``k = ceil(events / piece_events)`` pieces, piece ``j`` is
``generate(load_scenario(scenario, events=events // k (+ the remainder for piece 0),
seed=seed + j * SEED_STRIDE))`` written with ``archive.write_partitioned``. With one piece it
is exactly one ``generate`` call. With several, how it differs from one call of the whole
volume: with ``--span fixed`` (the default) every piece spans the same event time (the
scenario's hours, so the density grows with the volume as in ``bench quality``); with
``--span growing`` piece ``j`` starts ``j`` spans later (``start_ms`` shifted), so the
archive grows in time at a constant density, as a production archive does. Each piece draws its own marketplace from its own seed
(the same id ranges and popularity laws, but ad/user/site effects drawn anew: an id has one
true effect per piece), its within-piece terms (fatigue, trends, heat episodes) see only
its own impressions, and its ids are ``i{piece seed}-n`` / ``c{piece seed}-n`` (unique
across pieces). The counts and windows - what the memory depends on - are those of one
marketplace of the whole volume; the model quality is not comparable (no oracle is
written).

Run: ``ctrstream bench memory --events 1000000,8000000`` (and ``--events 32000000
--steps build,cli,viewbuild`` as its own run). Results: ``bench/results/memory.json``;
see docs/out-of-core.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ctrstream.bench.common import positive_ints

PIECE_EVENTS = 1_000_000
SEED_STRIDE = 1_000_003
SPANS = ("fixed", "growing")
# in-memory peaks: `bench quality` (docs/training.md), the demo's batch view (docs/out-of-core.md)
BEFORE_GB = {"train": {1_000_000: 2.9, 4_000_000: 8.5, 8_000_000: 16.3}, "view": {1_000_000: 9.85}}


def _peak_gb() -> float:
    from ctrstream.bench.common import rss_kb

    return round(rss_kb(os.getpid()) / 1e6, 3)


def write_archive(
    data_dir: Path | str,
    scenario: str,
    events: int,
    seed: int,
    piece_events: int = PIECE_EVENTS,
    span: str = "fixed",
) -> dict[str, Any]:
    """Write ``events`` impressions of ``scenario`` (and their clicks) to the archive under
    ``data_dir`` in pieces of at most ``piece_events`` (see the module docstring for how
    the pieces differ from one ``generate`` call); one piece in memory at a time.
    ``span``: ``fixed`` (every piece over the scenario's hours) or ``growing`` (piece ``j``
    starts ``j`` scenario spans later)."""
    from ctrstream.batch.archive import write_partitioned
    from ctrstream.simulation.generator import generate, load_scenario

    if events < 1 or piece_events < 1:
        raise ValueError(f"events ({events}) and piece_events ({piece_events}) must be >= 1")
    if span not in SPANS:
        raise ValueError(f"span must be one of {', '.join(SPANS)}, not {span!r}")
    k = -(-events // piece_events)
    clicks = 0
    first = load_scenario(scenario)
    for j in range(k):
        n = events // k + (events % k if j == 0 else 0)
        shift = {"start_ms": first.start_ms + j * first.span_ms} if span == "growing" else {}
        tr = generate(load_scenario(scenario, events=n, seed=seed + j * SEED_STRIDE, **shift))
        write_partitioned(data_dir, "impressions", tr.impressions)
        write_partitioned(data_dir, "clicks", tr.clicks)
        clicks += tr.clicks.num_rows
        del tr
    return {"pieces": k, "impressions": events, "clicks": clicks}


# --------------------------------------------------------------------------- the steps


def _step_archive(
    data_dir: str, scenario: str, events: int, seed: int, piece: int, span: str
) -> dict:
    t0 = time.perf_counter()
    out = write_archive(data_dir, scenario, events, seed, piece, span)
    return out | {"archive_s": round(time.perf_counter() - t0, 1), "archive_gb": _peak_gb()}


def _step_build(data_dir: str, shard_dir: str, window_ms: int) -> dict:
    from ctrstream.batch.point_in_time_chunked import training_set_chunked

    t0 = time.perf_counter()
    stats: dict = {}
    m = training_set_chunked(data_dir, shard_dir, attribution_window_ms=window_ms, stats=stats)
    return {
        "rows": m["rows"],
        "shards": len(m["shards"]),
        "chunk_min": round(stats.get("chunk_ms", 0) / 60_000, 1),
        "state_rows_max": stats.get("state_rows_max", 0),
        "build_s": round(time.perf_counter() - t0, 1),
        "build_gb": _peak_gb(),
    }


def _step_train(shard_dir: str) -> dict:
    from ctrstream.batch.shards import open_shards
    from ctrstream.models import training

    fn = getattr(training, "train_streamed", None)
    if fn is None:
        return {"train_gb": None, "train_note": "n/a: no models.training.train_streamed"}
    t0 = time.perf_counter()
    try:
        fn(open_shards(shard_dir), "deep", progress=False)
    except TypeError as e:  # another signature than (shard_dir, kind): say so, keep the rest
        return {"train_gb": None, "train_note": f"failed: {type(e).__name__}: {e}"[:200]}
    return {"train_s": round(time.perf_counter() - t0, 1), "train_gb": _peak_gb()}


def _step_cli(data_dir: str, work: str) -> dict:
    """``ctrstream train --model all`` on the archive: the whole command (the chunked build,
    both models streamed, evaluation, ONNX export) as users run it, in a child process
    whose peak RSS is the only child's of this fresh process."""
    import resource
    import sys

    env = os.environ | {"CTRSTREAM_DATA_DIR": data_dir}
    cmd = [sys.executable, "-m", "ctrstream", "train", "--model", "all", "--out", work]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ctrstream train failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"cli_s": round(time.perf_counter() - t0, 1), "cli_gb": round(peak_kb / 1e6, 3)}


def _step_view(data_dir: str, redis_url: str) -> dict:
    import redis

    from ctrstream.batch.views import default_cutoff, publish_batch_view
    from ctrstream.config import get_settings

    settings = get_settings()
    r = redis.Redis.from_url(redis_url)
    T = default_cutoff(settings, data_dir)
    t0 = time.perf_counter()
    res = publish_batch_view(settings, data_dir, T, keep=1, r=r)
    used = int(r.info("memory")["used_memory"])
    r.close()
    return {
        "view_keys": res["keys_written"],
        "view_s": round(time.perf_counter() - t0, 1),
        "view_gb": _peak_gb(),
        "redis_used_gb": round(used / 1e9, 2),
    }


def _step_viewbuild(data_dir: str) -> dict:
    """The bounded batch-view build alone (``views.iter_batch_view``, every part computed
    and dropped): the view's own memory, at volumes whose view does not fit one Redis on
    this machine."""
    from ctrstream.batch.views import default_cutoff, iter_batch_view
    from ctrstream.config import get_settings

    T = default_cutoff(get_settings(), data_dir)
    t0 = time.perf_counter()
    keys = longs = parts = 0
    for buckets, lw in iter_batch_view(data_dir, T):
        keys, longs, parts = keys + buckets.num_rows, longs + lw.num_rows, parts + 1
    return {
        "viewbuild_rows": keys + longs,
        "viewbuild_parts": parts,
        "viewbuild_s": round(time.perf_counter() - t0, 1),
        "viewbuild_gb": _peak_gb(),
    }


def _step_before(data_dir: str, window_ms: int) -> dict:
    from ctrstream.batch.point_in_time import training_set

    t0 = time.perf_counter()
    ts = training_set(data_dir, attribution_window_ms=window_ms)
    out = {"before_rows": len(ts["label"]), "before_build_s": round(time.perf_counter() - t0, 1)}
    del ts
    out["before_build_gb"] = _peak_gb()
    return out


def _step_before_view(data_dir: str) -> dict:
    from ctrstream.batch.archive import read_events
    from ctrstream.batch.views import compute_batch_view, default_cutoff, view_window_start
    from ctrstream.config import get_settings

    T = default_cutoff(get_settings(), data_dir)
    lo = view_window_start(T)
    t0 = time.perf_counter()
    b, _ = compute_batch_view(
        read_events(data_dir, "impressions", lo, T), read_events(data_dir, "clicks", lo, T), T
    )
    return {"before_view_s": round(time.perf_counter() - t0, 1), "before_view_gb": _peak_gb()}


def _isolated(fn, *args):
    """``fn(*args)`` in a fresh process (its peak RSS is its own)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


class _Redis:
    """A private redis-server on a free port, no persistence; stopped by its PID."""

    def __init__(self) -> None:
        from ctrstream.stack.services import free_port

        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not start: is it installed?") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def measure(
    scenario: str,
    events: int,
    seed: int,
    piece: int,
    window_ms: int,
    work_dir: str | None,
    before: bool,
    steps: tuple[str, ...] = ("build", "train", "cli", "view"),
    span: str = "fixed",
) -> dict:
    row: dict[str, Any] = {"events": events, "span": span}
    tmp = tempfile.mkdtemp(prefix="ctrstream-memory-", dir=work_dir)
    try:
        data_dir = str(Path(tmp) / "data")
        shard_dir = str(Path(tmp) / "shards")
        row |= _isolated(_step_archive, data_dir, scenario, events, seed, piece, span)
        if "build" in steps or "train" in steps:
            row |= _isolated(_step_build, data_dir, shard_dir, window_ms)
        if "train" in steps:
            row |= _isolated(_step_train, shard_dir)
        if "cli" in steps:
            row |= _isolated(_step_cli, data_dir, str(Path(tmp) / "run"))
        if "viewbuild" in steps:
            row |= _isolated(_step_viewbuild, data_dir)
        if "view" in steps:
            srv = _Redis()
            try:
                row |= _isolated(_step_view, data_dir, srv.url)
            finally:
                srv.stop()
        if before:
            row |= _isolated(_step_before, data_dir, window_ms)
            row |= _isolated(_step_before_view, data_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    row["before_train_gb (docs)"] = BEFORE_GB["train"].get(events)
    row["before_view_gb (docs)"] = BEFORE_GB["view"].get(events)
    return row


def main(argv: list[str] | None = None) -> int:
    from ctrstream.bench.common import print_table, write_results
    from ctrstream.config import get_settings

    ap = argparse.ArgumentParser(
        prog="ctrstream bench memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--scenario", default="steady")
    ap.add_argument("--events", type=positive_ints, default=[1_000_000, 8_000_000])
    ap.add_argument("--seed", type=int, default=1, help="scenario seed of the first piece")
    ap.add_argument("--piece-events", type=int, default=PIECE_EVENTS)
    ap.add_argument(
        "--span",
        choices=SPANS,
        default="fixed",
        help="fixed: every piece over the scenario's hours, so density grows with volume "
        "(as bench quality); growing: consecutive pieces, constant density",
    )
    ap.add_argument(
        "--steps",
        default="build,train,cli,view",
        help="which of build, train, cli (the whole ctrstream train), viewbuild (the view "
        "computed, not written), view (computed and published to a private Redis) to run",
    )
    ap.add_argument(
        "--before", action="store_true", help="also run the in-memory paths (needs the memory)"
    )
    ap.add_argument("--work-dir", default=None, help="where the archives go (default: /tmp)")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--name", default="memory", help="results file name (without .json)")
    args = ap.parse_args(argv)
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    known = ("build", "train", "cli", "viewbuild", "view")
    bad = [s for s in steps if s not in known]
    if bad:
        ap.error(f"unknown step(s) {bad}: choose from {', '.join(known)}")
    window_ms = int(get_settings().attribution_window_s * 1000)

    rows = []
    for events in args.events:
        t0 = time.perf_counter()
        row = measure(
            args.scenario,
            events,
            args.seed,
            args.piece_events,
            window_ms,
            args.work_dir,
            args.before,
            steps,
            args.span,
        )
        rows.append(row)
        print(f"{events:>12,} impressions ({time.perf_counter() - t0:.0f} s): {row}", flush=True)
    print_table("peak RSS (GB) of the batch layer by volume, each step its own process", rows)
    path = write_results(
        args.name,
        rows,
        meta=dict(
            scenario=args.scenario,
            seed=args.seed,
            piece_events=args.piece_events,
            span=args.span,
        ),
        out_dir=args.out,
    )
    print(f"results: {path}")
    return 0
