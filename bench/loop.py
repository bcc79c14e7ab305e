"""Closed-loop throughput against the open-loop lockstep scorer it replaces in the demo.

``ctrstream bench loop [--isolated] [--impressions N] [--candidates 20,50]
[--lean-candidates 20] [--step-s 10] [--lockstep-s 10] [--scenario drift]``

Both paths run on the same scenario at the same event-time density (the demo's: 1M
impressions in 6 hours unless ``--hours`` says otherwise), on about the same number of
impressions, against the same stack, one after the other:

* ``lockstep``: today's open-loop live path (``ctrstream demo --live open``): the
  scenario's generated impressions and clicks replayed with
  :func:`ctrstream.simulation.lockstep.replay_lockstep` in steps of ``--lockstep-s`` of
  event time, a step's clicks sent only once the streaming scorer (``ctrstream score``, a
  subprocess, DCN-v2) has scored the step's impressions;
* ``closed c=K``: the closed loop (:class:`ctrstream.loop.runner.ClosedLoop`) under the
  demo's experiment (LR 35 %, DCN-v2 35 %, prior 15 %, oracle 15 %, a DCN-v2 shadow) with K
  candidate ads per request and micro-batches of ``--step-s`` of event time, until it has
  shown at least as many impressions as the lockstep row replayed;
* ``closed c=K lean``: the same with LR 85 % and the prior 15 % (no DCN-v2, no shadow).

Columns: ``impressions_per_s`` and ``requests_per_s`` (wall clock, the closed loop's final
checkpoint and analysis included); ``vs_lockstep``: a row's impressions/s over the lockstep
row's (the headline); the closed loop's time per stage (``stage_s`` of its summary: the
world, the ad server's ``decide``, Kafka, the ledger, the analysis) as shares of its wall
time and, inside ``decide``, the ad server's own timings (``features``: the feature read;
``score``: the deciding arms' Triton calls and calibration; ``auction``; ``shadows``: the
shadow arms' scoring of every candidate); ``triton_rows``: rows Triton inferred during the
row; ``cpu_s``: CPU seconds of the benchmark process, ``cpu_{scorer,kafka,redis,triton}_s``
of each server (with its children: Triton's backend stubs), ``cpu_total_s`` their sum;
``impressions_per_cpu_s`` and ``vs_lockstep_cpu``: the comparison per CPU second of every
process taking part (steadier than wall time on a shared machine).

No speed layer runs: both paths read features from the same quiet, empty store, so the rows
compare the serving paths, not the speed layer's load on two cores. Models: random-weight
LR and DCN-v2 exported to ONNX and published (``ctr_benchlr``, ``ctr_benchdeep``): their
rankings are arbitrary, their cost is the trained models' (same graphs, same shapes).

Each row writes to its own throw-away topics (``bench-loop-<row>-<kind>-<id>``, deleted
afterwards); the experiments are stopped and their state removed (against a running stack
the two bench models stay published). ``--isolated`` starts a private Kafka + Redis +
Triton on free ports (stopped at the end). Results:
``bench/results/loop.json`` and ``loop.png``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from ctrstream.bench.common import print_table, process_cpu_s, results_dir, write_results
from ctrstream.stack.scrape import scrape_text, scrape_value

DEMO_DENSITY = 1_000_000 / 6.0  # impressions per hour of event time (ctrstream demo's default)
STAGES = ("world", "decide", "kafka", "ledger", "analyze")
# inside the ad server's decide (its Decisions.timings): the feature read, the deciding
# arms' Triton calls and calibration, the auction, the shadows
AD_SERVER = ("features", "score", "auction", "shadows")
LR_MODEL, DEEP_MODEL = "ctr_benchlr", "ctr_benchdeep"


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


SERVICES = ("kafka", "redis", "triton")


def service_pids(settings: Any) -> dict[str, int]:
    """PIDs of the stack's servers (those found: none when the stack is not ours to read)."""
    from ctrstream.stack.manager import Stack

    out = {}
    try:
        st = Stack(settings)
        for name in SERVICES:
            pid = st.by_name(name).pid()
            if pid:
                out[name] = pid
    except Exception:  # noqa: BLE001 - no stack we can read: the benchmark process's CPU only
        pass
    return out


def _triton_rows(settings: Any) -> float | None:
    """Rows Triton has inferred since it started (``nv_inference_count`` over every model)."""
    text = scrape_text(settings.triton.metrics_port)
    if text is None:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("nv_inference_count{")
    )


