"""The demo's terminal summary and ``report.html`` (see ``ctrstream.demo.run``)."""

from __future__ import annotations

import html
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from ctrstream.demo.html import (
    bar_png,
    fmt,
    img_html,
    lag_png,
    lambda_svg,
    reliability_png,
    series_png,
    table_html,
    write_report,
)
from ctrstream.demo.timeline import (
    Event,
    Timeline,
    assemble,
    concat_columns,
    event_rows,
    ne_rows,
    read_audit,
    story_text,
    timeline_html,
    timeline_png,
)
from ctrstream.demo.worth import worth_html
from ctrstream.metrics import summary

FRESHNESS_LIMIT_S = 3600.0  # a "freshness" above this is a measurement artefact, never shown
BENCH_SPEED = "ctrstream bench speed"
LAG_COLUMNS = [
    "stage",
    "phase",
    "max lag (records)",
    "lag at replay end",
    "final lag",
    "caught up (s after replay)",
]


def _calibration_stats(p: np.ndarray, y: np.ndarray) -> dict:
    """The live stream's metrics of one score (``ctrstream.metrics.summary``: the same
    definitions as the model card and the calibrator's gauges), in the table's order."""
    s = summary(p, y)
    return {
        "mean_pred": s["mean_pred"],
        "observed": s["observed_ctr"],
        "ratio": s["ratio"],
        **{k: s[k] for k in ("log_loss", "ne", "auc", "ece")},
    }


def _quality(m: dict) -> dict:
    return {
        "log_loss": m.get("log_loss"),
        "NE": m.get("ne"),
        "AUC": m.get("auc"),
        "pred/obs": m.get("calibration"),
        "ECE": m.get("ece"),
    }


def _live_outcomes(st, tr):
    """Predictions of the live stream joined with their labels and the oracle."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ctrstream.events import decode_labeled, decode_prediction
    from ctrstream.kafka.topics import read_topic

    # a record without a value is no prediction or label (the jobs never write one)
    preds = [
        decode_prediction(r.value)
        for r in read_topic(st.settings, st.settings.topics.predictions.name, 120)
        if r.value is not None
    ]
    labels = {}
    for r in read_topic(st.settings, st.settings.topics.labeled.name, 120):
        if r.value is None:
            continue
        lab = decode_labeled(r.value)
        labels[lab.impression.impression_id] = lab.clicked
    rows = [
        (
            p.impression_id,
            p.event_time_ms,
            p.raw_score,
            p.calibrated_score,
            p.degraded,
            labels[p.impression_id],
        )
        for p in preds
        if p.impression_id in labels
    ]
    if not rows:
        return None
    ids, t, raw, cal, deg, y = map(np.asarray, zip(*rows))
    idx = pc.index_in(
        pa.array(ids, type=pa.string()),
        value_set=tr.oracle.column("impression_id").combine_chunks(),
    )
    oracle = tr.oracle.column("p_click").combine_chunks().take(idx).to_numpy(zero_copy_only=False)
    order = np.argsort(t, kind="stable")
    return {
        "t": t[order],
        "raw": raw[order].astype(float),
        "cal": cal[order].astype(float),
        "degraded": deg[order].astype(bool),
        "y": y[order].astype(float),
        "oracle": np.nan_to_num(oracle[order].astype(float)),
        "n_predictions": len(preds),
    }


def _loop_outcomes(st) -> dict | None:
    """The closed loop's shown impressions decided by a model, with their label (the world's
    click) and their true probability, from the loop's decision log."""
    from ctrstream.loop.ledger import ImpressionLog

    folder = st.numbers.get("loop_log")
    table = ImpressionLog.read(Path(folder)) if folder else None
    if table is None or table.num_rows == 0:
        return None
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    keep = ~np.isin(cols["model_name"], ["", "prior", "oracle"]) & (cols["model_version"] != "")
    if not keep.any():
        return None
    order = np.argsort(cols["event_time_ms"][keep], kind="stable")
    pick = {c: v[keep][order] for c, v in cols.items()}
    return {
        "t": pick["event_time_ms"],
        "raw": pick["raw_score"].astype(float),
        "cal": pick["calibrated_score"].astype(float),
        "degraded": pick["degraded"].astype(bool),
        "y": pick["clicked"].astype(float),
        "oracle": pick["p_true"].astype(float),
        "model": pick["model_name"],
        "n_predictions": int(keep.sum()),
    }


