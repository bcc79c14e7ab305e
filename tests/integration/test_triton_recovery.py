"""Triton's model control needs the stack's key, and a Triton killed with kill -9 comes back
serving what it served, with the API and the scorer recovering by themselves.

The kill -9 test runs a PRIVATE Triton (its own ports and model repository), never the
session's, so the rest of the suite is not disturbed."""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from pydantic import SecretStr
from tritonclient.utils import InferenceServerException

from ctrstream import features as F
from ctrstream.bench.api import write_demo_model
from ctrstream.config import (
    TRITON_CONTROL_HEADER,
    Settings,
    triton_control_headers,
    triton_control_key,
    triton_control_key_file,
)
from ctrstream.events import Impression, decode_prediction, encode
from ctrstream.kafka.clients import make_consumer, make_producer
from ctrstream.models.publish import PublishError, control_client, publish, read_served
from ctrstream.stack.manager import settings_env
from ctrstream.stack.procs import start_job, stop_job, wait_until
from ctrstream.stack.services import TritonService, free_port, pid_alive

W = np.linspace(-0.2, 0.3, F.N_DENSE).astype(np.float32)


# ------------------------------------------------------------------ model control needs the key


def test_model_control_is_refused_without_the_key_and_works_with_it(settings, unique):
    name = f"ctl_{unique}_py"
    write_demo_model(settings.triton.model_repository, name, version=1, weights=W, bias=0.0)
    key = triton_control_key(settings)
    assert key, "the stack generated no control key"
    key_file = triton_control_key_file(settings)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600  # owner only
    http = f"http://{settings.triton.http_url}/v2/repository"

    plain = grpcclient.InferenceServerClient(settings.triton.grpc_url)
    try:
        for call in (plain.load_model, plain.unload_model):
            with pytest.raises(InferenceServerException, match="restricted"):
                call(name)
        with pytest.raises(InferenceServerException, match="restricted"):
            plain.get_model_repository_index()
        wrong = {f"triton-grpc-protocol-{TRITON_CONTROL_HEADER}": "0" * 64}
        with pytest.raises(InferenceServerException, match="restricted"):
            plain.load_model(name, headers=wrong)
        # HTTP: 403 without the key or with another one; the model stays unloaded
        for headers in ({}, {TRITON_CONTROL_HEADER: "nope"}):
            resp = httpx.post(f"{http}/models/{name}/load", headers=headers, timeout=10)
            assert resp.status_code == 403, resp.text
            assert "restricted" in resp.text
        assert not plain.is_model_ready(name)

        # with the key: gRPC loads, HTTP unloads; inference needs no key
        plain.load_model(name, headers=triton_control_headers(settings, "grpc"))
        assert plain.is_model_ready(name)
        resp = httpx.post(
            f"{http}/models/{name}/unload",
            headers=triton_control_headers(settings, "http"),
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        wait_until(lambda: not plain.is_model_ready(name), 30, what=f"{name} to unload")
    finally:
        plain.close()

    # the publisher's client sends the key; a wrong key is a PublishError that says what to do
    ctl = control_client(settings)
    try:
        ctl.load_model(name)
        assert ctl.is_model_ready(name)
        ctl.unload_model(name)
    finally:
        ctl.close()
    other = settings.model_copy(
        update={
            "triton": settings.triton.model_copy(update={"control_key": SecretStr("not-the-key")})
        }
    )
    bad = control_client(other)
    try:
        with pytest.raises(PublishError, match="CTRSTREAM_TRITON__CONTROL_KEY"):
            bad.load_model(name)
    finally:
        bad.close()


# -------------------------------------------------------------- kill -9 of Triton, then back

T0 = 1_768_435_200_000 + 40 * F.MINUTE_MS
OUTAGE_S = 15.0


def _impressions(tag: str, n: int) -> list[Impression]:
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    return [
        Impression(
            schema_version=1,
            impression_id=f"{tag}-{k}",
            event_time_ms=T0 + k * 1000,
            user_id=int(rng.integers(0, 1000)),
            ad_id=int(rng.integers(0, 50)),
            campaign_id=3,
            advertiser_id=1,
            site_id=int(rng.integers(0, 20)),
            ad_category=2,
            device_type="mobile",
            country="US",
            position=int(rng.integers(0, 5)),
        )
        for k in range(n)
    ]


class _Predictions:
    """Produces impressions to the scorer's topic and reads its predictions back."""

    def __init__(self, s: Settings):
        self.s = s
        self.producer = make_producer(s)
        self.consumer = make_consumer(s, group_id=f"recovery-{uuid.uuid4().hex[:8]}")
        self.consumer.subscribe([s.topics.predictions.name])
        self.seen: dict[str, object] = {}

    def send(self, tag: str, n: int) -> list[str]:
        imps = _impressions(tag, n)
        for ev in imps:
            self.producer.produce(
                self.s.topics.impressions.name, key=ev.impression_id.encode(), value=encode(ev)
            )
        assert self.producer.flush(30) == 0
        return [ev.impression_id for ev in imps]

    def wait(self, ids: list[str], timeout: float) -> list:
        deadline = time.monotonic() + timeout
        while not all(i in self.seen for i in ids):
            assert time.monotonic() < deadline, (
                f"{sum(i in self.seen for i in ids)} of {len(ids)} predictions in {timeout}s"
            )
            for msg in self.consumer.consume(num_messages=1000, timeout=0.2):
                if not msg.error():
                    p = decode_prediction(msg.value())
                    self.seen[p.impression_id] = p
        return [self.seen[i] for i in ids]

    def close(self) -> None:
        self.consumer.close()


def _body(k: int) -> dict:
    return {
        "user_id": 5 + k,
        "context": {
            "site_id": 3,
            "device_type": "mobile",
            "country": "US",
            "position": 1,
            "event_time_ms": T0,
        },
        "candidates": [
            {"ad_id": 10 + j, "campaign_id": 2, "advertiser_id": 1, "ad_category": 3}
            for j in range(4)
        ],
    }


def _onnx(path: Path) -> Path:
    import torch

    from ctrstream.models.export import export_onnx
    from ctrstream.models.nets import HashedLogisticRegression

    torch.manual_seed(3)
    m = HashedLogisticRegression()
    with torch.no_grad():
        m.weights.weight.normal_(0, 0.3)
        m.dense.weight.normal_(0, 0.5)
    export_onnx(m.eval(), path)
    return path


def test_kill_9_of_triton_degrades_then_the_served_model_comes_back_by_itself(
    fresh_topics, tmp_path, unique
):
    priv = fresh_topics.model_copy(
        update={
            "triton": fresh_topics.triton.model_copy(
                update={
                    "http_port": free_port(),
                    "grpc_port": free_port(),
                    "metrics_port": free_port(),
                    "model_repository": tmp_path / "repo",
                }
            )
        }
    )
    triton = TritonService(priv)
    triton.name = f"triton-recovery-{unique}"  # its own PID file and folder in the run dir
    env = {**os.environ, **settings_env(priv)}
    pids: list[int] = []
    jobs = []
    preds = None
    try:
        triton.start()
        pids.append(triton.pid())
        info = publish(priv, _onnx(tmp_path / "m.onnx"), f"rec_{unique}")
        name, version = info["model_name"], str(info["version"])
        assert read_served(priv)["models"][name]["versions"] == [info["version"]]

        port = free_port()
        api = start_job(
            [sys.executable, "-m", "ctrstream", "serve", "--port", str(port)]
            + ["--model-name", name],
            env=env,
            log_path=tmp_path / "serve.log",
        )
        jobs.append(api)
        scorer = start_job(
            [sys.executable, "-m", "ctrstream", "score", "--model-name", name]
            + ["--batch-size", "20"],
            env=env,
            log_path=tmp_path / "score.log",
        )
        jobs.append(scorer)
        url = f"http://127.0.0.1:{port}"

        def api_ready() -> bool:
            assert api.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            return httpx.get(url + "/readyz", timeout=1).status_code == 200

        wait_until(api_ready, 60, what="the API to become ready")

        def predict(k: int) -> dict:
            resp = httpx.post(url + "/v1/predict", json=_body(k), timeout=10)
            assert resp.status_code == 200, resp.text  # never 5xx, whatever Triton does
            return resp.json()

        assert not predict(0)["degraded"]
        preds = _Predictions(priv)
        up = preds.wait(preds.send("up", 20), 90)
        assert not any(p.degraded for p in up) and {p.model_version for p in up} == {version}

        # kill -9: answers keep coming, flagged degraded
        old = triton.pid()
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: not pid_alive(old), 10, what="Triton to die")
        # an outage of OUTAGE_S (a restart by a supervisor takes that long): the clients' gRPC
        # reconnection backoff grows meanwhile and must not delay their recovery afterwards
        t_kill = time.monotonic()
        outage = [predict(k) for k in range(20)]
        assert all(d["degraded"] and d["model_version"] == "" for d in outage)
        assert all("model unavailable" in " ".join(d["degraded_reasons"]) for d in outage)
        down = preds.wait(preds.send("down", 20), 60)
        assert all(p.degraded and p.model_version == "" for p in down)
        assert scorer.poll() is None and api.poll() is None

        while time.monotonic() - t_kill < OUTAGE_S:
            assert predict(3)["degraded"]
            time.sleep(0.2)

        # Triton comes back: the recorded model loads without a publish, the jobs recover
        os.killpg(old, signal.SIGKILL)  # the dead server's backend stubs, by its group id
        t0 = time.monotonic()
        triton.start()
        pids.append(triton.pid())
        t_ready = time.monotonic() - t0
        check = grpcclient.InferenceServerClient(priv.triton.grpc_url)
        try:
            assert check.is_model_ready(name, version)  # no one loaded it but the restart
        finally:
            check.close()
        wait_until(lambda: not predict(1)["degraded"], 30, what="the API to recover")
        t_api = time.monotonic() - t0
        again = predict(2)
        assert again["model_version"] == version and again["degraded_reasons"] == []

        def scorer_recovered() -> bool:
            got = preds.wait(preds.send(f"back-{time.monotonic_ns()}", 5), 30)
            return not any(p.degraded for p in got)

        wait_until(scorer_recovered, 60, interval=0.2, what="the scorer to recover")
        t_scorer = time.monotonic() - t0
        back = preds.wait(preds.send("back", 20), 30)
        assert not any(p.degraded for p in back) and {p.model_version for p in back} == {version}
        print(
            f"\ntriton kill -9 recovery: Triton ready with {name} v{version} {t_ready:.1f}s "
            f"after its restart; API answers not degraded {t_api:.1f}s, scorer "
            f"{t_scorer:.1f}s after it"
        )
        assert t_api - t_ready < 5 and t_scorer - t_ready < 10
    finally:
        if preds is not None:
            preds.close()
        for job in jobs:
            stop_job(job)
        triton.stop()
        for pid in pids:
            if pid is not None:
                try:
                    os.killpg(pid, signal.SIGKILL)  # backend stubs left in its group
                except ProcessLookupError:
                    pass
