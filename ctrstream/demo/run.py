"""``ctrstream demo`` (``make demo``): the whole lambda architecture, end to end, with a report.

The phases, in event time (the scenario's stream is cut at ``t_split``):

1. **stack**      - the local stack (Kafka KRaft, Redis, Triton), started if needed; the demo
                    uses its own topics (suffix ``-demo<run>``) and Redis database (flushed).
2. **generate**   - a synthetic scenario with ground truth (the oracle stays out of the events).
3. **history**    - the speed layer (features + join) runs while the first part of the
                    stream (event time < t_split) is replayed with time compression; the
                    archiver writes it into the Parquet master dataset.
4. **batch**      - point-in-time training set from the archive, LR + DCN-v2 trained and
                    evaluated against the oracle, ONNX export, publication to Triton (a live
                    version switch when a version is already served); the batch view up to
                    the cut-off lands in Redis.
5. **reconcile**  - the batch view, as it lands, is compared with the speed view; the batch
                    wins.
6. **live**       - the streaming scorer (Triton + current River calibration) and the
                    calibrator run while the rest of the stream is replayed in event-time
                    lockstep with the scorer (``ctrstream.simulation.lockstep``: each
                    impression is scored before its click and before events more than
                    ``lockstep_s`` later are sent - as a real-time scorer would see them).
7. **serve**      - the prediction API answers a few sample ad requests.
8. **report**     - terminal summary + ``report.html`` with plots.

A failing phase stops the demo with a message naming the phase and the logs directory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ctrstream import features as F
from ctrstream.config import Settings, Topic, get_settings
from ctrstream.demo.freshness import FreshnessProbe
from ctrstream.demo.lag import LagMonitor
from ctrstream.demo.story import Story, StoryConfig, drift_at_for
from ctrstream.stack.scrape import scrape_or_empty, scrape_value
from ctrstream.stack.stopping import sigterm_exits
from ctrstream.store.speed_view import count_speed_hashes

console = Console()


class DemoError(RuntimeError):
    pass


@dataclass
class DemoConfig:
    scenario: str = "taste_shift"
    events: int = 900_000  # impressions (clicks come on top); see docs/demo.md on sizes
    hours: float = 6.0  # event-time span of the scenario
    seed: int = 7
    history_fraction: float = 1 / 3  # share of event time replayed before the batch layer runs
    # the market shifts this long into the closed loop (drift_at): when the decay monitor's
    # one-hour baseline of the champion is complete
    drift_after_h: float = 1.0
    # taste_shift's interaction strength for the demo (the scenario's own: 0.8): a shift large
    # enough that a challenger trained on half an hour of rows after it can win an experiment
    # within the demo's minutes (docs/demo.md); None keeps the scenario's
    taste_logit: float | None = 1.5
    # a smaller marketplace than the scenarios' 200,000 users: the batch views (one hash
    # per entity and bucket) are the demo's largest cost, and the controller builds a second
    users: int | None = 20_000
    replay_seconds: float = 25.0  # wall time each replay phase should take (time compression)
    lockstep_s: float = 10.0  # live phase: event-time step the replay may lead the scorer by
    live: str = "closed"  # live phase: "closed" (the ad server decides) or "open" (lockstep replay)
    live_hours: float = 4.0  # closed loop: event time it runs at most (the story may end it)
    loop_step_s: float = 60.0  # closed loop: event seconds per micro-batch of requests
    # closed loop: its ad requests per event second relative to the history's market (the
    # world's default rate); below 1 the closed loop's event hours cost less wall time
    loop_volume: float = 0.35
    candidates: int = 20  # closed loop: candidate ads per request
    study_events: int = 0  # the small freshness study's impressions (0 = skip it)
    out: Path = Path(".demo")  # under the current directory
    keep_stack: bool = False
    isolated: bool = False  # a private stack on free ports under the run's folder
    epochs: int | None = None
    story: StoryConfig = field(default_factory=StoryConfig)


@dataclass
class DemoState:
    run_id: str
    out: Path
    settings: Settings
    phases: list[dict] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    procs: dict = field(default_factory=dict)
    started_stack: bool = False
    monitor: LagMonitor | None = None
    probes: list[FreshnessProbe] = field(default_factory=list)  # still running


# --------------------------------------------------------------------------- small helpers


def _topic_count(settings: Settings, topic: Topic) -> int:
    from ctrstream.kafka.clients import topic_end_offsets

    return sum(topic_end_offsets(settings, topic.name).values())


def _wait(
    what: str,
    predicate,
    timeout: float,
    proc_names: list[str],
    st: DemoState,
    interval: float = 0.25,
):
    """Wait for ``predicate``; fail early when a job we depend on has died."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for name in proc_names:
            p = st.procs.get(name)
            if p is not None and p.poll() is not None:
                raise DemoError(
                    f"the {name} job exited with code {p.returncode} while waiting for "
                    f"{what}; see {st.out / 'logs' / (name + '.log')}"
                )
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _start(st: DemoState, name: str, argv: list[str], metrics_port: int = 0):
    from ctrstream.stack.manager import settings_env
    from ctrstream.stack.procs import start_job

    env = {
        **os.environ,
        **settings_env(st.settings),
        "CTRSTREAM_METRICS_PORT": str(metrics_port),
        "PYTHONUNBUFFERED": "1",
    }
    log = st.out / "logs" / f"{name}.log"
    st.procs[name] = start_job([sys.executable, "-m", "ctrstream", *argv], env=env, log_path=log)
    return st.procs[name]


