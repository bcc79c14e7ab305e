"""The prediction API: ranking, degraded answers, strict validation, health, metrics, CLI."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from ctrstream import features as F
from ctrstream.bench.api import write_demo_model
from ctrstream.models.publish import control_client
from ctrstream.serving.api import create_app
from ctrstream.serving.assembly import assemble, request_columns
from ctrstream.stack.procs import start_job, stop_job, wait_until
from ctrstream.stack.services import free_port
from ctrstream.store.connection import redis_client
from ctrstream.store.reader import FeatureStore
from ctrstream.store.speed_view import SpeedCells, SpeedViewWriter

W = np.linspace(-0.2, 0.3, F.N_DENSE).astype(np.float32)
BIAS = -3.0
MODEL = "api_demo_py"


@pytest.fixture(scope="module")
def model(settings):
    write_demo_model(settings.triton.model_repository, MODEL, version=1, weights=W, bias=BIAS)
    client = control_client(settings)  # model control needs the stack's key
    client.load_model(MODEL)
    yield MODEL
    try:
        client.unload_model(MODEL)
    finally:
        client.close()


@pytest.fixture(scope="module")
def api(settings, model):
    with TestClient(create_app(settings, model_name=model)) as client:
        yield client


@pytest.fixture
def body(settings):
    """A request whose ads have different speed-view histories (so the ranking is real)."""
    base = 7_000_000 + uuid.uuid4().int % 10**6 * 100
    now = int(time.time() * 1000)
    k = np.arange(5)
    res = F.RESOLUTIONS[1]
    with SpeedViewWriter(settings) as writer:  # absolute counts, as the speed layer writes them
        writer.write(
            [
                SpeedCells(
                    F.ENTITIES.index(F.ENTITY_BY_NAME["ad"]),
                    [base + k],
                    np.full(5, F.RESOLUTIONS.index(res)),
                    np.full(5, now // res.bucket_ms - 1),
                    50 * (k + 1),
                    3 * k * k,
                    np.zeros(5, bool),
                )
            ]
        )
    return {
        "user_id": base + 99,
        "context": {
            "site_id": base + 98,
            "device_type": "mobile",
            "country": "US",
            "position": 1,
            "event_time_ms": now,
        },
        "candidates": [
            {
                "ad_id": base + k,
                "campaign_id": base + 10 + k % 2,
                "advertiser_id": base + 20,
                "ad_category": 3,
            }
            for k in range(5)
        ],
    }


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_predict_ranks_candidates_by_calibrated_score(api, settings, body):
    resp = api.post("/v1/predict", json=body)
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["degraded"] is False and doc["degraded_reasons"] == []
    assert doc["model_name"] == MODEL and doc["model_version"] == "1"
    cands = doc["candidates"]
    assert [c["rank"] for c in cands] == [1, 2, 3, 4, 5]
    cal = [c["calibrated_score"] for c in cands]
    assert cal == sorted(cal, reverse=True)
    assert sorted(c["ad_id"] for c in cands) == sorted(c["ad_id"] for c in body["candidates"])
    # the raw scores are the model of exactly the assembled features
    t = body["context"]["event_time_ms"]
    cols = request_columns(body["user_id"], body["context"], body["candidates"], t)
    asm = assemble(FeatureStore(redis_client(settings)), cols, t)
    want = dict(
        zip(
            [c["ad_id"] for c in body["candidates"]],
            _sigmoid(asm.dense.astype(np.float64) @ W + BIAS),
        )
    )
    for c in cands:
        assert c["raw_score"] == pytest.approx(want[c["ad_id"]], rel=1e-5)
        if doc["calibration"] == "none":
            assert c["calibrated_score"] == c["raw_score"]
    assert len({round(c["raw_score"], 9) for c in cands}) == 5  # histories differ -> scores differ
    assert doc["newest_bucket_ms"] is not None and doc["feature_staleness_ms"] >= 0
    timing = resp.headers["server-timing"]
    for stage in ("redis", "assembly", "triton", "calibration", "handler", "app"):
        assert f"{stage};dur=" in timing


def test_predict_applies_the_calibrator_of_its_model_name_and_version(settings, model, body):
    """The API calibrates with its own model's calibrator (base name + version), not with
    another model's of the same version number."""
    import redis

    from ctrstream.store import layout as L
    from ctrstream.store.calibration import CalibrationStore

    def platt(intercept: float) -> dict:
        return {
            "method": "platt",
            "platt": {
                "intercept": intercept,
                "w_logit": 1.0,
                "context": {},
                "context_names": [],
                "context_mean": {},
            },
        }

    own = L.calibrator_id(MODEL.removesuffix("_py"), "1")
    other = L.calibrator_id(f"other{uuid.uuid4().hex[:6]}", "1")
    r = redis.Redis.from_url(settings.redis.url)
    store = CalibrationStore(r)
    try:
        store.publish_params(other, platt(+2.0))  # another model's v1: never applied here
        store.publish_params(own, platt(-1.0))
        with TestClient(create_app(settings, model_name=model)) as client:
            doc = client.post("/v1/predict", json=body).json()
        assert doc["calibration"] == "river" and doc["model_version"] == "1"
        for c in doc["candidates"]:
            z = np.log(c["raw_score"] / (1 - c["raw_score"]))
            assert c["calibrated_score"] == pytest.approx(_sigmoid(z - 1.0), rel=1e-5)
    finally:
        r.delete(L.cal_key(own), L.cal_key(other))
        store.announce()
        r.close()


