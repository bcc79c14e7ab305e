"""The capacity model (bench/capacity_model.py): it computes what docs/capacity.md says, from
the files it names, and a changed input changes the plan."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ctrstream.bench import capacity_model as M

REPO = Path(__file__).resolve().parents[2]


def _write(d: Path, name: str, doc: dict) -> None:
    (d / name).write_text(json.dumps(doc))


def results(tmp: Path, **over: float) -> Path:
    """A results folder with every file the model reads, round numbers chosen by hand."""
    tmp.mkdir(parents=True, exist_ok=True)
    g = lambda k, v: over.get(k, v)  # noqa: E731
    _write(
        tmp,
        "replay.json",
        {
            "meta": {"bytes": 250_000, "records": 1000, "clicks": 20},
            "rows": [{"mode": "produce only", "rec_per_s": 100_000.0}],
        },
    )
    _write(
        tmp,
        "capacity.json",
        {
            "rows": [
                {"row": "kafka produce", "rec_per_s": 1e5, "broker_us_per_record": g("bp", 2.0)},
                {
                    "row": "kafka consume",
                    "rec_per_s": g("consume", 200_000.0),
                    "broker_us_per_record": 1.0,
                },
                {
                    "row": "speed m=1 p=1",
                    "masters": 1,
                    "processes": 1,
                    "events_per_s": g("speed", 50_000.0),
                    "job_us_per_event": g("job", 20.0),
                    "redis_us_per_event": 10.0,
                    "redis_cpu_us_per_event": g("rw", 12.0),
                },
            ]
        },
    )
    _write(
        tmp,
        "api.json",
        {
            "meta": {"candidates": 100},
            "rows": [
                {"rate_rps": 100.0, "cpu_api_ms": 9.0, "cpu_redis_ms": 9.0},
                {"rate_rps": 200.0, "cpu_api_ms": g("api_ms", 3.0), "cpu_redis_ms": 0.6},
                # a cluster step of the API bench: no Redis CPU measured, not used
                {"rate_rps": 400.0, "redis": "cluster", "cpu_api_ms": 1.0},
            ],
        },
    )
    _write(
        tmp,
        "inference.json",
        {
            "meta": {
                "gpu": False,
                "headline": [
                    {
                        "model": "m",
                        "batch": 64,
                        "triton_rows_per_cpu_s": 25_000.0,
                        "triton_best_cpu": "x",
                    }
                ],
            }
        },
    )
    _write(
        tmp,
        "capacity-memory.json",
        {
            "rows": [
                {
                    "view": "speed",
                    "family": "user",
                    "bytes_mean": 300.0,
                    "fields_mean": 10.0,
                    "events_per_hash": 4.0,
                },
                {
                    "view": "speed-fit",
                    "encoding": "listpack",
                    "base_bytes": 100.0,
                    "per_field_bytes": g("lp", 10.0),
                    "hashes": 50,
                },
                {
                    "view": "speed-fit",
                    "encoding": "hashtable",
                    "base_bytes": 200.0,
                    "per_field_bytes": 50.0,
                    "hashes": 50,
                },
                {
                    "view": "batch",
                    "family": "ad",
                    "bytes_per_entity": 1000.0,
                    "keys_per_entity": 5.0,
                },
                {
                    "view": "batch",
                    "family": "user_x_ad",
                    "bytes_per_entity": 500.0,
                    "keys_per_entity": 2.0,
                },
                {
                    "view": "server",
                    "events": 1000,
                    "per_million_events": 1e8,
                    "overhead": 1.25,
                    "listpack_limit": 128,
                },
            ]
        },
    )
    _write(
        tmp,
        "memory.json",
        {
            "device": {"cores": 2},
            "runs": [
                {
                    "command": "ctrstream bench memory ...",
                    "rows": [
                        {
                            "events": 1_000_000,
                            "rows": 1_000_000,
                            "build_s": 50.0,
                            "build_gb": 1.0,
                            "viewbuild_s": 2.0,
                            "viewbuild_gb": 0.5,
                        }
                    ],
                }
            ],
        },
    )
    _write(
        tmp,
        "engines.json",
        {
            "meta": {"spark_master": "local[2]"},
            "rows": [{"engine": "spark local[2]", "rows": 1000, "rows/s": 8000.0}],
        },
    )
    return tmp


def tier(plan: M.Plan, name: str) -> M.Tier:
    return next(t for t in plan.tiers if t.name.startswith(name))


def test_the_tiers_follow_the_stated_rule(tmp_path):
    inputs = M.load_inputs(results(tmp_path))
    a = M.Assumptions()
    p = M.compute(inputs, a)
    u = a.utilization
    # Bytewax: 1M ev/s x 20 us of job CPU per event / 0.6 (one core per process)
    assert tier(p, "Bytewax").units == math.ceil(1e6 * 20e-6 / u)
    # API: 100k req/s x 3 ms CPU (the highest-rate row) / 0.6
    assert tier(p, "Prediction API").units == math.ceil(1e5 * 3e-3 / u)
    # Triton: 10M rows/s over the published per-GPU rate (no GPU run in inference.json)
    assert inputs["triton_gpu_rows"].kind == "published"
    assert tier(p, "Triton").units == math.ceil(1e7 / (M.PUBLISHED_GPU.value * u))
    # Redis CPU shards: (1M x 12 us + 100k x 600 us) / 0.6
    assert p.figures["Redis shards for CPU"] == math.ceil((12.0 + 60.0) / u)
    # Kafka broker CPU per record: RF x produce + groups x consume
    assert p.figures["Kafka broker CPU us/record (RF x produce + groups x consume)"] == (
        a.kafka_replication * 2.0 + a.kafka_consumer_groups * 1.0
    )
    kafka = tier(p, "Kafka")
    assert kafka.units >= a.kafka_replication
    parts = p.figures["Kafka partitions per raw topic"]
    assert parts % kafka.units == 0 and parts >= tier(p, "Bytewax").units
    # Redis memory: per family, the fitted bytes at the expected fields x entities x days
    user = next(m for m in p.memory if m["view"] == "speed" and m["family"] == "user")
    assert user["bytes_per_hash"] == pytest.approx(
        M.speed_hash_bytes(inputs, user["fields_per_hash"])
    )
    assert user["total_gb"] == pytest.approx(
        user["bytes_per_hash"] * a.users_per_day * a.speed_days_held / 1e9
    )
    ad = next(m for m in p.memory if m["view"] == "batch" and m["family"] == "ad")
    assert ad["total_gb"] == pytest.approx(
        1000.0 * a.ads_per_day * a.batch_entities_factor * a.batch_versions_held / 1e9
    )
    total = sum(m["total_gb"] for m in p.memory) * 1.25
    assert p.figures["Redis data GB (speed + batch, x overhead)"] == pytest.approx(total)


@pytest.mark.parametrize(
    "knob, figure",
    [
        ("job", lambda p: tier(p, "Bytewax").units),
        ("rw", lambda p: p.figures["Redis shards for CPU"]),
        ("api_ms", lambda p: tier(p, "Prediction API").units),
        ("lp", lambda p: p.figures["Redis data GB (speed + batch, x overhead)"]),
        ("bp", lambda p: tier(p, "Kafka").cores),
    ],
)
def test_a_changed_input_changes_the_plan(tmp_path, knob, figure):
    base = M.compute(M.load_inputs(results(tmp_path / "a")), M.Assumptions())
    worse = {"job": 80.0, "rw": 60.0, "api_ms": 30.0, "lp": 40.0, "bp": 20.0}[knob]
    changed = M.compute(M.load_inputs(results(tmp_path / "b", **{knob: worse})), M.Assumptions())
    assert figure(changed) > figure(base)


def test_an_assumption_changes_the_plan_and_bad_ones_are_refused(tmp_path):
    inputs = M.load_inputs(results(tmp_path))
    a = M.Assumptions()
    double = a.with_overrides(["events_per_s=2e6"])
    assert double.events_per_s == 2e6
    assert (
        tier(M.compute(inputs, double), "Bytewax").units
        > tier(M.compute(inputs, a), "Bytewax").units
    )
    with pytest.raises(ValueError, match="NAME=VALUE"):
        a.with_overrides(["nonsense=1"])
    with pytest.raises(ValueError, match="not a number"):
        a.with_overrides(["utilization=high"])
    with pytest.raises(ValueError, match="positive"):
        a.with_overrides(["utilization=0"])
    assert a.with_overrides(["batch_cross_share=0"]).batch_cross_share == 0  # a share may be 0


def test_the_sensitivity_table_is_the_plan_with_one_assumption_changed(tmp_path):
    inputs = M.load_inputs(results(tmp_path))
    p = M.compute(inputs, M.Assumptions())
    rows = {x["variant"]: x for x in p.variants}
    assert len(rows) == len(M.VARIANTS)
    base = rows["as planned"]
    assert base["redis_masters"] == tier(p, "Redis Cluster").units
    assert base["machines"] == sum(t.machines for t in p.tiers)
    assert base["redis_data_gb"] == p.figures["Redis data GB (speed + batch, x overhead)"]
    for label, pairs in M.VARIANTS[1:]:
        alone = M.compute(inputs, M.Assumptions().with_overrides(list(pairs)))
        assert rows[label]["machines"] == sum(t.machines for t in alone.tiers)
    assert rows["no user crosses in the batch view"]["redis_data_gb"] < base["redis_data_gb"]
    assert rows["twice the users"]["redis_data_gb"] > base["redis_data_gb"]


def test_a_missing_result_names_the_command_that_writes_it(tmp_path):
    d = results(tmp_path)
    (d / "capacity.json").unlink()
    with pytest.raises(FileNotFoundError, match="ctrstream bench capacity"):
        M.load_inputs(d)


def test_fields_per_day_grow_with_events_up_to_every_bucket_of_the_day():
    from ctrstream import features as F

    slots = sum(F.DAY_MS / r.bucket_ms for r in F.RESOLUTIONS)
    assert M._fields_per_day(1.0) == pytest.approx(len(F.RESOLUTIONS), rel=0.01)
    assert M._fields_per_day(1e7) == pytest.approx(slots)
    assert M._fields_per_day(10) < M._fields_per_day(100) < slots


def test_every_input_is_cited_in_the_rendered_plan(tmp_path):
    p = M.compute(M.load_inputs(results(tmp_path)), M.Assumptions())
    text = M.render_markdown(p, "ctrstream bench capacity --plan")
    for name, f in p.inputs.items():
        assert name in text and f.source in text
    doc = f"intro\n{M.BEGIN}\nold\n{M.END}\nafter\n"
    new = M.replace_section(doc, text)
    assert new.startswith("intro\n") and new.endswith(f"{M.END}\nafter\n") and text in new
    with pytest.raises(ValueError, match="generated section"):
        M.replace_section("no markers", text)


def test_the_doc_says_what_the_model_computes_from_the_committed_results():
    """docs/capacity.md's generated section is the model's output on bench/results/ (rerun
    `ctrstream bench capacity --plan --doc docs/capacity.md` after any of them changes)."""
    doc = (REPO / "docs" / "capacity.md").read_text()
    inputs = M.load_inputs(REPO / "bench" / "results")
    text = M.render_markdown(M.compute(inputs, M.Assumptions()), "ctrstream bench capacity --plan")
    assert M.replace_section(doc, text) == doc