def _stop(st: DemoState, name: str) -> None:
    from ctrstream.stack.procs import stop_job

    p = st.procs.pop(name, None)
    if p is not None:
        stop_job(p, timeout=20)


# each phase's time budget (wall seconds, from a set-up state on the 2-core development
# machine, default sizes): the demo says which phase ran over, so a slow phase is found by
# name; together they keep the demo under 10 minutes (docs/demo.md)
PHASE_BUDGET_S = {  # 600 s without the study (docs/demo.md "Time budgets")
    "stack": 15,
    "generate": 5,
    "history": 45,
    "batch": 110,
    "reconcile": 65,
    "live": 350,
    "serve": 5,
    "study": 45,
    "report": 5,
}


@contextmanager
def phase(st: DemoState, n: int, total: int, name: str, what: str):
    console.rule(f"[bold]{n}/{total} {name}[/]  {what} (budget {PHASE_BUDGET_S.get(name, 0)} s)")
    t0 = time.monotonic()
    try:
        yield
    except DemoError:
        raise
    except Exception as e:  # any failure stops the demo with its phase named
        (st.out / "logs").mkdir(parents=True, exist_ok=True)
        (st.out / "logs" / "demo-error.txt").write_text(traceback.format_exc())
        raise DemoError(f"phase '{name}' failed: {type(e).__name__}: {e}") from e
    dt = time.monotonic() - t0
    budget = PHASE_BUDGET_S.get(name)
    st.phases.append({"phase": name, "seconds": round(dt, 1), "budget_s": budget})
    over = budget is not None and dt > budget
    console.print(
        f"[green]✓[/] {name} done in {dt:.1f}s"
        + (f" [yellow](over its {budget} s budget)[/]" if over else "")
    )


def _running(st: DemoState, job: str) -> bool:
    p = st.procs.get(job)
    return p is not None and p.poll() is None


def _probe(st: DemoState, tr, lo: int | None, hi: int | None, cfg: DemoConfig) -> FreshnessProbe:
    """A freshness probe of this run, closed with the demo if a phase fails."""
    probe = FreshnessProbe(
        st.settings,
        f"ctrstream-demo-fresh-{st.run_id}-{len(st.probes)}",
        tr,
        lo,
        hi,
        _n_probes(cfg),
    )
    st.probes.append(probe)
    return probe


def _replay_lockstep(st: DemoState, tr, lo: int, cfg: DemoConfig, label: str) -> dict:
    """The live replay in event-time lockstep with the scorer (``simulation.lockstep``): the
    scorer's progress is its ``ctrstream_score_records_total`` (every impressions-topic record
    it has handled), scraped every 10 ms (each scrape costs the scorer ~1 ms of its CPU)."""
    from ctrstream.simulation.lockstep import replay_lockstep

    port = st.numbers["metrics_ports"]["score"]

    def scored() -> int | None:
        v = scrape_value(port, "ctrstream_score_records_total")
        return None if v is None else int(v)

    def check() -> None:
        p = st.procs.get("score")
        if p is not None and p.poll() is not None:
            raise DemoError(
                f"the score job exited with code {p.returncode} during the live "
                f"replay; see {st.out / 'logs' / 'score.log'}"
            )

    live = sum(
        int(np.count_nonzero(t.column("event_time_ms").to_numpy() >= lo))
        for t in (tr.impressions, tr.clicks)
    )  # the bar's total (injections aside)
    base = _topic_count(st.settings, st.settings.topics.impressions)  # before the live phase
    summary = replay_lockstep(
        st.settings,
        _records_between(tr, lo, None),
        max(1, int(cfg.lockstep_s * 1000)),
        scored,
        base,
        check=check,
        total=live,
        description=label,
    )
    console.print(
        f"{label}: {summary.sent:,} records in {summary.seconds:.1f} s, "
        f"{summary.steps:,} lockstep steps of {cfg.lockstep_s:g} s of event time "
        f"({summary.scorer_wait_s:.1f} s waiting for the scorer)"
    )
    return {
        "sent": summary.sent,
        "seconds": summary.seconds,
        "rate": summary.rate,
        "by_topic": summary.by_topic,
        "lockstep_s": cfg.lockstep_s,
        "steps": summary.steps,
        "scorer_wait_s": summary.scorer_wait_s,
    }


def _n_probes(cfg: DemoConfig) -> int:
    return int(min(300, max(20, 5 * cfg.replay_seconds)))


def _count_speed_keys(settings: Settings) -> dict[str, int]:
    """The speed-view hashes in the demo's Redis database (one per root id and event day in
    the grouped layout, one per entity id and day in the entity layout), per entity (SCAN)."""
    from ctrstream.store.connection import redis_client

    r = redis_client(settings, timeout_s=60.0)
    try:
        return count_speed_hashes(r)
    finally:
        r.close()


# --------------------------------------------------------------------------- the phases


def _demo_settings(base: Settings, run_id: str, out: Path) -> Settings:
    t = base.topics
    topics = t.model_copy(
        update={
            k: Topic(name=f"{getattr(t, k).name}-demo{run_id}", partitions=getattr(t, k).partitions)
            for k in ("impressions", "clicks", "labeled", "predictions", "dlq")
        }
    )
    redis = base.redis.model_copy(update={"db": 1})
    return base.model_copy(update={"topics": topics, "data_dir": out / "data", "redis": redis})


