"""The demo's terminal summary and ``report.html`` (see ``ctrstream.demo``)."""

from __future__ import annotations

import html
import json
import shutil
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from ctrstream.report import (bar_png, fmt, img_html, lambda_svg, reliability_png, series_png,
                              table_html, write_report)


def _calibration_stats(p: np.ndarray, y: np.ndarray, bins: int = 20) -> dict:
    from models.evaluation import metrics

    m = metrics(p, y, n_bins=bins)
    return {"mean_pred": float(np.mean(p)), "observed": float(np.mean(y)),
            "ratio": float(np.mean(p) / max(np.mean(y), 1e-12)), **{k: m[k] for k in m
                                                                  if k in ("ece", "log_loss", "ne", "auc")}}


def _quality(m: dict) -> dict:
    return {"log_loss": m.get("log_loss"), "NE": m.get("ne"), "AUC": m.get("auc"),
            "pred/obs": m.get("calibration"), "ECE": m.get("ece")}


def _live_outcomes(st, tr):
    """Predictions of the live stream joined with their labels and the oracle."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from streaming.events import decode_labeled, decode_prediction
    from streaming.speed_reference import read_topic

    preds = [decode_prediction(r.value) for r in read_topic(st.settings, st.settings.topics.predictions.name, 120)]
    labels = {}
    for r in read_topic(st.settings, st.settings.topics.labeled.name, 120):
        lab = decode_labeled(r.value)
        labels[lab.impression.impression_id] = lab.clicked
    rows = [(p.impression_id, p.event_time_ms, p.raw_score, p.calibrated_score, p.degraded,
             labels[p.impression_id]) for p in preds if p.impression_id in labels]
    if not rows:
        return None
    ids, t, raw, cal, deg, y = map(np.asarray, zip(*rows))
    idx = pc.index_in(pa.array(ids, type=pa.string()),
                      value_set=tr.oracle.column("impression_id").combine_chunks())
    oracle = tr.oracle.column("p_click").combine_chunks().take(idx).to_numpy(zero_copy_only=False)
    order = np.argsort(t, kind="stable")
    return {"t": t[order], "raw": raw[order].astype(float), "cal": cal[order].astype(float),
            "degraded": deg[order].astype(bool), "y": y[order].astype(float),
            "oracle": np.nan_to_num(oracle[order].astype(float)), "n_predictions": len(preds)}


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


def build_report(st, tr, cfg) -> Path:
    from rich.console import Console

    console = Console()
    out = st.out
    n = st.numbers
    plots: list[tuple[str, Path]] = []
    # ---------------------------------------------------------------- throughput
    m = n.get("metrics", {})
    speed_in = m.get("speed-features", {}).get("ctrstream_speed_events_in_total", 0)
    speed_rate = speed_in / max(n.get("speed_history_seconds", 0) + n.get("score_seconds", 0), 1e-9)
    fresh_sum = m.get("speed-features", {}).get("ctrstream_speed_feature_freshness_seconds_sum")
    fresh_cnt = m.get("speed-features", {}).get("ctrstream_speed_feature_freshness_seconds_count")
    throughput = [
        {"stage": "replay (history)", "events": n["replay_history"]["sent"],
         "seconds": n["replay_history"]["seconds"], "events/s": n["replay_history"]["rate"]},
        {"stage": "replay (live)", "events": n["replay_live"]["sent"],
         "seconds": n["replay_live"]["seconds"], "events/s": n["replay_live"]["rate"]},
        {"stage": "speed layer (incl. waiting for replay)", "events": int(speed_in),
         "seconds": n.get("speed_history_seconds", 0) + n.get("score_seconds", 0),
         "events/s": speed_rate},
        {"stage": "scorer (live, incl. waiting for replay)", "events": n.get("predictions", 0),
         "seconds": n.get("score_seconds", 0),
         "events/s": n.get("predictions", 0) / max(n.get("score_seconds", 0), 1e-9)},
    ]
    plots.append(("Throughput of each stage (events/s, wall time incl. waiting for the replay)",
                  bar_png(out / "throughput.png", [r["stage"] for r in throughput],
                          [r["events/s"] for r in throughput], "stage throughput", "events/s")))
    freshness = {"mean_s": fresh_sum / fresh_cnt if fresh_cnt else None}
    # ---------------------------------------------------------------- model quality
    quality = []
    training = n["training"]
    oracle_row = None
    for kind, mm in training["models"].items():
        ev = mm["evaluation"]
        quality.append({"model": f"ctr_{kind}", **_quality(ev["model"]),
                        "train s": mm["train_seconds"]})
        oracle_row = ev.get("oracle") or oracle_row
    if oracle_row:
        quality.append({"model": "oracle (true p, the ceiling)", **_quality(oracle_row)})
    rel = Path(training["dir"]) / "reliability.png"
    if rel.exists():
        shutil.copy(rel, out / "reliability_validation.png")
        plots.append(("Reliability on the validation slice (batch layer)", out / "reliability_validation.png"))
    # ---------------------------------------------------------------- calibration
    live = _live_outcomes(st, tr)
    calib = {}
    if live is not None:
        ok = ~live["degraded"]
        half = len(live["t"]) // 2
        calib = {
            "raw (Triton)": _calibration_stats(live["raw"][ok], live["y"][ok]),
            "calibrated (River)": _calibration_stats(live["cal"][ok], live["y"][ok]),
            "calibrated, second half": _calibration_stats(live["cal"][half:][ok[half:]],
                                                          live["y"][half:][ok[half:]]),
            "oracle": _calibration_stats(live["oracle"], live["y"]),
        }
        plots.append(("Reliability of the live stream before and after River calibration",
                      reliability_png(out / "reliability_live.png",
                                      {"raw (Triton)": (live["raw"][ok], live["y"][ok]),
                                       "calibrated (River)": (live["cal"][ok], live["y"][ok]),
                                       "oracle": (live["oracle"], live["y"])},
                                      "live stream: before / after calibration")))
        ot = _over_time(live)
        drift_t = tr.meta.get("drift_time_ms")
        vline = (drift_t - live["t"].min()) / 60_000.0 if drift_t and drift_t >= live["t"].min() else None
        plots.append(("Calibration over time (mean predicted / observed CTR per event-time window)",
                      series_png(out / "calibration_over_time.png",
                                 {"raw": (ot["minutes"], ot["raw"]), "calibrated": (ot["minutes"], ot["cal"]),
                                  "oracle": (ot["minutes"], ot["oracle"])},
                                 "calibration through the live stream", "event-time minutes into the live stream",
                                 "mean predicted / observed", vline, "drift")))
        n["degraded"] = int(live["degraded"].sum())
    # ---------------------------------------------------------------- reconciliation
    rec = n.get("reconcile", {})
    # ---------------------------------------------------------------- the diagram numbers
    deep = training["models"].get("deep", {}).get("evaluation", {})
    pub = n.get("published", {}).get("deep", {})
    numbers = {
        "impressions": n["impressions"], "clicks": n["clicks"],
        "replay_rate": n["replay_history"]["rate"], "partitions": n["partitions"],
        "speed_events": speed_in, "speed_rate": speed_rate,
        "dlq": m.get("speed-features", {}).get("ctrstream_speed_dlq_total"),
        "late": m.get("speed-features", {}).get("ctrstream_speed_late_total"),
        "speed_keys": n.get("speed_keys"), "labeled": m.get("speed-join", {}).get("ctrstream_speed_labeled_total"),
        "archived": sum((n.get("archive", {}).get("records") or {}).values()),
        "train_rows": n.get("train_rows"), "batch_version": n.get("batch_view", {}).get("version"),
        "batch_cutoff": time.strftime("%H:%M", time.gmtime(n["t_split"] / 1000)),
        "deep_ne": deep.get("model", {}).get("ne"), "oracle_ne": (deep.get("oracle") or {}).get("ne"),
        "model_name": pub.get("model_name"), "model_version": pub.get("version"),
        "predictions": n.get("predictions"), "degraded": n.get("degraded"),
        "score_rate": throughput[3]["events/s"],
        "calibration_pairs": m.get("calibrate", {}).get("ctrstream_calibration_joined_total"),
        "ratio_before": calib.get("raw (Triton)", {}).get("ratio"),
        "ratio_after": calib.get("calibrated (River)", {}).get("ratio"),
        "rec_compared": rec.get("buckets_compared"), "rec_differing": rec.get("buckets_differing"),
        "rec_explained": "all" if rec.get("explained") else "not all",
    }
    # ---------------------------------------------------------------- terminal summary
    t = Table(title=f"ctrstream demo {st.run_id}: {n['impressions']:,} impressions, "
                    f"{n['total_seconds']:.0f} s")
    t.add_column("phase"), t.add_column("seconds", justify="right")
    for p in st.phases:
        t.add_row(p["phase"], f"{p['seconds']:.1f}")
    console.print(t)
    for title, rows in (("throughput", throughput), ("model quality (validation, vs the oracle)", quality),
                        ("calibration on the live stream", [{"scores": k, **v} for k, v in calib.items()])):
        tt = Table(title=title)
        if rows:
            cols = list(rows[0].keys())
            for c in cols:
                tt.add_column(c, justify="right")
            for r in rows:
                tt.add_row(*[fmt(r.get(c)) for c in cols])
            console.print(tt)
    console.print(f"reconciliation: {rec.get('buckets_compared')} buckets compared, "
                  f"{rec.get('buckets_equal')} equal, {rec.get('buckets_differing')} differing, "
                  f"{rec.get('missing_in_speed')} missing in the speed view; reasons {rec.get('reasons')}")
    # ---------------------------------------------------------------- HTML
    sections = [
        ("overview", "What ran", _overview_html(st, cfg, n)),
        ("architecture", "The lambda architecture, with this run's numbers",
         lambda_svg(numbers) + "<p>Follow one event: it is produced to Kafka (top), counted by the "
         "speed layer into Redis within a flush interval, archived into Parquet by the batch layer, "
         "recomputed exactly into point-in-time training features and the batch view, and finally "
         "served through the lambda merge and Triton, calibrated by River. See docs/lambda.md.</p>"),
        ("throughput", "Throughput and lag",
         table_html(throughput) + f"<p>Speed-layer feature freshness (event appended to Kafka → value "
         f"in Redis, mean over the run): {fmt(freshness['mean_s'])} s.</p>"
         + "".join(img_html(p, a) for a, p in plots if p.name == "throughput.png")),
        ("quality", "Model quality next to the oracle",
         "<p>The oracle column is the Bayes-optimal ceiling: the generator's true click "
         "probabilities on the same validation rows. NE = log loss / entropy of the background CTR "
         "(lower is better).</p>" + table_html(quality)
         + "".join(img_html(p, a) for a, p in plots if p.name == "reliability_validation.png")),
        ("calibration", "Online calibration with River",
         table_html([{"scores": k, **v} for k, v in calib.items()])
         + "".join(img_html(p, a) for a, p in plots if p.name in ("reliability_live.png",
                                                                  "calibration_over_time.png"))),
        ("reconciliation", "Reconciliation: what the speed layer got right, what it missed, and why",
         _reconcile_html(rec, out)),
        ("api", "Sample ad requests through the prediction API", _api_html(n.get("api_samples", []))),
    ]
    (out / "summary.json").write_text(json.dumps({"numbers": numbers, "phases": st.phases,
                                                  "throughput": throughput, "quality": quality,
                                                  "calibration": calib}, indent=2, default=str))
    return write_report(out, sections, f"ctrstream demo — run {st.run_id}",
                        f"scenario {cfg.scenario}, {n['impressions']:,} impressions, seed {cfg.seed}; "
                        f"finished in {n['total_seconds']:.0f} s")


def _overview_html(st, cfg, n) -> str:
    rows = [{"phase": p["phase"], "seconds": p["seconds"]} for p in st.phases]
    return (f"<p>Scenario <code>{html.escape(cfg.scenario)}</code>: {n['impressions']:,} impressions and "
            f"{n['clicks']:,} clicks over {(n['t_end'] - n['t_start']) / 3.6e6:.1f} hours of event "
            f"time. The first {cfg.history_fraction:.0%} of event time is the <em>history</em> the batch "
            f"layer trains on; the rest is scored live. Injected by the generator: "
            f"<code>{html.escape(json.dumps(n.get('injected', {})))}</code>.</p>" + table_html(rows))


def _reconcile_html(rec: dict, out: Path) -> str:
    if not rec:
        return "<p><em>no reconciliation ran</em></p>"
    summary = [{k: rec.get(k) for k in ("buckets_compared", "buckets_equal", "buckets_differing",
                                        "missing_in_speed", "missing_in_batch", "cells_differing",
                                        "applied_cells")}]
    reasons = [{"reason": k, "cells": v} for k, v in (rec.get("reasons") or {}).items()]
    largest = rec.get("largest") or []
    md = (out / "reconcile.md").read_text() if (out / "reconcile.md").exists() else ""
    return (table_html(summary) + "<h3>Why they differ</h3>" + table_html(reasons)
            + "<h3>Largest differences</h3>" + table_html(largest[:15])
            + "<details><summary>full report</summary><pre>" + html.escape(md) + "</pre></details>")


def _api_html(samples: list) -> str:
    parts = []
    for s in samples:
        resp = s["response"]
        rows = [{k: c.get(k) for k in ("rank", "ad_id", "campaign_id", "raw_score", "calibrated_score")}
                for c in resp.get("candidates", [])[:10]]
        parts.append(f"<h3>request {html.escape(json.dumps(s['request']))}</h3>"
                     f"<p>model {html.escape(str(resp.get('model_name')))} v{html.escape(str(resp.get('model_version')))}, "
                     f"calibration {html.escape(str(resp.get('calibration')))}, degraded "
                     f"{html.escape(str(resp.get('degraded')))}; server timing "
                     f"<code>{html.escape(s.get('server_timing', ''))}</code></p>" + table_html(rows))
    return "".join(parts) or "<p><em>no samples</em></p>"