def _over_time(live: dict, windows: int = 24) -> dict:
    t, y = live["t"], live["y"]
    edges = np.linspace(t.min(), t.max() + 1, windows + 1)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, windows - 1)
    cnt = np.maximum(np.bincount(idx, minlength=windows), 1)
    obs = np.bincount(idx, y, windows) / cnt
    x = ((edges[:-1] + edges[1:]) / 2 - t.min()) / 60_000.0
    out = {"minutes": x.tolist()}
    for name in ("raw", "cal", "oracle"):
        out[name] = (np.bincount(idx, live[name], windows) / cnt / np.maximum(obs, 1e-9)).tolist()
    return out


def _freshness(n: dict) -> dict:
    """Feature freshness measured by the demo's probes (``ctrstream.demo.run._FreshnessProbe``):
    per phase and over all probes; ``na`` is the reason when there is no meaningful number."""
    per = n.get("freshness") or {}
    rows, lat = [], []
    for phase, f in per.items():
        lat += list(f.get("latencies", []))
        rows.append(
            {
                "phase": phase,
                **{
                    k: f.get(k)
                    for k in (
                        "probes",
                        "seen in Kafka",
                        "visible in Redis",
                        "p50 s",
                        "p95 s",
                        "max s",
                    )
                },
            }
        )
    out: dict[str, Any] = {
        "rows": rows,
        "p50_s": None,
        "p95_s": None,
        "max_s": None,
        "na": None,
        "poll_s": next((f.get("poll_s") for f in per.values()), None),
    }
    if lat:
        a = np.asarray(lat, dtype=float)
        out.update(
            p50_s=float(np.percentile(a, 50)),
            p95_s=float(np.percentile(a, 95)),
            max_s=float(a.max()),
            probes=int(sum(f.get("probes", 0) for f in per.values())),
            visible=len(a),
        )
        rows.append(
            {
                "phase": "all",
                "probes": out["probes"],
                "seen in Kafka": sum(f.get("seen in Kafka", 0) for f in per.values()),
                "visible in Redis": len(a),
                "p50 s": out["p50_s"],
                "p95 s": out["p95_s"],
                "max s": out["max_s"],
            }
        )
    if not lat:
        out["na"] = "no sampled impression could be followed from Kafka to Redis in this run"
    elif not (0 <= out["max_s"] < FRESHNESS_LIMIT_S):
        out["na"] = f"the measured value ({out['max_s']:.0f} s) is not plausible"
    if out["na"]:
        out.update(p50_s=None, p95_s=None, max_s=None)
    return out


def _lag_rows(n: dict) -> list[dict]:
    return [{c: r.get(c) for c in LAG_COLUMNS} for r in (n.get("lag") or {}).get("rows", [])]


def _lag_numbers(rows: list[dict], stage_prefix: str) -> tuple:
    """Largest lag and longest catch-up of the stages whose name starts with ``stage_prefix``."""
    sel = [r for r in rows if r["stage"].startswith(stage_prefix)]
    lags = [r["max lag (records)"] for r in sel if r["max lag (records)"] is not None]
    trail = [
        r["caught up (s after replay)"] for r in sel if r["caught up (s after replay)"] is not None
    ]
    return (max(lags) if lags else None), (max(trail) if trail else None)