def _stack(st: DemoState) -> None:
    import redis as redis_lib

    from ctrstream.kafka.clients import ensure_topics
    from ctrstream.stack.manager import Stack

    stack = Stack(st.settings)
    times = stack.up(log=console.print)
    st.started_stack = any(v is not None for v in times.values())
    ensure_topics(st.settings, st.settings.topics.all())
    r = redis_lib.Redis.from_url(st.settings.redis.url)
    r.flushdb(
        asynchronous=True
    )  # a previous run can leave millions of keys: free them in the background
    r.close()
    console.print(
        f"topics: {', '.join(t.name for t in st.settings.topics.all())}; "
        f"Redis database {st.settings.redis.db} (flushed)"
    )


def _generate(st: DemoState, cfg: DemoConfig):
    from ctrstream.simulation.generator import generate, load_scenario, write_traffic

    extra: dict = {} if cfg.users is None else {"n_users": cfg.users}
    if cfg.taste_logit is not None and cfg.scenario == "taste_shift":
        extra["taste_logit"] = cfg.taste_logit
    sc = load_scenario(cfg.scenario, events=cfg.events, seed=cfg.seed, hours=cfg.hours, **extra)
    # the cut-off: history_fraction of the scenario's span, aligned down to a cut-off
    t_split = F.align_cutoff(int(round(sc.start_ms + cfg.history_fraction * sc.span_ms)))
    if t_split <= sc.start_ms:
        raise DemoError(
            f"a history of {cfg.history_fraction:.0%} of {sc.span_ms / 3.6e6:g} h has no full "
            "hour before its cut-off (cut-offs are whole hours): give more --hours or a larger "
            "--history-fraction"
        )
    if cfg.live == "closed" and cfg.scenario in ("taste_shift", "drift"):
        # the market shifts drift_after_h into the closed loop, after the first model
        try:
            at = drift_at_for(
                (t_split - sc.start_ms) / 3.6e6, cfg.drift_after_h, sc.span_ms / 3.6e6
            )
            sc = sc.replace(drift_at=at)
        except ValueError as e:  # the scenario's own drift_at stays
            console.print(f"[yellow]{e}; the scenario's own drift_at {sc.drift_at:g} stays[/]")
    tr = generate(sc)
    write_traffic(tr, st.out / "traffic")
    imps, clks = tr.impressions, tr.clicks
    t_imp = imps.column("event_time_ms").to_numpy()
    start, end = int(t_imp.min()), int(t_imp.max())
    st.numbers.update(
        history_impressions=int(np.count_nonzero(t_imp < t_split)),
        impressions=imps.num_rows,
        clicks=clks.num_rows,
        scenario=cfg.scenario,
        t_start=start,
        t_end=end,
        t_split=t_split,
        injected=tr.injected,
        drift_ms=_drift_ms(tr),
        taste_logit=float(tr.scenario.taste_logit),
        monitor_window_min=cfg.story.monitor_window_min,
        partitions=st.settings.topics.impressions.partitions,
    )
    console.print(
        f"{imps.num_rows:,} impressions, {clks.num_rows:,} clicks over "
        f"{(end - start) / 3.6e6:.1f} h of event time; history until "
        f"{time.strftime('%H:%M', time.gmtime(t_split / 1000))} (t_split)"
    )
    return tr, t_split


def _drift_ms(tr) -> int | None:
    """When the scenario's market shifts (a campaign's logit, or the taste interaction)."""
    from ctrstream.simulation.generator import taste_shift_time_ms

    if tr.meta.get("drift_time_ms") is not None:
        return int(tr.meta["drift_time_ms"])
    if tr.scenario.taste_logit:
        return taste_shift_time_ms(tr.scenario)
    return None


def _records_between(tr, lo: int | None, hi: int | None):
    for rec in tr.records():
        ts = rec[3]
        if (lo is None or ts >= lo) and (hi is None or ts < hi):
            yield rec


def _replay(st: DemoState, tr, lo, hi, span_ms: float, cfg: DemoConfig, label: str) -> dict:
    from ctrstream.simulation.replay import replay

    compression = max(1.0, span_ms / 1000.0 / cfg.replay_seconds)
    summary = replay(
        st.settings,
        _records_between(tr, lo, hi),
        time_compression=compression,
        progress=True,
        description=label,
    )
    if summary.failed:
        raise DemoError(
            f"{summary.failed} records could not be delivered to Kafka: {summary.errors}"
        )
    console.print(f"{label}: {summary.describe()} (time compression {compression:.0f}x)")
    return {
        "sent": summary.sent,
        "seconds": summary.seconds,
        "rate": summary.rate,
        "compression": compression,
        "by_topic": summary.by_topic,
    }


def _events_written(st: DemoState) -> int:
    """Records in the event topics now: the replay's plus the watermark heartbeats the demo
    sent (the speed jobs read and count those too; the lag monitor uses the same total)."""
    return _topic_count(st.settings, st.settings.topics.impressions) + _topic_count(
        st.settings, st.settings.topics.clicks
    )