class Meter:
    """CPU seconds of the servers (and ``extra`` processes) and Triton's rows, over a row."""

    def __init__(self, settings: Any, pids: dict[str, int]):
        self.settings, self.pids = settings, dict(pids)

    def start(self, **extra: int) -> None:
        self.pids.update(extra)
        self.cpu0 = {k: process_cpu_s(p) for k, p in self.pids.items()}
        self.self0 = _cpu_self()
        self.rows0 = _triton_rows(self.settings)

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cpu_s": _cpu_self() - self.self0}
        for k, p in self.pids.items():
            out[f"cpu_{k}_s"] = process_cpu_s(p) - self.cpu0[k]
        rows = _triton_rows(self.settings)
        out["triton_rows"] = (
            int(rows - self.rows0) if rows is not None and self.rows0 is not None else None
        )
        return out


def publish_models(settings: Any, work: Path, seed: int = 0) -> dict[str, dict]:
    """Random-weight LR and DCN-v2, exported to ONNX and published; their publish records."""
    import torch

    from ctrstream.models.export import export_onnx
    from ctrstream.models.nets import DCNv2, HashedLogisticRegression
    from ctrstream.models.publish import publish

    torch.manual_seed(seed)
    lr = HashedLogisticRegression()
    with torch.no_grad():
        lr.weights.weight.normal_(0, 0.3)
        lr.dense.weight.normal_(0, 0.5)
    out = {}
    for base, net in ((LR_MODEL, lr), (DEEP_MODEL, DCNv2())):
        path = work / f"{base}.onnx"
        export_onnx(net.eval(), path)
        out[base] = publish(settings, path, base)
    return out


def _topics(settings: Any, tag: str, run: str, created: list[str]) -> Any:
    """Settings whose event topics are new throw-away ones (same partition counts)."""
    from ctrstream.kafka.clients import ensure_topics

    t = settings.topics
    upd = {
        k: getattr(t, k).model_copy(update={"name": f"bench-loop-{tag}-{k}-{run}"})
        for k in ("impressions", "clicks", "labeled", "predictions", "dlq")
    }
    s = settings.model_copy(update={"topics": t.model_copy(update=upd)})
    ensure_topics(s, s.topics.all())
    created.extend(v.name for v in upd.values())
    return s


def _scenario(args: argparse.Namespace) -> Any:
    from ctrstream.simulation.generator import load_scenario

    return load_scenario(args.scenario, events=args.impressions, hours=args.hours, seed=args.seed)