def build_report(st, tr, cfg) -> Path:
    from rich.console import Console

    console = Console()
    out = st.out
    n = st.numbers
    plots: list[tuple[str, Path]] = []
    # ---------------------------------------------------------------- throughput
    m = n.get("metrics", {})
    speed_in = m.get("speed-features", {}).get("ctrstream_speed_events_in_total", 0)
    loop = n.get("loop")
    live_s = loop["wall_s"] if loop else n.get("score_seconds", 0)
    speed_rate = speed_in / max(n.get("speed_history_seconds", 0) + live_s, 1e-9)
    throughput = [
        {
            "stage": "replay (history)",
            "events": n["replay_history"]["sent"],
            "seconds": n["replay_history"]["seconds"],
            "events/s": n["replay_history"]["rate"],
        },
    ]
    if loop:
        throughput += [
            {
                "stage": "closed loop: ad requests decided",
                "events": loop["requests"],
                "seconds": loop["wall_s"],
                "events/s": loop["requests_per_s"],
            },
            {
                "stage": "closed loop: impressions shown",
                "events": loop["impressions"],
                "seconds": loop["wall_s"],
                "events/s": loop["impressions_per_s"],
            },
        ]
    else:
        throughput.append(
            {
                "stage": "replay (live, lockstep)",
                "events": n["replay_live"]["sent"],
                "seconds": n["replay_live"]["seconds"],
                "events/s": n["replay_live"]["rate"],
            }
        )
    throughput.append(
        {
            "stage": "speed layer (incl. waiting for the input)",
            "events": int(speed_in),
            "seconds": n.get("speed_history_seconds", 0) + live_s,
            "events/s": speed_rate,
        }
    )
    if not loop:
        throughput.append(
            {
                "stage": "scorer (live, incl. waiting for replay)",
                "events": n.get("predictions", 0),
                "seconds": n.get("score_seconds", 0),
                "events/s": n.get("predictions", 0) / max(n.get("score_seconds", 0), 1e-9),
            }
        )
    plots.append(
        (
            "Throughput of each stage (events/s, wall time incl. waiting for the replay)",
            bar_png(
                out / "throughput.png",
                [r["stage"] for r in throughput],
                [r["events/s"] for r in throughput],
                "stage throughput",
                "events/s",
            ),
        )
    )
    lag_rows = _lag_rows(n)
    lag_series = (n.get("lag") or {}).get("series", {})
    if any(ser["stages"] for ser in lag_series.values()):
        plots.append(
            (
                "Consumer lag of each stage over wall time (records appended to its input "
                "topics and not yet read; dashed: the replay ended)",
                lag_png(out / "lag.png", lag_series),
            )
        )
    freshness = _freshness(n)
    # ---------------------------------------------------------------- model quality
    quality = []
    training = n["training"]
    oracle_row = None
    for kind, mm in training["models"].items():
        ev = mm["evaluation"]
        quality.append(
            {"model": f"ctr_{kind}", **_quality(ev["model"]), "train s": mm["train_seconds"]}
        )
        oracle_row = ev.get("oracle") or oracle_row
    if oracle_row:
        quality.append({"model": "oracle (true p, the ceiling)", **_quality(oracle_row)})
    rel = Path(training["dir"]) / "reliability.png"
    if rel.exists():
        shutil.copy(rel, out / "reliability_validation.png")
        plots.append(
            (
                "Reliability on the validation slice (batch layer)",
                out / "reliability_validation.png",
            )
        )
    # ---------------------------------------------------------------- calibration
    live = _loop_outcomes(st) if loop else _live_outcomes(st, tr)
    calib = {}
    if live is not None:
        ok = ~live["degraded"]
        half = len(live["t"]) // 2
        calib = {
            "raw (Triton)": _calibration_stats(live["raw"][ok], live["y"][ok]),
            "calibrated (River)": _calibration_stats(live["cal"][ok], live["y"][ok]),
            "calibrated, second half": _calibration_stats(
                live["cal"][half:][ok[half:]], live["y"][half:][ok[half:]]
            ),
            "oracle": _calibration_stats(live["oracle"], live["y"]),
        }
        plots.append(
            (
                "Reliability of the live stream before and after River calibration",
                reliability_png(
                    out / "reliability_live.png",
                    {
                        "raw (Triton)": (live["raw"][ok], live["y"][ok]),
                        "calibrated (River)": (live["cal"][ok], live["y"][ok]),
                        "oracle": (live["oracle"], live["y"]),
                    },
                    "live stream: before / after calibration",
                ),
            )
        )
        ot = _over_time(live)
        drift_t = tr.meta.get("drift_time_ms")
        vline = (
            (drift_t - live["t"].min()) / 60_000.0
            if drift_t and drift_t >= live["t"].min()
            else None
        )
        plots.append(
            (
                "Calibration over time (mean predicted / observed CTR per event-time window)",
                series_png(
                    out / "calibration_over_time.png",
                    {
                        "raw": (ot["minutes"], ot["raw"]),
                        "calibrated": (ot["minutes"], ot["cal"]),
                        "oracle": (ot["minutes"], ot["oracle"]),
                    },
                    "calibration through the live stream",
                    "event-time minutes into the live stream",
                    "mean predicted / observed",
                    vline,
                    "drift",
                ),
            )
        )
        n["degraded"] = int(live["degraded"].sum())
    # ---------------------------------------------------------------- the experiment
    exp_png = Path(n.get("experiment_dir", out / "experiment")) / "experiment.png"
    if n.get("experiment") and exp_png.exists():
        shutil.copy(exp_png, out / "experiment.png")
        plots.append(
            (
                "Cumulative CTR and revenue per 1,000 requests of each arm over event time "
                "(dashed: the true expected value of the arm's decisions)",
                out / "experiment.png",
            )
        )
    # ---------------------------------------------------------------- the timeline
    timeline = build_timeline(n)
    timeline_plot = timeline_png(out / "timeline.png", timeline)
    # ---------------------------------------------------------------- reconciliation
    rec = n.get("reconcile", {})
    # ---------------------------------------------------------------- the diagram numbers
    deep = training["models"].get("deep", {}).get("evaluation", {})
    pub = n.get("published", {}).get("deep", {})
    numbers = {
        "impressions": n["impressions"],
        "clicks": n["clicks"],
        "replay_rate": n["replay_history"]["rate"],
        "partitions": n["partitions"],
        "speed_events": speed_in,
        "speed_rate": speed_rate,
        "dlq": m.get("speed-features", {}).get("ctrstream_speed_dlq_total"),
        "late": m.get("speed-features", {}).get("ctrstream_speed_late_total"),
        "speed_keys": n.get("speed_keys"),
        "speed_lag_max": _lag_numbers(lag_rows, "speed layer (features)")[0],
        "speed_trail_s": _lag_numbers(lag_rows, "speed layer (features)")[1],
        "score_lag_max": _lag_numbers(lag_rows, "scorer")[0],
        "score_trail_s": _lag_numbers(lag_rows, "scorer")[1],
        "freshness_p50_s": freshness["p50_s"],
        "freshness_p95_s": freshness["p95_s"],
        "labeled": m.get("speed-join", {}).get("ctrstream_speed_labeled_total"),
        "archived": sum((n.get("archive", {}).get("records") or {}).values()),
        "train_rows": n.get("train_rows"),
        "batch_version": n.get("batch_view", {}).get("version"),
        "batch_cutoff": time.strftime("%H:%M", time.gmtime(n["t_split"] / 1000)),
        "deep_ne": deep.get("model", {}).get("ne"),
        "oracle_ne": (deep.get("oracle") or {}).get("ne"),
        "model_name": pub.get("model_name"),
        "model_version": pub.get("version"),
        "predictions": n.get("predictions") if not loop else live and live["n_predictions"],
        "degraded": n.get("degraded"),
        "score_rate": throughput[-1]["events/s"] if not loop else loop["impressions_per_s"],
        "calibration_pairs": m.get("calibrate", {}).get("ctrstream_calibration_joined_total"),
        "ratio_before": calib.get("raw (Triton)", {}).get("ratio"),
        "ratio_after": calib.get("calibrated (River)", {}).get("ratio"),
        "rec_compared": rec.get("buckets_compared"),
        "rec_differing": rec.get("buckets_differing"),
        "rec_equal": rec.get("buckets_equal"),
        "rec_missing_speed": rec.get("missing_in_speed"),
        "rec_explained": "all" if rec.get("explained") else "not all",
    }
    if loop:
        numbers["scorer_title"] = "Ad server + auction (closed loop)"
        numbers["scorer_lines"] = [
            f"{loop['requests']:,} requests, {loop['impressions']:,} shown",
            f"{loop['requests_per_s']:,.0f} requests/s, {loop['impressions_per_s']:,.0f} shown/s",
            f"{live['n_predictions'] if live else 0:,} predictions by the model arms",
        ]
    # ---------------------------------------------------------------- terminal summary
    t = Table(
        title=f"ctrstream demo {st.run_id}: {n['impressions']:,} impressions, "
        f"{n['total_seconds']:.0f} s"
    )
    t.add_column("phase")
    t.add_column("seconds", justify="right")
    for p in st.phases:
        t.add_row(p["phase"], f"{p['seconds']:.1f}")
    console.print(t)
    for title, rows in (
        ("throughput", throughput),
        ("model quality (validation, vs the oracle)", quality),
        ("calibration on the live stream", [{"scores": k, **v} for k, v in calib.items()]),
    ):
        tt = Table(title=title)
        if rows:
            cols = list(rows[0].keys())
            for c in cols:
                tt.add_column(c, justify="right")
            for r in rows:
                tt.add_row(*[fmt(r.get(c)) for c in cols])
            console.print(tt)
    tt = Table(
        title="consumer lag per stage (records; sampled every "
        f"{(n.get('lag') or {}).get('interval_s', 0):g} s)"
    )
    for c in LAG_COLUMNS:
        tt.add_column(c, justify="right")
    for r in lag_rows:
        tt.add_row(*[fmt(r.get(c), 3) for c in LAG_COLUMNS])
    console.print(tt)
    console.print(_freshness_text(freshness))
    for name, res in ((n.get("study") or {}).get("sweeps") or {}).items():
        console.print(f"freshness study ({name}): {res.get('headline', {})}")
    tt = Table(title="timeline of the run (event time)")
    for c in ("event time", "min", "kind", "what"):
        tt.add_column(c)
    for r in event_rows(timeline):
        tt.add_row(r["event time"], fmt(r["min"], 3), r["kind"], r["what"])
    console.print(tt)
    console.print(story_text(timeline.numbers))
    rows = ne_rows(timeline.numbers)
    if rows:
        tt = Table(title="online NE per served version vs the oracle on the same impressions")
        for c in rows[0]:
            tt.add_column(c, justify="right")
        for r in rows:
            tt.add_row(*[fmt(r[c]) for c in rows[0]])
        console.print(tt)
    console.print(
        f"reconciliation: {rec.get('buckets_compared')} buckets compared, "
        f"{rec.get('buckets_equal')} equal, {rec.get('buckets_differing')} differing, "
        f"{rec.get('missing_in_speed')} missing in the speed view; reasons {rec.get('reasons')}"
    )
    # ---------------------------------------------------------------- HTML
    sections = [
        ("overview", "What ran", _overview_html(st, cfg, n)),
        (
            "timeline",
            "The life of the system: the timeline of this run",
            timeline_html(timeline, timeline_plot),
        ),
        (
            "architecture",
            "The lambda architecture, with this run's numbers",
            lambda_svg(numbers)
            + "<p>Follow one event: it is produced to Kafka (top), counted by the "
            "speed layer into Redis within a flush interval, archived into Parquet by the batch layer, "
            "recomputed exactly into point-in-time training features and the batch view, and finally "
            "served through the lambda merge and Triton, calibrated by River. See docs/lambda.md.</p>",
        ),
        (
            "throughput",
            "Throughput and lag",
            table_html(throughput)
            + "".join(img_html(p, a) for a, p in plots if p.name == "throughput.png")
            + _lag_html(lag_rows, n)
            + "".join(img_html(p, a) for a, p in plots if p.name == "lag.png")
            + _freshness_html(freshness),
        ),
        (
            "quality",
            "Model quality next to the oracle",
            "<p>The oracle column is the Bayes-optimal ceiling: the generator's true click "
            "probabilities on the same validation rows. NE = log loss / entropy of the background CTR "
            "(lower is better).</p>"
            + table_html(quality)
            + "".join(img_html(p, a) for a, p in plots if p.name == "reliability_validation.png"),
        ),
        (
            "calibration",
            "Online calibration with River",
            table_html([{"scores": k, **v} for k, v in calib.items()])
            + "".join(
                img_html(p, a)
                for a, p in plots
                if p.name in ("reliability_live.png", "calibration_over_time.png")
            ),
        ),
        (
            "experiment",
            "Online experiment: the closed loop, graded against the true lift",
            _experiment_html(n, cfg)
            + "".join(img_html(p, a) for a, p in plots if p.name == "experiment.png"),
        ),
        (
            "freshness-worth",
            "What freshness is worth (the freshness study, small)",
            worth_html(n.get("study")),
        ),
        (
            "reconciliation",
            "Reconciliation: what the speed layer got right, what it missed, and why",
            _reconcile_html(rec, out),
        ),
        (
            "api",
            "Sample ad requests through the prediction API",
            _api_html(n.get("api_samples", [])),
        ),
    ]
    (out / "summary.json").write_text(
        json.dumps(
            {
                "numbers": numbers,
                "phases": st.phases,
                "throughput": throughput,
                "lag": lag_rows,
                "freshness": {k: v for k, v in freshness.items()},
                "quality": quality,
                "calibration": calib,
                "loop": n.get("loop"),
                "experiment": n.get("experiment"),
                "study": n.get("study"),
                "timeline": timeline.to_dict() | {"rows": event_rows(timeline)},
                "story": n.get("story"),
            },
            indent=2,
            default=str,
        )
    )
    return write_report(
        out,
        sections,
        f"ctrstream demo — run {st.run_id}",
        f"scenario {cfg.scenario}, {n['impressions']:,} impressions, seed {cfg.seed}; "
        f"finished in {n['total_seconds']:.0f} s",
    )