def _speed_caught_up(st: DemoState, expected_in: int) -> bool:
    """Both speed-layer jobs have read ``expected_in`` records (the features job also reports
    no consumer lag)."""
    ports = st.numbers["metrics_ports"]
    m = scrape_or_empty(ports["speed-features"])
    j = scrape_or_empty(ports["speed-join"])
    return (
        m.get("ctrstream_speed_events_in_total", 0) >= expected_in
        and m.get("ctrstream_speed_consumer_lag", 1) == 0
        and j.get("ctrstream_speed_events_in_total", 0) >= expected_in
    )


def _history(st: DemoState, cfg: DemoConfig, tr, t_split: int) -> None:
    from ctrstream.batch.archive import Archiver
    from ctrstream.kafka.heartbeats import send_heartbeat
    from ctrstream.stack.services import free_port

    ports = {"speed-features": free_port(), "speed-join": free_port()}
    st.numbers["metrics_ports"] = ports
    rec_root = st.out / "speed-recovery"
    _start(
        st,
        "speed-features",
        ["speed", "features", "--recovery-dir", str(rec_root / "features")],
        ports["speed-features"],
    )
    _start(
        st,
        "speed-join",
        ["speed", "join", "--recovery-dir", str(rec_root / "join")],
        ports["speed-join"],
    )
    st.monitor = LagMonitor(
        st.settings, f"ctrstream-demo-lag-{st.run_id}", ports, lambda job: _running(st, job)
    )
    probe = _probe(st, tr, None, t_split, cfg)
    st.monitor.begin("history")
    t0 = time.monotonic()
    st.numbers["replay_history"] = _replay(
        st, tr, None, t_split, t_split - st.numbers["t_start"], cfg, "replay (history)"
    )
    st.monitor.replay_ended("history")
    # advance the watermark to the split so buckets and attribution windows up to it close
    send_heartbeat(st.settings, t_split)
    _wait(
        "the speed layer to catch up with the history",
        lambda: _speed_caught_up(st, _events_written(st)),
        600,
        ["speed-features", "speed-join"],
        st,
    )
    st.numbers["speed_history_seconds"] = time.monotonic() - t0
    st.monitor.end("history")
    st.numbers.setdefault("freshness", {})["history"] = probe.finish()
    archiver = Archiver(st.settings, st.settings.data_dir)
    stats = archiver.run(until_idle_s=3.0)
    st.numbers["archive"] = stats.as_dict()
    console.print(f"archive: {stats.as_dict()}")


def _batch(st: DemoState, cfg: DemoConfig, tr, t_split: int) -> None:
    from ctrstream.batch.pipeline import run_training, training_shards
    from ctrstream.batch.views import publish_batch_view
    from ctrstream.cli.train import print_summary
    from ctrstream.models.publish import publish, served_model_name

    # the default path of `ctrstream train`: the chunked build into Parquet shards, both
    # models trained streaming them (memory bounded by a chunk, not the data)
    window_ms = int(st.settings.attribution_window_s * 1000)
    shard_dir = st.out / "training-set"
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    manifest = training_shards(
        st.settings, shard_dir, end_ms=t_split - window_ms, log=console.print
    )
    st.numbers["train_rows"] = int(manifest["rows"])
    summary = run_training(
        st.settings,
        shard_dir,
        tr.oracle,
        out_dir=st.out / "models",
        epochs=cfg.epochs,
        source=f"archive {st.settings.data_dir}",
        log=console.print,
    )
    shutil.rmtree(shard_dir)
    print_summary(summary, console)
    st.numbers["training"] = summary
    published = {}
    for kind, base in (("lr", "ctr_lr"), ("deep", "ctr_deep")):
        card = json.loads(Path(summary["models"][kind]["card"]).read_text())
        published[kind] = publish(st.settings, summary["models"][kind]["onnx"], base, card=card)
        console.print(f"published {served_model_name(st.settings, base)}: {published[kind]}")
    st.numbers["published"] = published
    view = publish_batch_view(st.settings, st.settings.data_dir, t_split)
    st.numbers["batch_view"] = view
    console.print(f"batch view {view.get('version')} at cut-off {view.get('cutoff_ms')}: {view}")


def _live(st: DemoState, cfg: DemoConfig, tr, t_split: int) -> None:
    from ctrstream.stack.services import free_port

    ports = st.numbers["metrics_ports"]
    ports["score"], ports["calibrate"] = free_port(), free_port()
    _start(
        st,
        "score",
        [
            "score",
            "--model",
            "ctr_deep",
            "--since-ms",
            str(t_split),
            "--recovery-dir",
            str(st.out / "score-recovery"),
        ],
        ports["score"],
    )
    _start(st, "calibrate", ["calibrate", "--checkpoint-interval", "1"], ports["calibrate"])
    end = st.numbers["t_end"]
    expected = int(np.count_nonzero(tr.impressions.column("event_time_ms").to_numpy() >= t_split))
    probe = _probe(st, tr, t_split, None, cfg)
    assert st.monitor is not None
    st.monitor.scorer = (st.monitor.impressions_end(), expected)
    st.monitor.begin("live")
    t0 = time.monotonic()
    st.numbers["replay_live"] = _replay_lockstep(st, tr, t_split, cfg, "replay (live, lockstep)")
    st.monitor.replay_ended("live")
    _close_windows(st, end)
    _wait(
        "the scorer to score the live stream",
        lambda: _topic_count(st.settings, st.settings.topics.predictions) >= expected,
        900,
        ["score"],
        st,
    )
    st.numbers["score_seconds"] = time.monotonic() - t0
    st.numbers["predictions"] = _topic_count(st.settings, st.settings.topics.predictions)
    st.numbers["freshness"]["live"] = probe.finish()
    _live_settles(st, tr.impressions.num_rows, expected)
    for name in ("score", "calibrate"):
        _stop(st, name)