def test_event_time_defaults_to_now(api, body):
    del body["context"]["event_time_ms"]
    before = int(time.time() * 1000)
    doc = api.post("/v1/predict", json=body).json()
    assert before <= doc["event_time_ms"] <= int(time.time() * 1000)


def test_500_candidates_are_accepted(api, body):
    c = body["candidates"][0]
    body["candidates"] = [{**c, "ad_id": c["ad_id"] + k} for k in range(500)]
    resp = api.post("/v1/predict", json=body)
    assert resp.status_code == 200 and len(resp.json()["candidates"]) == 500


def _bad_bodies(good: dict):
    def with_(path, value):
        doc = json.loads(json.dumps(good))
        node = doc
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        return doc

    def without(path):
        doc = json.loads(json.dumps(good))
        node = doc
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
        return doc

    cand = good["candidates"][0]
    return [
        ("not json", b"{not json", "json"),
        ("empty body", b"", None),
        ("array", b"[]", None),
        ("string user", with_(["user_id"], "17"), "user_id"),
        # 17.0 is an integer in JSON Schema and accepted (test_api_contract.py); 17.5 is not
        ("float user", with_(["user_id"], 17.5), "user_id"),
        ("float candidate id", with_(["candidates", 0, "ad_id"], 4.25), "candidates.0.ad_id"),
        ("bool user", with_(["user_id"], True), "user_id"),
        ("null user", with_(["user_id"], None), "user_id"),
        ("negative id", with_(["candidates", 0, "ad_id"], -1), "candidates.0.ad_id"),
        ("huge id", with_(["user_id"], 10**30), "user_id"),
        ("huge time", with_(["context", "event_time_ms"], 10**20), "event_time_ms"),
        ("zero time", with_(["context", "event_time_ms"], 0), "event_time_ms"),
        ("missing user", without(["user_id"]), "user_id"),
        ("missing context", without(["context"]), "context"),
        ("missing site", without(["context", "site_id"]), "site_id"),
        ("missing ad field", without(["candidates", 0, "campaign_id"]), "campaign_id"),
        ("unknown field", with_(["extra"], 1), "extra"),
        ("unknown context field", with_(["context", "browser"], "x"), "browser"),
        ("unknown candidate field", with_(["candidates", 0, "bid"], 1.5), "bid"),
        ("bad device", with_(["context", "device_type"], "fridge"), "device_type"),
        ("bad country", with_(["context", "country"], "U S;"), "country"),
        ("long country", with_(["context", "country"], "X" * 1000), "country"),
        ("0 candidates", with_(["candidates"], []), "candidates"),
        ("501 candidates", with_(["candidates"], [cand] * 501), "candidates"),
        ("candidates not list", with_(["candidates"], cand), "candidates"),
        ("candidate not object", with_(["candidates"], [1, 2]), "candidates"),
        ("context not object", with_(["context"], "mobile"), "context"),
        (
            "nan position",
            b'{"user_id": 1, "context": {"site_id": 1, "device_type": "mobile", '
            b'"country": "US", "position": NaN}, "candidates": []}',
            "position",
        ),
        ("inf", b'{"user_id": 1e999}', "user_id"),
        ("huge position", with_(["context", "position"], 10**6), "position"),
    ]