def build_timeline(n: dict) -> Timeline:
    """The run's timeline (``ctrstream.demo.timeline``) from what the system left behind:
    the controller's audit log, the monitor's last decay state, the closed loop's decision
    logs and the experiment reports, plus the first model, its cut-off and the market's
    shift, which the demo itself did."""
    from ctrstream.loop.ledger import ImpressionLog

    extra = []
    pub = (n.get("published") or {}).get("deep") or {}
    t_split = n.get("t_split")
    if t_split is not None:
        view = (n.get("batch_view") or {}).get("version")
        extra.append(Event(int(t_split), "cutoff", f"batch view {view}", "the first", "demo"))
        if pub:
            extra.append(
                Event(
                    int(t_split),
                    "version",
                    f"{pub.get('model_name')} v{pub.get('version')} serves",
                    "the first model, trained on the history",
                    "demo",
                )
            )
    if n.get("drift_ms") is not None:
        extra.append(
            Event(
                int(n["drift_ms"]),
                "drift",
                f"the market shifts ({n.get('scenario')})",
                "the scenario's drift_at"
                + (
                    f"; the device x category taste redrawn (taste_logit {n['taste_logit']:g})"
                    if n.get("taste_logit")
                    else ""
                ),
                "demo",
            )
        )
    for seg in n.get("segments") or []:
        if seg.get("from_ms") is not None:
            extra.append(
                Event(
                    int(seg["from_ms"]),
                    "experiment",
                    f"serving {seg.get('experiment')}"
                    + (" (the champion alone)" if seg.get("default") else ""),
                    "the following loop's segment",
                    "loop",
                )
            )
    audit_path = (n.get("story") or {}).get("audit")
    tables = [ImpressionLog.read(Path(p)) for p in n.get("decision_logs") or []]
    return assemble(
        audit=read_audit(audit_path) if audit_path else [],
        decay_state=n.get("decay_state"),
        decisions=concat_columns(tables),
        experiments=n.get("experiment_reports") or [],
        extra=extra,
        window_ms=10 * 60_000,
        monitor_window_min=n.get("monitor_window_min"),
    )