def _close_windows(st: DemoState, end_ms: int) -> None:
    """A heartbeat past every attribution window and the allowed lateness after ``end_ms``:
    the join emits the last labeled examples."""
    from ctrstream.kafka.heartbeats import send_heartbeat

    send_heartbeat(
        st.settings,
        end_ms
        + int(st.settings.attribution_window_s * 1000)
        + int(st.settings.allowed_lateness_s * 1000)
        + F.HOUR_MS,
    )


def _live_settles(st: DemoState, n_labeled: int, n_predictions: int) -> None:
    """After the live phase's last event: wait for the join to label every impression, the
    calibrator to join every prediction and the speed layer to read everything; then record
    the lag, the jobs' metrics and the speed view's size."""
    ports = st.numbers["metrics_ports"]
    _wait(
        "the join to label every impression",
        lambda: _topic_count(st.settings, st.settings.topics.labeled) >= n_labeled * 0.99,
        600,
        ["speed-join"],
        st,
    )

    def calibrator_done() -> bool:
        # every prediction is joined with its label or dropped (expired, degraded, duplicate)
        m = scrape_or_empty(ports["calibrate"])
        return (
            m.get("ctrstream_calibration_joined_total", 0)
            + m.get("ctrstream_calibration_join_dropped_total{side=pred}", 0)
        ) >= n_predictions

    def calibrate_done() -> bool:
        # a restarted calibrator (ctrstream.demo.story's keep-alive) counts from zero: then
        # its consumer group having committed both topics' ends is the criterion
        restarted = (st.numbers.get("restarts") or {}).get("calibrate")
        return (
            calibrator_done()
            if not restarted
            else _group_caught_up(
                st.settings,
                "ctrstream-calibrate",
                [st.settings.topics.predictions.name, st.settings.topics.labeled.name],
            )
        )

    _wait("the calibrator to learn from the live labels", calibrate_done, 600, ["calibrate"], st)
    _wait(
        "the speed layer to catch up with the live stream",
        lambda: _speed_caught_up(st, _events_written(st)),
        600,
        ["speed-features", "speed-join"],
        st,
    )
    assert st.monitor is not None
    st.monitor.end("live")
    st.numbers["lag"] = st.monitor.summary()
    st.numbers["metrics"] = {name: scrape_or_empty(port) for name, port in ports.items()}
    # the speed layer has read everything (the join has labeled every impression): count its view
    st.numbers["speed_keys_by_entity"] = _count_speed_keys(st.settings)
    st.numbers["speed_keys"] = sum(st.numbers["speed_keys_by_entity"].values())
    console.print(
        f"speed view: {st.numbers['speed_keys']:,} hashes in Redis "
        f"({st.settings.speed.layout} layout) "
        f"{st.numbers['speed_keys_by_entity']}"
    )


def _group_caught_up(settings: Settings, group: str, topics: list[str]) -> bool:
    """Whether consumer group ``group`` has committed the end of every partition of
    ``topics``."""
    from confluent_kafka import TopicPartition

    from ctrstream.kafka.clients import make_consumer, topic_end_offsets

    c = make_consumer(settings, group_id=group)
    try:
        for topic in topics:
            ends = topic_end_offsets(settings, topic)
            got = c.committed([TopicPartition(topic, p) for p in ends], timeout=10)
            if any(tp.offset < ends[tp.partition] for tp in got if ends[tp.partition] > 0):
                return False
        return True
    finally:
        c.close()