def test_bad_requests_get_a_precise_4xx_never_a_500(api, body):
    for label, bad, where in _bad_bodies(body):
        if isinstance(bad, bytes):
            resp = api.post(
                "/v1/predict", content=bad, headers={"content-type": "application/json"}
            )
        else:
            resp = api.post("/v1/predict", json=bad)
        assert 400 <= resp.status_code < 500, (label, resp.status_code, resp.text)
        if where:
            assert where in resp.text, (label, resp.text)
    assert api.get("/v1/predict").status_code == 405
    assert api.post(
        "/v1/predict", content=b"user_id=1", headers={"content-type": "text/plain"}
    ).status_code in (415, 422)
    # and the service still answers
    assert api.post("/v1/predict", json=body).status_code == 200


def test_oversized_body_is_a_413(api, body):
    from ctrstream.serving.api import MAX_BODY_BYTES

    big = b'{"user_id": 1, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    resp = api.post("/v1/predict", content=big, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "larger than" in resp.json()["detail"]


def test_fast_path_and_fastapi_route_answer_the_same(api, body):
    """``_App`` hands POST /v1/predict to the raw-ASGI handler; the FastAPI route (OpenAPI,
    embedded use) runs the same handler: same answer, same timing header, same errors."""
    fast = api.post("/v1/predict", json=body)
    fast_bad = api.post("/v1/predict", json={**body, "extra": 1})
    app = api.app
    saved, app.predict_asgi = app.predict_asgi, None
    try:
        slow = api.post("/v1/predict", json=body)
        slow_bad = api.post("/v1/predict", json={**body, "extra": 1})
    finally:
        app.predict_asgi = saved
    assert fast.status_code == slow.status_code == 200
    strip = {"feature_staleness_ms", "feature_cache_staleness_ms"}  # time-dependent
    assert {k: v for k, v in fast.json().items() if k not in strip} == {
        k: v for k, v in slow.json().items() if k not in strip
    }
    assert "handler;dur=" in slow.headers["server-timing"]
    # only the fast path measures the whole app (it is the outermost layer)
    assert (
        "app;dur=" in fast.headers["server-timing"]
        and "app;dur=" not in slow.headers["server-timing"]
    )
    assert fast_bad.status_code == slow_bad.status_code == 422
    assert fast_bad.json() == slow_bad.json() and "extra" in fast_bad.text


def test_health_ready_metrics_and_openapi(api, body):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"] is True
    api.post("/v1/predict", json=body)
    metrics = api.get("/metrics").text
    assert 'ctrstream_api_stage_seconds_count{stage="triton"}' in metrics
    assert 'ctrstream_api_requests_total{outcome="invalid"}' in metrics
    spec = api.get("/openapi.json").json()
    assert "/v1/predict" in spec["paths"]
    assert spec["components"]["schemas"]["PredictRequest"]["additionalProperties"] is False


def test_shared_entity_cache_is_bounded_by_the_flush_interval_and_measured(settings, model, body):
    """The API reuses counts of entities that do not involve the user for at most the speed
    layer's flush interval (the default), says how old the oldest reused entry was, and counts
    hits and misses on /metrics. A longer TTL is refused."""
    with pytest.raises(ValueError, match="flush interval"):
        create_app(
            settings, model_name=model, feature_cache_s=settings.flush_interval_ms / 1000 + 0.001
        )
    with TestClient(create_app(settings, model_name=model)) as client:
        store = client.app.state.ctr["store"]
        assert store.cache_ttl_s == settings.flush_interval_ms / 1000
        first = client.post("/v1/predict", json=body).json()
        second = client.post("/v1/predict", json=body).json()
        metrics = client.get("/metrics").text
    assert first["feature_cache_staleness_ms"] is None  # nothing cached yet: everything read now
    assert [c["raw_score"] for c in second["candidates"]] == [
        c["raw_score"] for c in first["candidates"]
    ]
    if second["feature_cache_staleness_ms"] is not None:  # the second request came within the TTL
        assert 0 <= second["feature_cache_staleness_ms"] < settings.flush_interval_ms
    assert 'ctrstream_api_feature_cache_total{result="miss"}' in metrics
    with TestClient(create_app(settings, model_name=model, feature_cache_s=0)) as client:
        doc = client.post("/v1/predict", json=body).json()
        assert (
            doc["feature_cache_staleness_ms"] is None
            and client.app.state.ctr["store"].cache_ttl_s == 0
        )