def _freshness_text(f: dict) -> str:
    if f["na"]:
        return (
            f"feature freshness: not applicable ({f['na']}); `{BENCH_SPEED}` measures it on "
            "a real-time stream"
        )
    return (
        f"feature freshness (readable in Kafka -> visible in Redis, {f['visible']} of "
        f"{f['probes']} probe impressions): p50 {fmt(f['p50_s'], 3)} s, p95 "
        f"{fmt(f['p95_s'], 3)} s, max {fmt(f['max_s'], 3)} s"
    )


def _freshness_html(f: dict) -> str:
    why = (
        "The speed layer's own histogram (<code>ctrstream_speed_feature_freshness_seconds</code>, "
        "now − Kafka timestamp) is not used: the replay's Kafka timestamps are the scenario's "
        "historical, time-compressed event times, so it would measure how old the scenario is. "
        f"<code>{BENCH_SPEED}</code> measures freshness on a real-time stream."
    )
    if f["na"]:
        return (
            '<h3>Feature freshness</h3><p class="freshness-na"><strong>Feature freshness: not '
            f"applicable</strong> in this run: {html.escape(f['na'])}. {why}</p>"
        )
    return (
        "<h3>Feature freshness</h3><p>Wall time from a sampled impression becoming readable in "
        "Kafka to its count being visible in the speed view in Redis "
        "(<code>sv:user:&lt;id&gt;:&lt;day&gt;</code>), measured by the demo on impressions of the stream "
        "itself that are alone in their (user, minute) cell, Redis polled every "
        f"{fmt((f['poll_s'] or 0) * 1000, 3)} ms. The speed layer makes a value visible at its "
        "next flush (every <code>flush_interval_ms</code>). "
        + why
        + "</p>"
        + table_html(f["rows"], cls="freshness")
    )