def _live_closed(st: DemoState, cfg: DemoConfig, tr, t_split: int) -> None:
    """The closed loop and the life of the system (``ctrstream.demo.story``): the world
    continues the history's market from ``t_split`` with ad requests; the ad server
    (features, Triton, calibration, the auction) decides what is shown, first under the
    opening experiment, then the champion alone; the market drifts; the decay monitor
    watches each served version against the oracle; the controller retrains on the alarm,
    shadows, tests and promotes or rolls back. The speed layer, the join, the calibrator, the
    archive and the monitor run on what the loop produced."""
    from ctrstream.loop import session
    from ctrstream.loop.runner import LoopConfig
    from ctrstream.loop.wiring import build_world
    from ctrstream.stack.services import free_port

    ports = st.numbers["metrics_ports"]
    ports["calibrate"], ports["monitor"] = free_port(), free_port()
    _start(st, "calibrate", ["calibrate", "--checkpoint-interval", "1"], ports["calibrate"])
    # the archive keeps up with the loop: the controller's clock and training data
    _start(st, "archive", ["archive", "--max-batch-s", "1"])
    name = f"demo-{st.run_id}"
    exp = session.start(st.settings, _opening_experiment(name, cfg), t_split)
    st.numbers["experiment_definition"] = exp.to_dict()
    sc = cfg.story
    monitor_argv = [
        "monitor",
        "--oracle",
        str(st.settings.run_dir / "experiments"),
        "--window-min",
        str(sc.monitor_window_min),
        "--baseline-min",
        str(sc.monitor_baseline_min),
        "--publish-interval",
        "1",
        "--job-name",
        f"monitor-demo{st.run_id}",
    ]
    jobs = {
        "monitor": (monitor_argv, ports["monitor"]),
        "archive": (["archive", "--max-batch-s", "1"], 0),
        "calibrate": (["calibrate", "--checkpoint-interval", "1"], ports["calibrate"]),
    }
    _start(st, "monitor", *jobs["monitor"])
    restarts: dict[str, int] = {}
    st.numbers["restarts"] = restarts

    def keepalive() -> None:
        """Restart a job of the story that exited (each resumes from its committed
        positions and checkpoint), as `ctrstream run`'s supervisor does; counted."""
        for job, (argv, port) in jobs.items():
            p = st.procs.get(job)
            if p is not None and p.poll() is not None:
                restarts[job] = restarts.get(job, 0) + 1
                console.print(
                    f"[yellow]the {job} job exited with code {p.returncode}: restarting it "
                    f"(restart {restarts[job]}; see {st.out / 'logs' / (job + '.log')})[/]"
                )
                log = st.out / "logs" / f"{job}.log"
                log.rename(log.with_name(f"{job}.{restarts[job]}.log"))
                _start(st, job, argv, port)

    world, start = build_world(
        st.settings,
        traffic=tr,
        start_ms=t_split,
        request_rate=_request_rate(tr.scenario, cfg.loop_volume),
        overrides={"candidates_per_request": cfg.candidates},
    )
    end = start + int(cfg.live_hours * 3_600_000)
    loop_cfg = LoopConfig(step_s=cfg.loop_step_s, analyze_every_s=300.0, checkpoint_every=10)
    loop, close = _build_loop(st, name, world, loop_cfg)
    story = Story(st.settings, sc, st.out / "controller", t_split, name, console.print, keepalive)
    story.start()
    assert st.monitor is not None
    st.monitor.begin("live")
    clock = {"t": start}
    try:
        with _LoopBar(end - start) as bar:

            def progress(p: dict) -> None:
                bar.update(p)
                clock["t"] = int(p["t_ms"])
                story.tick(int(p["t_ms"]))

            loop.cfg.progress = progress
            summary = loop.run(start, end, stop=lambda: story.done(clock["t"]), final=True)
            if summary.ended_ms < end:  # the story ended it: the world ends here
                loop.run(summary.ended_ms, summary.ended_ms, final=True)
    finally:
        close()
    st.monitor.replay_ended("live")
    st.numbers["loop"] = summary.to_dict()
    st.numbers["story"] = story.summary()
    st.numbers["segments"] = summary.segments
    console.print(
        f"closed loop: {summary.requests:,} requests, {summary.impressions:,} impressions in "
        f"{summary.wall_s:.1f} s ({summary.requests_per_s:,.0f} requests/s, "
        f"{summary.impressions_per_s:,.0f} impressions/s; ad server {summary.decide_s:.1f} s; "
        f"the controller's steps {story.controller_s:.1f} s)"
    )
    _close_windows(st, summary.ended_ms)
    _live_settles(
        st,
        st.numbers["history_impressions"] + summary.impressions,
        summary.predictions,
    )
    st.numbers["decay_state"] = _final_decay_state(st)
    if session.registry(st.settings).get(name).running:
        session.stop(st.settings, name, "the demo's live phase ended")
    st.numbers["experiment"] = session.report(st.settings, name, st.out / "experiment")
    st.numbers["experiment_dir"] = str(st.out / "experiment")
    st.numbers["loop_log"] = str(session.state_dir(st.settings, name) / "impressions")
    reports = [st.numbers["experiment"]]
    for other in [f"live-{st.run_id}", *story.experiment_names()]:
        try:
            reports.append(session.report(st.settings, other, st.out / "experiments" / other))
        except (session.SessionError, FileNotFoundError) as e:  # never served: no ledger
            console.print(f"experiment {other}: no report ({e})")
            reports.append(_registry_only_report(st, other))
    st.numbers["experiment_reports"] = reports
    # every experiment's decision log, those the registry archived (a default restarted on
    # a promoted version, a name started again) included
    root = st.settings.run_dir / "experiments"
    st.numbers["decision_logs"] = [
        str(p)
        for pattern in ("*/loop/impressions", ".archive/*/loop/impressions")
        for p in sorted(root.glob(pattern))
        if p.parent.parent.name != ".archive"
    ]
    console.print((st.out / "experiment" / "experiment.md").read_text())
    for job in ("calibrate", "archive", "monitor"):
        _stop(st, job)


def _request_rate(sc, volume: float) -> float:
    """``volume`` times the world's default request rate: the history's impressions per
    second of event time over the mean slots per request (``ctrstream.simulation.world``)."""
    if not volume > 0:
        raise DemoError(f"loop volume must be > 0 (a share of the history's rate), not {volume}")
    w = np.asarray(sc.slot_count_weights, dtype=np.float64)
    mean_slots = float((w * np.arange(1, len(w) + 1)).sum() / w.sum())
    return volume * sc.events / (sc.span_ms / 1000.0) / mean_slots


