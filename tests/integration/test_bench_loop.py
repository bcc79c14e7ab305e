"""Smoke test of ``ctrstream bench loop`` against the test stack at a tiny volume: the
lockstep row (a real ``ctrstream score`` subprocess), a closed-loop row of the demo's
experiment and a lean one; checks the JSON's fields and that the benchmark leaves no
topic and no experiment behind."""

from __future__ import annotations

import json

from ctrstream.bench import loop as bench_loop
from ctrstream.kafka.clients import admin
from ctrstream.loop import session
from ctrstream.stack.services import wait_until


def test_bench_loop_smoke(settings, tmp_path):
    argv = [
        "--impressions",
        "600",
        "--candidates",
        "8",
        "--lean-candidates",
        "8",
        "--out",
        str(tmp_path),
        "--name",
        "loop_smoke",
    ]
    assert bench_loop.main(argv, settings=settings) == 0

    doc = json.loads((tmp_path / "loop_smoke.json").read_text())
    assert (tmp_path / "loop_smoke.png").stat().st_size > 0
    meta, rows = doc["meta"], doc["rows"]
    assert meta["models"]["kind"].startswith("random weights")
    assert meta["candidates"] == [8] and meta["impressions_target"] == 600
    assert [r["mode"] for r in rows] == ["lockstep", "closed c=8", "closed c=8 lean"]
    lock, closed, lean = rows
    assert lock["impressions"] == 600 and lock["vs_lockstep"] == 1.0
    assert 0 <= lock["scorer_wait_share"] <= 1 and lock["triton_rows"] >= 600
    for r in (closed, lean):
        # a closed-loop row stops at the first step that reaches the lockstep row's volume
        assert r["impressions"] >= 600 and r["requests"] > 0
        assert r["impressions_per_s"] > 0 and r["requests_per_s"] > 0
        assert r["vs_lockstep"] == r["impressions_per_s"] / lock["impressions_per_s"]
        # the loop's own stages, and the ad server's inside its decide stage
        loop_stages = {k for k in r["stage_s"] if not k.startswith("adserver.")}
        assert loop_stages == set(bench_loop.STAGES)
        assert {f"adserver.{k}" for k in bench_loop.AD_SERVER} <= set(r["stage_s"])
        assert 0 < r["decide_share"] < 1
        assert sum(r[f"{k}_share"] for k in bench_loop.STAGES) <= 1.0 + 1e-9
        # inside the ad server: its own timings add up to at most its stage (which the
        # loop's summary rounds to 10 ms)
        assert set(r["ad_server_s"]) == set(bench_loop.AD_SERVER)
        assert r["features_share"] > 0 and r["score_share"] > 0
        inside = sum(r[f"{k}_share"] for k in bench_loop.AD_SERVER)
        assert inside <= r["decide_share"] + 0.006 / r["seconds"]
        assert r["triton_rows"] > r["impressions"]  # every candidate is scored
    assert closed["shadows_share"] > 0 and lean["shadows_share"] < closed["shadows_share"] / 10
    assert (
        meta["headline"]["closed_over_lockstep_impressions_per_s"]["closed c=8"]
        == (closed["vs_lockstep"])
    )
    # nothing left behind: the throw-away topics (deletion is asynchronous in the broker's
    # metadata: polled) and the experiments
    wait_until(
        lambda: (
            not [
                t
                for t in admin(settings).list_topics(timeout=10).topics
                if t.startswith("bench-loop-")
            ]
        ),
        30,
        what="the benchmark's topics to be deleted",
    )
    names = [r.experiment.name for r in session.registry(settings).list()]
    assert not [n for n in names if n.startswith("bench-loop-")]