def _lag_html(rows: list[dict], n: dict) -> str:
    interval = (n.get("lag") or {}).get("interval_s")
    return (
        "<h3>Consumer lag</h3><p>Records appended to a stage's input topics that it had not "
        "read yet (Kafka high watermarks minus the stage's <code>ctrstream_speed_events_in_total"
        "</code>; for the scorer, live impressions in Kafka minus predictions written), sampled "
        f"every {fmt(interval, 3)} s while each replay phase ran. <em>Caught up</em> is how long "
        "after the last replayed record the stage had read everything, i.e. how long it trailed "
        "the replay (– : not within the phase).</p>" + table_html(rows, LAG_COLUMNS, cls="lag")
    )


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:+.{digits}f} %"


def _interval(e: dict, scale: float = 1.0, digits: int = 3) -> str:
    if e is None or e.get("value") is None:
        return "-"
    lo = "-inf" if e.get("lo") is None else f"{e['lo'] * scale:.{digits}f}"
    hi = "inf" if e.get("hi") is None else f"{e['hi'] * scale:.{digits}f}"
    return f"{e['value'] * scale:.{digits}f} [{lo}, {hi}]"


def experiment_rows(doc: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """The experiment's per-arm table, its comparisons and the prediction quality per scorer,
    as rows (estimate with its interval, next to the true value)."""
    arms = []
    for a in doc.get("arms", []):
        m = a.get("metrics", {})
        ctr, rpr = m.get("ctr") or {}, m.get("revenue_per_request") or {}
        arms.append(
            {
                "arm": a["name"] + (" (shadow)" if a.get("shadow") else ""),
                "kind": a["kind"],
                "share": a.get("weight"),
                "users": a["users"],
                "requests": a["requests"],
                "impressions": a["impressions"],
                "clicks": a["clicks"],
                "CTR % [95 %]": "-" if a.get("shadow") else _interval(ctr, 100, 3),
                "true CTR %": None if a.get("shadow") else _scaled(ctr.get("true"), 100),
                "revenue/1k requests [95 %]": "-" if a.get("shadow") else _interval(rpr, 1000, 1),
                "true revenue/1k requests": None
                if a.get("shadow")
                else _scaled(rpr.get("true"), 1000),
                "eCPM": None if a.get("shadow") else (m.get("ecpm") or {}).get("value"),
                "fill rate": None if a.get("shadow") else (m.get("fill_rate") or {}).get("value"),
                "pred/obs": (m.get("calibration") or {}).get("value"),
                "latency p99 ms": a.get("latency_p99_ms"),
                "regret rev/1k req vs oracle": _scaled(a.get("regret_revenue_per_request"), 1000),
            }
        )
    comps = []
    for c in doc.get("comparisons", []):
        comps.append(
            {
                "treatment vs control": f"{c['treatment']} vs {c['control']}",
                "metric": c["metric"],
                "lift [always-valid 95 %]": f"{_pct(c['lift'])} [{_pct(c['lo'])}, {_pct(c['hi'])}]",
                "p (always valid)": c["p_value"],
                "decided": (
                    f"{c['direction']} after {c['decided_elapsed_s'] / 60:.0f} min"
                    if c["decided"] and c.get("decided_elapsed_s") is not None
                    else ("yes" if c["decided"] else "no")
                ),
                "true lift": _pct(c.get("true_lift")),
                "interval covers truth": c.get("covered"),
                "decision right": c.get("right"),
                "MDE now": _pct(c.get("mde")),
            }
        )
    quality = [
        {
            "scorer": name + (" (shadow)" if q.get("shadow") else ""),
            "shown impressions scored": q["impressions"],
            "log loss": q["logloss"],
            "pred/obs": q["predicted_over_observed"],
            "pred/true p": q["predicted_over_true"],
            "RMSE vs true p": q["rmse_vs_true_p"],
        }
        for name, q in (doc.get("prediction_quality") or {}).items()
    ]
    return arms, comps, quality


def _scaled(x: float | None, k: float) -> float | None:
    return None if x is None else x * k


def _experiment_html(n: dict, cfg) -> str:
    doc = n.get("experiment")
    if not doc:
        return (
            "<p><em>the live phase ran open loop (<code>--live open</code>): no experiment</em></p>"
        )
    arms, comps, quality = experiment_rows(doc)
    loop = n.get("loop", {})
    d = next(
        (
            c
            for c in doc["comparisons"]
            if c["treatment"] == "deep" and c["metric"] == doc.get("primary_metric")
        ),
        None,
    )
    decided = [c for c in doc["comparisons"] if c["decided"]]
    plain = []
    if d is not None and not d["decided"]:
        plain.append(
            f"<p><strong>DCN-v2 vs LR is inconclusive, as expected at this volume.</strong> "
            f"The estimate is {_pct(d['lift'])} revenue per request with an always-valid interval "
            f"[{_pct(d['lo'])}, {_pct(d['hi'])}]; the true lift of their decisions was "
            f"{_pct(d.get('true_lift'))}. At {d['users'][0]:,} and {d['users'][1]:,} users a "
            f"fixed-horizon test would detect only lifts of about {_pct(d.get('mde'))} and the "
            "sequential test needs more: a lift of a few percent at a 2 % CTR takes millions "
            "of impressions per arm.</p>"
        )
    if decided:
        items = "".join(
            f"<li>{html.escape(c['treatment'])} vs {html.escape(c['control'])} on "
            f"{html.escape(c['metric'])}: {c['direction']} after "
            f"{(c.get('decided_elapsed_s') or 0) / 60:.0f} min of event time, lift "
            f"{_pct(c['lift'])} (true {_pct(c.get('true_lift'))}); the direction was "
            f"{'right' if c.get('right') else 'wrong'}</li>"
            for c in decided
        )
        plain.append(f"<p>What the sequential test did decide:</p><ul>{items}</ul>")
    else:
        plain.append("<p>No comparison decided in this run.</p>")
    return (
        f"<p>The closed loop ran {_loop_hours(loop, cfg):.2g} h of event time: "
        f"{loop.get('requests', 0):,} ad requests with {cfg.candidates} candidates each, "
        f"{loop.get('impressions', 0):,} impressions, in {loop.get('wall_s', 0):.1f} s of wall "
        f"time ({loop.get('requests_per_s', 0):,.0f} requests/s, "
        f"{loop.get('impressions_per_s', 0):,.0f} impressions/s, event time compressed "
        f"{loop.get('event_time_compression', 0):,.0f}x). Users are split by a salted hash; "
        "each arm's model ranks its users' requests by bid x calibrated pCTR at the top position, "
        "a generalized second-price auction fills the slots, and the world clicks with the true "
        "probability. The true values come from those probabilities (no click noise): only a "
        "simulator knows them. The oracle arm ranks by bid x the true p (the welfare ceiling; "
        "it need not maximise CTR or revenue). See docs/online-experiments.md.</p>"
        + "".join(plain)
        + "<h3>Per arm</h3>"
        + table_html(arms)
        + "<h3>Against the control (sequential test, mSPRT)</h3>"
        + table_html(comps)
        + "<h3>Prediction quality on the shown impressions (the shadow scored every request)</h3>"
        + table_html(quality)
    )


def _loop_hours(loop: dict, cfg) -> float:
    """The closed loop's event hours (the story may end it before ``live_hours``)."""
    if loop.get("ended_ms") is not None and loop.get("started_ms") is not None:
        return (loop["ended_ms"] - loop["started_ms"]) / 3.6e6
    return float(cfg.live_hours)


def _overview_html(st, cfg, n) -> str:
    rows = [
        {"phase": p["phase"], "seconds": p["seconds"], "budget (s)": p.get("budget_s")}
        for p in st.phases
    ]
    if n.get("loop"):
        live = (
            f"From the cut-off on, the live phase is the <em>closed loop</em>: the world sends "
            f"ad requests ({n['loop']['requests']:,} over {_loop_hours(n['loop'], cfg):.2g} h "
            "of event time, "
            f"{cfg.candidates} candidate ads each) and the ad server decides what is shown "
            f"({n['loop']['impressions']:,} impressions) under an online experiment."
        )
    else:
        live = "The rest is replayed live, in lockstep with the streaming scorer."
    return (
        f"<p>Scenario <code>{html.escape(cfg.scenario)}</code>: {n['impressions']:,} impressions and "
        f"{n['clicks']:,} clicks generated over {(n['t_end'] - n['t_start']) / 3.6e6:.1f} hours "
        f"of event time. The first {cfg.history_fraction:.0%} of event time is the "
        f"<em>history</em> the batch layer trains on. {live} Injected by the generator: "
        f"<code>{html.escape(json.dumps(n.get('injected', {})))}</code>.</p>" + table_html(rows)
    )


def _reconcile_html(rec: dict, out: Path) -> str:
    if not rec:
        return "<p><em>no reconciliation ran</em></p>"
    summary = [
        {
            k: rec.get(k)
            for k in (
                "buckets_compared",
                "buckets_equal",
                "buckets_differing",
                "missing_in_speed",
                "missing_in_batch",
                "cells_differing",
                "applied_cells",
            )
        }
    ]
    reasons = [{"reason": k, "cells": v} for k, v in (rec.get("reasons") or {}).items()]
    largest = rec.get("largest") or []
    md = (out / "reconcile.md").read_text() if (out / "reconcile.md").exists() else ""
    return (
        table_html(summary)
        + "<h3>Why they differ</h3>"
        + table_html(reasons)
        + "<h3>Largest differences</h3>"
        + table_html(largest[:15])
        + "<details><summary>full report</summary><pre>"
        + html.escape(md)
        + "</pre></details>"
    )


def _api_html(samples: list) -> str:
    parts = []
    for s in samples:
        resp = s["response"]
        rows = [
            {k: c.get(k) for k in ("rank", "ad_id", "campaign_id", "raw_score", "calibrated_score")}
            for c in resp.get("candidates", [])[:10]
        ]
        parts.append(
            f"<h3>request {html.escape(json.dumps(s['request']))}</h3>"
            f"<p>model {html.escape(str(resp.get('model_name')))} v{html.escape(str(resp.get('model_version')))}, "
            f"calibration {html.escape(str(resp.get('calibration')))}, degraded "
            f"{html.escape(str(resp.get('degraded')))}; server timing "
            f"<code>{html.escape(s.get('server_timing', ''))}</code></p>" + table_html(rows)
        )
    return "".join(parts) or "<p><em>no samples</em></p>"