def test_non_json_content_type_is_a_415_and_the_body_schema_is_documented(api, body):
    resp = api.post("/v1/predict", content=json.dumps(body), headers={"content-type": "text/plain"})
    assert resp.status_code == 415 and "application/json" in resp.json()["detail"]
    ok = api.post(
        "/v1/predict",
        content=json.dumps(body),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200
    spec = api.get("/openapi.json").json()
    ref = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert ref == {"$ref": "#/components/schemas/PredictRequest"}
    assert {"Context", "Candidate", "PredictResponse"} <= set(spec["components"]["schemas"])


def test_triton_down_gives_a_degraded_fallback_answer(settings, body):
    dead = settings.model_copy(
        update={
            "triton": settings.triton.model_copy(
                update={"grpc_port": free_port(), "timeout_s": 0.3}
            )
        }
    )
    with TestClient(create_app(dead, model_name=MODEL)) as client:
        resp = client.post("/v1/predict", json=body)
        assert client.get("/readyz").status_code == 503
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["degraded"] is True and any(
        "model unavailable" in r for r in doc["degraded_reasons"]
    )
    assert doc["model_version"] == "" and doc["calibration"] == "none"
    # the fallback is the ad's smoothed historical CTR: the 1h window of each seeded ad
    ads = {c["ad_id"]: c for c in doc["candidates"]}
    for k, cand in enumerate(body["candidates"]):
        want = (3 * k * k + F.PRIOR.alpha) / (50 * (k + 1) + F.PRIOR.strength)
        assert ads[cand["ad_id"]]["raw_score"] == pytest.approx(want, rel=1e-5)
    assert [c["ad_id"] for c in doc["candidates"]][0] == body["candidates"][4]["ad_id"]


def test_redis_down_gives_a_degraded_answer_from_the_prior_features(settings, model, body):
    dead = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"port": free_port()})}
    )
    with TestClient(create_app(dead, model_name=model)) as client:
        resp = client.post("/v1/predict", json=body)
        ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["redis"] is False
    doc = resp.json()
    assert resp.status_code == 200 and doc["degraded"] is True
    assert any("feature store unavailable" in r for r in doc["degraded_reasons"])
    zero = F.dense_from_counts(np.zeros((1, len(F.ENTITIES), F.N_WINDOWS, 2)))
    want = float(_sigmoid(zero.astype(np.float64) @ W + BIAS)[0])
    assert all(c["raw_score"] == pytest.approx(want, rel=1e-5) for c in doc["candidates"])
    assert doc["model_version"] == "1"  # the model still answered


def _children(pid: int) -> list[int]:
    from pathlib import Path

    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(k) for k in (task / "children").read_text().split()]
    return out


def _metric(text: str, sample: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample)
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrstream_serve_runs_the_api(stack_env, model, body, tmp_path, workers):
    port = free_port()
    proc = start_job(
        [
            sys.executable,
            "-m",
            "ctrstream",
            "serve",
            "--port",
            str(port),
            "--model-name",
            model,
            "--workers",
            str(workers),
        ],
        env=stack_env,
        log_path=tmp_path / "serve.log",
    )
    kids: list[int] = []
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            return httpx.get(url + "/readyz", timeout=1).status_code == 200

        wait_until(ready, 60, what="the API to become ready")
        n = 12
        for _ in range(n):  # a new connection each: the kernel hands them to any worker
            resp = httpx.post(url + "/v1/predict", json=body, timeout=10)
            assert resp.status_code == 200 and resp.json()["model_version"] == "1", resp.text[-800:]
        assert httpx.post(url + "/v1/predict", content=b"nope", timeout=10).status_code == 422
        if workers > 1:
            kids = [
                k
                for k in _children(proc.pid)
                if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()
            ]
            assert len(kids) == workers, f"worker processes of {proc.pid}: {kids}"
        # /metrics counts every request once, whichever worker answered it (and answers)
        text = httpx.get(url + "/metrics", timeout=10).text
        assert _metric(text, 'ctrstream_api_requests_total{outcome="ok"}') == n
        assert _metric(text, 'ctrstream_api_requests_total{outcome="invalid"}') == 1
    finally:
        assert stop_job(proc) is not None
    assert not [k for k in kids if os.path.exists(f"/proc/{k}")], "workers outlived the server"


def test_ctrstream_serve_refuses_zero_workers(stack_env, model, tmp_path):
    import subprocess

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctrstream",
            "serve",
            "--port",
            str(free_port()),
            "--model-name",
            model,
            "--workers",
            "0",
        ],
        env=stack_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "--workers must be at least 1" in out.stderr