def _opening_experiment(name: str, cfg: DemoConfig):
    """The opening experiment: DCN-v2 against LR, the prior and the oracle at small shares,
    DCN-v2 also as a shadow."""
    from ctrstream.experiments.design import Arm, Experiment, Guardrails

    arms = [
        Arm(name="lr", kind="model", weight=0.35, model_name="ctr_lr"),
        Arm(name="deep", kind="model", weight=0.35, model_name="ctr_deep"),
        Arm(name="prior", kind="prior", weight=0.15),
        Arm(name="oracle", kind="oracle", weight=0.15),
        # DCN-v2 also as a shadow: it scores every request and decides none
        Arm(name="deep-shadow", kind="model", model_name="ctr_deep", shadow=True),
    ]
    hours = cfg.story.experiment_h
    return Experiment(
        name=name,
        # the split depends on the seed, not on the run: the same users meet the same arms in
        # every run of one seed (the true lift of a split includes which users each arm got)
        salt=f"demo-seed{cfg.seed}",
        arms=tuple(arms),
        control="lr",
        alpha=0.05,
        min_run_s=min(1800.0, hours * 3600 / 4),
        min_users_per_arm=200,
        primary_metric="revenue_per_request",
        # a micro-batched ad server answers a request when its batch is ranked: on this
        # 2-core machine, shared with the whole stack, a batch takes about a second
        guardrails=Guardrails(latency_p99_ms_max=5_000.0),
    )


def _build_loop(st: DemoState, name: str, world, loop_cfg):
    """The loop that serves what the registry says (``ctrstream.loop.follow.FollowLoop``):
    the opening experiment, then the champion alone (DCN-v2 split A/A with itself, the
    default), then the controller's shadow and experiment as it starts and stops them."""
    from ctrstream.loop.follow import FollowLoop, champion_default

    default = champion_default("ctr_deep", f"live-{st.run_id}")
    loop = FollowLoop(
        st.settings, world, loop_cfg, default=default, state_dir=st.out / "loop-follow"
    )
    return loop, loop.close


def _final_decay_state(st: DemoState) -> dict | None:
    """The decay monitor's last state, once it has read what the loop produced (bounded)."""
    from ctrstream.store.connection import redis_client
    from ctrstream.store.monitor import read_decay_state

    r = redis_client(st.settings, timeout_s=30.0)
    try:
        port = st.numbers["metrics_ports"]["monitor"]
        deadline = time.monotonic() + 30
        last = None
        while time.monotonic() < deadline:
            m = scrape_or_empty(port)
            seen = sum(v for k, v in m.items() if k.startswith("ctrstream_monitor_joined_total"))
            if seen and seen == last:
                break  # nothing new since the last look: the monitor has read everything
            last = seen
            time.sleep(2.0)  # the monitor publishes every second
        return read_decay_state(r)
    finally:
        r.close()


def _registry_only_report(st: DemoState, name: str) -> dict:
    """What the registry knows of an experiment the loop never served: when it ran."""
    from ctrstream.loop import session

    rec = session.registry(st.settings).get(name)
    return {
        "definition": {"name": name},
        "status": rec.status_dict(),
        "comparisons": [],
    }


class _LoopBar:
    """A progress bar over the closed loop's event time."""

    def __init__(self, total_ms: int):
        from rich.progress import Progress

        self.progress = Progress(console=console, transient=False)
        self.total = total_ms
        self.start: int | None = None

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("closed loop (event time)", total=self.total)
        return self

    def update(self, p: dict) -> None:
        if self.start is None:
            self.start = p["t_ms"] - 1
        self.progress.update(
            self.task,
            completed=p["t_ms"] - self.start,
            description=f"closed loop: {p['requests']:,} requests, {p['impressions']:,} shown",
        )

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def _reconcile(st: DemoState) -> None:
    from ctrstream.batch.reconcile import reconcile

    rep = reconcile(st.settings, st.settings.data_dir)
    d = rep.to_dict() if hasattr(rep, "to_dict") else asdict(rep)
    st.numbers["reconcile"] = d
    (st.out / "reconcile.json").write_text(json.dumps(d, indent=2, default=str))
    md = getattr(rep, "markdown", None)
    text = md() if callable(md) else None
    if text:
        (st.out / "reconcile.md").write_text(text)
    console.print(text or json.dumps(d, default=str)[:2000])


