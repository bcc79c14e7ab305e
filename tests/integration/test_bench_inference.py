"""Smoke test of ``ctrstream bench inference`` against the test stack's Triton: one tiny
synthetic DCNv2, a 2x2 grid (batch x concurrency), dynamic batching on/off, gRPC and system
shared memory; checks the JSON, the ratios and that the benchmark leaves no model behind."""

from __future__ import annotations

import json

from ctrstream.bench import inference
from ctrstream.bench.inference_models import BENCH_PREFIX, variant_config


def test_variant_config_toggles_dynamic_batching():
    on = variant_config("m", "python", True, 10, 96, 8192, 2, 500)
    off = variant_config("m", "python", False, 10, 96, 8192, 2, 500)
    assert "dynamic_batching" in on and "max_queue_delay_microseconds: 500" in on
    assert "dynamic_batching" not in off and "preferred_batch_size" not in off
    assert 'key: "intra_op_threads" value: { string_value: "2" }' in off
    assert off.count("{") == off.count("}")


def test_bench_inference_smoke(settings, tmp_path):
    argv = [
        "--no-published",
        "--sizes",
        "1M",
        "--mlp",
        "32",
        "--batch-sizes",
        "1,8",
        "--concurrency",
        "1,2",
        "--duration",
        "0.2",
        "--warmup",
        "0.05",
        "--out-dir",
        str(tmp_path),
        "--name",
        "inference_smoke",
    ]
    assert inference.main(argv, settings=settings) == 0

    doc = json.loads((tmp_path / "inference_smoke.json").read_text())
    assert (tmp_path / "inference_smoke.png").stat().st_size > 0
    assert doc["device"]["cores"] >= 1
    rows = doc["rows"]
    # 1 model x 2 batch sizes x 2 concurrencies x (in-process + 2 dyn-batching x 2 transports)
    assert len(rows) == 2 * 2 * (1 + 2 * 2)
    assert {r["transport"] for r in rows} == {"-", "grpc", "system_shm"}
    assert {r["dyn_batching"] for r in rows} == {None, True, False}
    for r in rows:
        assert r["device"] and r["requests"] > 0 and r["rows_per_s"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["rows_per_cpu_s"] > 0 and 0 <= r["other_cpu_pct"] <= 100.5
        if r["path"] == "in-process":
            assert r["ratio_vs_inprocess"] is None and r["cpu_eff_vs_inprocess"] is None
        else:
            assert r["path"] == "triton-python" and r["ratio_vs_inprocess"] > 0
            assert r["server_cpu_s"] > 0 and r["cpu_eff_vs_inprocess"] > 0
    head = doc["meta"]["headline"]
    assert [h["batch"] for h in head] == [1, 8]
    for h in head:
        want = h["triton_rows_per_s"] / h["inprocess_rows_per_s"]
        assert abs(h["ratio"] - want) <= 1e-3 * want + 1e-3
        assert h["cpu_ratio"] > 0
    # no GPU here: the floor section says it was skipped
    if not doc["meta"]["gpu"]:
        assert "skipped" in doc["meta"]["hardware_floor"]
    # the benchmark's models are unloaded and removed from the repository
    repo = settings.triton.model_repository
    assert not [p for p in repo.iterdir() if p.name.startswith(BENCH_PREFIX)]