def run_lockstep(
    settings: Any, args: argparse.Namespace, log_dir: Path, meter: Meter
) -> dict[str, Any]:
    """The scenario's generated stream replayed in lockstep with ``ctrstream score``."""
    from ctrstream.simulation.generator import generate
    from ctrstream.simulation.lockstep import replay_lockstep
    from ctrstream.stack.manager import settings_env
    from ctrstream.stack.procs import start_job, stop_job
    from ctrstream.stack.services import free_port

    t0 = time.perf_counter()
    tr = generate(_scenario(args))
    gen_s = time.perf_counter() - t0
    records = list(tr.records())
    n_imp = tr.impressions.num_rows
    port = free_port()
    env = {
        **os.environ,
        **settings_env(settings),
        "CTRSTREAM_METRICS_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }
    argv = [sys.executable, "-m", "ctrstream", "score", "--model", DEEP_MODEL]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "score.log"
    proc = start_job(argv, env=env, log_path=log_path)
    try:
        # the scorer's process is up (its metrics answer) before the clock starts; its
        # consumer's start and first Triton call are in the first step, as in the demo
        deadline = time.monotonic() + 120
        while scrape_text(port) is None:
            if proc.poll() is not None:
                raise RuntimeError(f"the scorer exited with code {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the scorer did not start within 120 s; see {log_path}")
            time.sleep(0.1)

        def scored() -> int | None:
            v = scrape_value(port, "ctrstream_score_records_total")
            return None if v is None else int(v)

        def check() -> None:
            if proc.poll() is not None:
                raise RuntimeError(f"the scorer exited with code {proc.returncode}; see {log_path}")

        meter.start(scorer=proc.pid)
        summary = replay_lockstep(
            settings,
            records,
            max(1, int(args.lockstep_s * 1000)),
            scored,
            0,
            check=check,
            progress=False,
        )
        used = meter.stop()
    finally:
        meter.pids.pop("scorer", None)
        stop_job(proc)
    return {
        "mode": "lockstep",
        "candidates": None,
        "step_s": args.lockstep_s,
        "requests": None,
        "impressions": summary.by_topic.get("impressions", n_imp),
        "clicks": summary.by_topic.get("clicks", 0),
        "seconds": summary.seconds,
        "requests_per_s": None,
        "impressions_per_s": summary.by_topic.get("impressions", n_imp) / summary.seconds,
        "events_per_s": summary.rate,
        "steps": summary.steps,
        "scorer_wait_share": summary.scorer_wait_s / summary.seconds,
        "generate_s": gen_s,
        **used,
    }


def _arms(lean: bool) -> list[Any]:
    """The demo's arms, or (``lean``) LR and the prior only: no DCN-v2, no shadow."""
    from ctrstream.experiments.design import Arm

    if lean:
        return [
            Arm(name="lr", kind="model", weight=0.85, model_name=LR_MODEL),
            Arm(name="prior", kind="prior", weight=0.15),
        ]
    return [
        Arm(name="lr", kind="model", weight=0.35, model_name=LR_MODEL),
        Arm(name="deep", kind="model", weight=0.35, model_name=DEEP_MODEL),
        Arm(name="prior", kind="prior", weight=0.15),
        Arm(name="oracle", kind="oracle", weight=0.15),
        Arm(name="deep-shadow", kind="model", model_name=DEEP_MODEL, shadow=True),
    ]


def run_closed(
    settings: Any,
    args: argparse.Namespace,
    candidates: int,
    target: int,
    run: str,
    meter: Meter,
    lean: bool = False,
) -> dict[str, Any]:
    """The closed loop under the demo's experiment (or the lean one) until ``target``
    impressions are shown."""
    from ctrstream.experiments.design import Experiment
    from ctrstream.loop import session
    from ctrstream.loop.runner import LoopConfig
    from ctrstream.loop.wiring import build_loop, build_world

    name = f"bench-loop-c{candidates}{'-lean' if lean else ''}-{run}"
    exp = Experiment(
        name=name,
        salt=name,
        arms=tuple(_arms(lean)),
        control="lr",
        min_run_s=1800.0,
        min_users_per_arm=200,
        primary_metric="revenue_per_request",
    )
    world, start = build_world(
        settings,
        scenario=args.scenario,
        overrides={
            "events": args.impressions,
            "hours": args.hours,
            "seed": args.seed,
            "candidates_per_request": candidates,
        },
    )
    session.start(settings, exp, start)
    shown = {"n": 0}

    def progress(p: dict) -> None:
        shown["n"] = int(p["impressions"])

    cfg = LoopConfig(
        step_s=args.step_s, analyze_every_s=300.0, checkpoint_every=30, progress=progress
    )
    try:
        loop, rankers = build_loop(settings, name, world, cfg, fresh=True)
        inside = dict.fromkeys((*AD_SERVER, "feature_reads"), 0.0)
        decide = loop.decide

        def timed_decide(batch: Any, arm: np.ndarray) -> Any:
            d = decide(batch, arm)
            for k in inside:
                inside[k] += float(d.timings.get(k, 0.0))
            return d

        loop.decide = timed_decide
        try:
            meter.start()
            # far enough: the run stops at the target (at most a step's worth more)
            end = start + int(4 * target / DEMO_DENSITY * 3_600_000) + 3_600_000
            summary = loop.run(start, end, stop=lambda: shown["n"] >= target)
            used = meter.stop()
        finally:
            rankers.close()
        # the loop's producer is flushed (its checkpoint did) and let go before the next row
        del loop, rankers
        gc.collect()
    finally:
        session.stop(settings, name, reason="benchmark done")
        shutil.rmtree(session.state_dir(settings, name).parent, ignore_errors=True)
    row: dict[str, Any] = {
        "mode": f"closed c={candidates}{' lean' if lean else ''}",
        "candidates": candidates,
        "step_s": args.step_s,
        "requests": summary.requests,
        "impressions": summary.impressions,
        "clicks": summary.clicks,
        "seconds": summary.wall_s,
        "requests_per_s": summary.requests_per_s,
        "impressions_per_s": summary.impressions_per_s,
        "events_per_s": (summary.impressions + summary.clicks) / summary.wall_s,
        "steps": summary.steps,
        **used,
        "event_time_s": (summary.ended_ms - summary.started_ms) / 1000.0,
        "stage_s": dict(summary.stage_s),
    }
    for k in STAGES:
        row[f"{k}_share"] = summary.stage_s.get(k, 0.0) / summary.wall_s
    row["ad_server_s"] = {k: round(inside[k], 3) for k in AD_SERVER}
    for k in AD_SERVER:
        row[f"{k}_share"] = inside[k] / summary.wall_s
    row["feature_reads"] = int(inside["feature_reads"])
    row["triton_rows_per_impression"] = (
        row["triton_rows"] / summary.impressions if row.get("triton_rows") else None
    )
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    from ctrstream.plots import pyplot

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["mode"] for r in rows]
    a.bar(
        labels,
        [r["impressions_per_s"] for r in rows],
        color=["grey" if r["mode"] == "lockstep" else "C0" for r in rows],
    )
    for i, r in enumerate(rows):
        a.annotate(
            f"{r['impressions_per_s']:,.0f}\n({r['vs_lockstep']:.1f}x)",
            (i, r["impressions_per_s"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    a.set_ylabel("impressions / s (wall clock)")
    a.set_title(title)
    a.grid(alpha=0.3, axis="y")
    a.set_ylim(0, 1.2 * max(r["impressions_per_s"] for r in rows))
    closed = [r for r in rows if r["mode"].startswith("closed")]
    # the ad server's own parts replace its "decide" stage; what is left of it is "decide other"
    parts = ["world", *AD_SERVER, "decide other", "kafka", "ledger", "analyze", "other"]

    def share(r: dict, k: str) -> float:
        if k == "decide other":
            return max(0.0, r["decide_share"] - sum(r[f"{p}_share"] for p in AD_SERVER))
        if k == "other":
            return max(0.0, 1 - sum(r[f"{p}_share"] for p in STAGES))
        return float(r.get(f"{k}_share", 0.0))

    bottom = np.zeros(len(closed))
    for k in parts:
        v = np.array([share(r, k) for r in closed])
        b.bar([r["mode"] for r in closed], v, bottom=bottom, label=k)
        bottom += v
    b.set_ylabel("share of the closed loop's wall time")
    b.set_title("where the closed loop's time goes")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, settings: Any = None) -> int:
    """``settings``: the stack to run against (default ``get_settings()``; ignored with
    ``--isolated``)."""
    ap = argparse.ArgumentParser(
        prog="ctrstream bench loop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--impressions",
        type=int,
        default=30_000,
        help="impressions the lockstep row replays; each closed-loop row runs until it has "
        "shown as many",
    )
    ap.add_argument("--candidates", default="20,50", help="candidate ads per request, per row")
    ap.add_argument(
        "--lean-candidates",
        default="20",
        help="closed-loop rows of the lean experiment (LR and the prior: no DCN-v2, no shadow) "
        "at these candidates per request ('' for none)",
    )
    ap.add_argument("--step-s", type=float, default=10.0, help="closed loop: event s per batch")
    ap.add_argument("--lockstep-s", type=float, default=10.0, help="lockstep: event s per step")
    ap.add_argument("--scenario", default="drift", help="the demo's scenario by default")
    ap.add_argument(
        "--hours",
        type=float,
        default=None,
        help="event-time span of the scenario (default: the demo's density, 1M per 6 h)",
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--skip-lockstep", action="store_true", help="the closed-loop rows only")
    ap.add_argument(
        "--isolated",
        action="store_true",
        help="start Kafka + Redis + Triton on free ports in a temp dir (stopped at the end)",
    )
    ap.add_argument("--name", default="loop", help="results file name (NAME.json, NAME.png)")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    try:
        cands = [int(x) for x in args.candidates.split(",") if x.strip()]
        lean = [int(x) for x in args.lean_candidates.split(",") if x.strip()]
    except ValueError:
        ap.error("--candidates and --lean-candidates take comma-separated integers")
    if args.impressions < 100 or not cands or min(cands + lean) < 1:
        ap.error("--impressions must be at least 100 and every --candidates at least 1")
    if not (args.step_s > 0 and args.lockstep_s > 0):
        ap.error("--step-s and --lockstep-s must be > 0 seconds of event time")
    if args.hours is None:
        args.hours = args.impressions / DEMO_DENSITY

    from ctrstream.config import get_settings
    from ctrstream.kafka.clients import admin
    from ctrstream.stack.manager import isolated_stack

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ctrstream.replay").setLevel(logging.ERROR)
    out_dir = Path(args.out) if args.out else results_dir()
    run = uuid.uuid4().hex[:8]
    load0 = os.getloadavg()
    t_start = time.monotonic()
    rows: list[dict[str, Any]] = []
    created: list[str] = []
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ctr-bench-loop-")))
        settings = settings or get_settings()
        stack_s = None
        if args.isolated:
            t0 = time.monotonic()
            settings = stack.enter_context(isolated_stack(work / "stack", log=print)).settings
            stack_s = time.monotonic() - t0
        try:
            t0 = time.monotonic()
            published = publish_models(settings, work, seed=args.seed)
            publish_s = time.monotonic() - t0
            meter = Meter(settings, service_pids(settings))
            target = args.impressions
            if not args.skip_lockstep:
                s = _topics(settings, "lockstep", run, created)
                row = run_lockstep(
                    s, args, Path(tempfile.gettempdir()) / f"bench-loop-{run}", meter
                )
                target = int(row["impressions"])
                rows.append(row)
                print(
                    f"lockstep: {row['impressions']:,} impressions in {row['seconds']:.1f} s",
                    flush=True,
                )
            for c, is_lean in [(c, False) for c in cands] + [(c, True) for c in lean]:
                s = _topics(settings, f"c{c}{'lean' if is_lean else ''}", run, created)
                row = run_closed(s, args, c, target, run, meter, lean=is_lean)
                rows.append(row)
                print(
                    f"{row['mode']}: {row['impressions']:,} impressions in {row['seconds']:.1f} s",
                    flush=True,
                )
        finally:
            if created and not args.isolated:
                client = admin(settings)
                for f in client.delete_topics(created, operation_timeout=30).values():
                    try:
                        f.result(30)
                    except Exception as e:  # noqa: BLE001 - clean-up: warned about, not fatal
                        logging.warning("could not delete bench topic: %s", e)
    for r in rows:  # CPU of every process taking part: steadier than wall time when shared
        r["cpu_total_s"] = sum(
            v for k, v in r.items() if k.startswith("cpu_") and k != "cpu_total_s"
        )
        r["impressions_per_cpu_s"] = (
            r["impressions"] / r["cpu_total_s"] if r["cpu_total_s"] else None
        )
    lock = next((r for r in rows if r["mode"] == "lockstep"), None)
    base = lock["impressions_per_s"] if lock else None
    for r in rows:
        r["vs_lockstep"] = r["impressions_per_s"] / base if base else None
        r["vs_lockstep_cpu"] = (
            r["impressions_per_cpu_s"] / lock["impressions_per_cpu_s"]
            if lock and lock["impressions_per_cpu_s"] and r["impressions_per_cpu_s"]
            else None
        )
    cols = [
        "mode",
        "impressions",
        "seconds",
        "impressions_per_s",
        "requests_per_s",
        "vs_lockstep",
        *[f"{k}_share" for k in ("decide", "features", "score", "shadows")],
        "scorer_wait_share",
        "triton_rows",
        "impressions_per_cpu_s",
        "vs_lockstep_cpu",
    ]
    title = f"closed loop vs lockstep ({args.scenario}, {target:,} impressions per row)"
    print_table(title, rows, cols)
    closed = [r for r in rows if r["mode"].startswith("closed")]
    meta = {
        "command": "ctrstream bench loop " + " ".join(argv if argv is not None else sys.argv[1:]),
        "scenario": args.scenario,
        "impressions_target": target,
        "hours": args.hours,
        "density_impressions_per_hour": args.impressions / args.hours,
        "seed": args.seed,
        "candidates": cands,
        "step_s": args.step_s,
        "lockstep_s": args.lockstep_s,
        "isolated": args.isolated,
        "stack_start_s": stack_s,
        "publish_s": publish_s,
        "total_s": time.monotonic() - t_start,
        "models": {
            "kind": "random weights (not trained), exported to ONNX and published",
            "lr": published[LR_MODEL].get("model_name"),
            "deep": published[DEEP_MODEL].get("model_name"),
            "versions": {k: v.get("version") for k, v in published.items()},
            "lockstep_scorer": DEEP_MODEL,
        },
        "experiment": "lr 35 %, deep 35 %, prior 15 %, oracle 15 %, deep shadow",
        "lean_experiment": "lr 85 %, prior 15 % (no DCN-v2, no shadow)",
        "lean_candidates": lean,
        "speed_layer": "not running: both paths read a quiet, empty store",
        "headline": {
            "closed_over_lockstep_impressions_per_s": {r["mode"]: r["vs_lockstep"] for r in closed},
            "closed_over_lockstep_impressions_per_cpu_s": {
                r["mode"]: r["vs_lockstep_cpu"] for r in closed
            },
        },
        "cpu": "cpu_total_s: this process, the scorer, Kafka, Redis and Triton (with its "
        "backend stubs) during the row",
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
    }
    path = write_results(args.name, rows, meta, out_dir=out_dir)
    png = out_dir / f"{args.name}.png"
    if base:
        plot(rows, png, title)
        print(f"wrote {path} and {png}")
    else:
        print(f"wrote {path}")
    return 0