def _serve(st: DemoState, tr) -> None:
    import httpx

    from ctrstream.stack.services import free_port

    port = free_port()
    _start(st, "serve", ["serve", "--host", "127.0.0.1", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _wait("the prediction API to be ready", ready, 120, ["serve"], st)
    imps = tr.impressions.slice(tr.impressions.num_rows - 5000).to_pylist()
    ads: dict[int, dict] = {}
    for r in imps:
        ads.setdefault(
            r["ad_id"], {k: r[k] for k in ("ad_id", "campaign_id", "advertiser_id", "ad_category")}
        )
    candidates = list(ads.values())[:50]
    samples = []
    for r in imps[-3:]:
        body = {
            "user_id": r["user_id"],
            "context": {
                "site_id": r["site_id"],
                "device_type": r["device_type"],
                "country": r["country"],
                "position": r["position"],
                "event_time_ms": st.numbers["t_end"],
            },
            "candidates": candidates,
        }
        resp = httpx.post(f"{url}/v1/predict", json=body, timeout=10)
        if resp.status_code != 200:
            raise DemoError(f"/v1/predict answered {resp.status_code}: {resp.text[:500]}")
        samples.append(
            {
                "request": {k: v for k, v in body.items() if k != "candidates"}
                | {"candidates": len(candidates)},
                "response": resp.json(),
                "server_timing": resp.headers.get("server-timing", ""),
            }
        )
        table = Table(
            title=f"user {r['user_id']} on site {r['site_id']} ({r['device_type']}, "
            f"position {r['position']}): top 5 of {len(candidates)} ads"
        )
        for c in ("rank", "ad_id", "raw_score", "calibrated_score"):
            table.add_column(c, justify="right")
        out = resp.json()
        for c in out["candidates"][:5]:
            table.add_row(
                str(c.get("rank")),
                str(c["ad_id"]),
                f"{c['raw_score']:.4f}",
                f"{c['calibrated_score']:.4f}",
            )
        console.print(table)
        console.print(
            f"model {out.get('model_name')} v{out.get('model_version')}, calibration "
            f"{out.get('calibration')}, degraded {out.get('degraded')}"
        )
    st.numbers["api_samples"] = samples
    _stop(st, "serve")


STUDY_SEED = 0


def _study(st: DemoState, cfg: DemoConfig) -> None:
    """The freshness study's quick sweeps (no server: point-in-time features at each lag)."""
    if cfg.study_events <= 0:
        console.print("skipped (--study-events 0)")
        st.numbers["study"] = None
        return
    from ctrstream.demo.worth import run_small_study

    # the study's own market at its default seed (the one docs/freshness.md measures), not
    # the demo's: on a market this small one seed can put most of a day's traffic on a few
    # drifting ads, and the curves would be that seed's story (docs/freshness.md)
    st.numbers["study"] = run_small_study(
        cfg.study_events, STUDY_SEED, st.out, log=lambda *a: console.print(*a)
    )


def run_demo(cfg: DemoConfig) -> Path:
    with sigterm_exits():
        return _run_demo(cfg)


def _run_demo(cfg: DemoConfig) -> Path:
    if not cfg.lockstep_s > 0:
        raise DemoError(f"lockstep_s must be > 0 seconds of event time, not {cfg.lockstep_s}")
    if cfg.live not in ("closed", "open"):
        raise DemoError(f"live must be 'closed' or 'open', not {cfg.live!r}")
    if cfg.taste_logit is not None and not cfg.taste_logit >= 0:
        raise DemoError(
            f"--taste-logit must be >= 0 (0: no taste interaction), not {cfg.taste_logit}"
        )
    if cfg.live == "closed":
        try:
            shifts = cfg.scenario in ("taste_shift", "drift")  # _generate places their shift
            cfg.story.validate(cfg.drift_after_h if shifts else None)
        except ValueError as e:
            raise DemoError(str(e)) from None
    run_id = uuid.uuid4().hex[:6]
    out = Path(cfg.out).absolute() / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    base = get_settings()
    if cfg.isolated:
        from ctrstream.stack.manager import isolated_settings

        base = isolated_settings(out / "stack", base)
    st = DemoState(run_id, out, _demo_settings(base, run_id, out))
    console.print(f"[bold]ctrstream demo[/] run {run_id}: output in {out}")
    t0 = time.monotonic()
    total = 9
    ok = False
    try:
        with phase(st, 1, total, "stack", "Kafka (KRaft), Redis, Triton on 127.0.0.1"):
            _stack(st)
        with phase(
            st, 2, total, "generate", f"scenario {cfg.scenario}, {cfg.events:,} impressions"
        ):
            tr, t_split = _generate(st, cfg)
        with phase(st, 3, total, "history", "speed layer + replay of the history + archive"):
            _history(st, cfg, tr, t_split)
        with phase(st, 4, total, "batch", "training set, LR + DCN-v2, ONNX, Triton, batch view"):
            _batch(st, cfg, tr, t_split)
        # reconcile as soon as the batch view lands (the lambda architecture's moment for
        # it): the speed view's TTLs run in wall time, and a time-compressed replay spends
        # hours of event time per wall minute
        with phase(st, 5, total, "reconcile", "batch view vs speed view; the batch wins"):
            _reconcile(st)
        if cfg.live == "closed":
            with phase(
                st,
                6,
                total,
                "live",
                "closed loop: experiment, market drift, decay alarm, the controller's cycle",
            ):
                _live_closed(st, cfg, tr, t_split)
        else:
            with phase(
                st, 6, total, "live", "streaming scorer + River calibration on the live stream"
            ):
                _live(st, cfg, tr, t_split)
        with phase(st, 7, total, "serve", "sample ad requests through the prediction API"):
            _serve(st, tr)
        with phase(st, 8, total, "study", "what freshness is worth: staleness, label delay"):
            _study(st, cfg)
        with phase(st, 9, total, "report", "terminal summary + report.html"):
            from ctrstream.demo.report import build_report

            st.numbers["total_seconds"] = time.monotonic() - t0
            path = build_report(st, tr, cfg)
        ok = True
        return path
    finally:
        for probe in list(st.probes):
            probe.close()
        if st.monitor is not None:
            st.monitor.close()
        for name in list(st.procs):
            _stop(st, name)
        if not ok:
            console.print(
                f"[red]demo stopped[/]; logs are in {out / 'logs'} "
                f"(stack logs in {st.settings.run_dir / 'logs'})"
            )
        if st.started_stack and not cfg.keep_stack:
            from ctrstream.stack.manager import Stack

            Stack(st.settings).down(log=console.print)
        elif cfg.keep_stack:
            console.print("stack kept running (--keep-stack); stop it with `ctrstream stack down`")
