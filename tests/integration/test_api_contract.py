"""The running API against its own OpenAPI document (schemathesis), and its limits: a stalled
body is dropped within the body-read timeout, a large body is a 413, a large header is
refused."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ctrstream import features as F
from ctrstream.bench.api import write_demo_model
from ctrstream.models.publish import control_client
from ctrstream.stack.procs import start_job, stop_job, wait_until
from ctrstream.stack.services import free_port

MODEL = "contract_demo_py"
BODY_TIMEOUT_S = 1.5
HEAD_TIMEOUT_S = 1.5
MAX_HEADER_BYTES = 16 * 1024


@pytest.fixture(scope="module")
def model(settings):
    w = np.linspace(-0.2, 0.3, F.N_DENSE).astype(np.float32)
    write_demo_model(settings.triton.model_repository, MODEL, version=1, weights=w, bias=-3.0)
    client = control_client(settings)
    client.load_model(MODEL)
    yield MODEL
    try:
        client.unload_model(MODEL)
    finally:
        client.close()


@pytest.fixture(scope="module", params=["httptools", "h11"])
def api(request, stack_env, model, tmp_path_factory):
    """``ctrstream serve`` with a short body-read timeout, on each HTTP parser."""
    log = tmp_path_factory.mktemp("api") / "serve.log"
    port = free_port()
    proc = start_job(
        [sys.executable, "-m", "ctrstream", "serve", "--port", str(port)]
        + ["--model-name", model, "--http", request.param]
        + ["--body-timeout", str(BODY_TIMEOUT_S), "--head-timeout", str(HEAD_TIMEOUT_S)]
        + ["--max-header-bytes", str(MAX_HEADER_BYTES)],
        env=stack_env,
        log_path=log,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        return httpx.get(url + "/readyz", timeout=1).status_code == 200

    try:
        wait_until(ready, 60, what="the API to become ready")
        yield url
    finally:
        stop_job(proc)


def _request_head(port: int, length: int, extra: str = "") -> bytes:
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n"
    ).encode()


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed ``sock`` within ``seconds`` (and what it answered)."""
    deadline = time.monotonic() + seconds
    got = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def test_a_stalled_body_is_dropped_within_the_timeout(api):
    port = int(api.rsplit(":", 1)[1])
    socks = []
    t0 = time.monotonic()
    try:
        for _ in range(50):  # headers and a partial body, then nothing
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(_request_head(port, 1000) + b'{"user_id": 1')
            socks.append(s)
        bound = BODY_TIMEOUT_S + 3.0
        results = [_closed_within(s, bound - (time.monotonic() - t0)) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert all(closed for closed, _ in results), (
        f"{sum(not c for c, _ in results)} of {len(socks)} stalled connections still open "
        f"{bound:.1f}s after their headers"
    )
    answer = results[0][1]
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"detail"' in answer and b"body" in answer
    # a slow-drip body (a byte at a time, never finishing) is dropped the same way
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(_request_head(port, 1000))
        t1 = time.monotonic()
        closed = False
        while time.monotonic() - t1 < BODY_TIMEOUT_S + 3.0:
            try:
                s.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            closed, _ = _closed_within(s, 0.2)
            if closed:
                break
        assert closed, "a slow-drip body was held open past the body-read timeout"
    # the server still answers
    assert httpx.get(api + "/healthz", timeout=5).status_code == 200


def test_an_idle_connection_or_a_stalled_head_is_dropped_within_the_timeout(api):
    port = int(api.rsplit(":", 1)[1])
    bound = HEAD_TIMEOUT_S + 3.0
    idle = socket.create_connection(("127.0.0.1", port), timeout=5)  # sends nothing
    partial = socket.create_connection(("127.0.0.1", port), timeout=5)
    partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    # a second request's head on a kept-alive connection stalls the same way
    again = socket.create_connection(("127.0.0.1", port), timeout=5)
    again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while not first.endswith(b'"ok"}'):
        first += again.recv(4096)
    assert first.startswith(b"HTTP/1.1 200")
    again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    try:
        for name, sock in (("idle", idle), ("partial head", partial), ("second head", again)):
            closed, answer = _closed_within(sock, bound)
            assert closed, f"{name}: still open {bound:.1f}s later"
            assert answer.startswith(b"HTTP/1.1 408"), (name, answer[:200])
    finally:
        for sock in (idle, partial, again):
            sock.close()


def test_a_large_body_is_a_413_with_a_json_error(api):
    big = b'{"user_id": 1, "pad": "' + b"x" * (2 << 20) + b'"}'
    resp = httpx.post(
        api + "/v1/predict", content=big, headers={"content-type": "application/json"}, timeout=30
    )
    assert resp.status_code == 413, resp.text[:300]
    assert resp.headers["content-type"] == "application/json"
    assert "larger than" in resp.json()["detail"]
    # declared too large: refused before the body is read, on any route
    port = int(api.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(_request_head(port, 50 << 20))
        closed, answer = _closed_within(s, 5)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert closed
    assert httpx.get(api + "/healthz", timeout=5).status_code == 200


def test_a_100_kb_header_is_refused(api):
    resp = httpx.get(api + "/healthz", headers={"x-big": "a" * 100_000}, timeout=10)
    assert resp.status_code == 431, (resp.status_code, resp.text[:300])
    # headers under the limit are fine
    resp = httpx.get(api + "/healthz", headers={"x-big": "a" * 4000}, timeout=10)
    assert resp.status_code == 200


def test_integers_written_as_floats_are_accepted_as_the_schema_says(api):
    body = {
        "user_id": 17.0,
        "context": {"site_id": 3, "device_type": "mobile", "country": "US", "position": 1e0},
        "candidates": [{"ad_id": 4.0, "campaign_id": 2, "advertiser_id": 1, "ad_category": 7}],
    }
    resp = httpx.post(api + "/v1/predict", json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["candidates"][0]["ad_id"] == 4
    body["user_id"] = 17.5  # not an integer: still a precise 422
    resp = httpx.post(api + "/v1/predict", json=body, timeout=10)
    assert resp.status_code == 422 and "user_id" in resp.json()["detail"]
    # an integral float next to another mistake: the other mistake is reported
    resp = httpx.post(api + "/v1/predict", json={**body, "user_id": 17.0, "bid": 1}, timeout=10)
    assert resp.status_code == 422 and "bid" in resp.json()["detail"], resp.text


def test_the_openapi_document_declares_every_answer(api):
    doc = httpx.get(api + "/openapi.json", timeout=10).json()
    predict = doc["paths"]["/v1/predict"]["post"]["responses"]
    for code in ("200", "413", "415", "422"):
        assert code in predict and "application/json" in predict[code]["content"], code
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert "413" in op["responses"], f"{path}: 413 undocumented"
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]


def test_schemathesis_finds_no_contract_violation(api, tmp_path):
    """Schema-valid and schema-invalid requests (bounded): no 5xx, no schema-valid request
    rejected, no schema-invalid one accepted, no undocumented status code, content type or
    response shape."""
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    cmd = [
        st,
        "run",
        api + "/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance,positive_data_acceptance,negative_data_rejection,"
        "unsupported_method",
        "--max-examples",
        "25",
        "--seed",
        "16",
        "--workers",
        "2",
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        "--no-color",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    text = out.stdout + out.stderr
    tail = text[text.find("SUMMARY") :] if "SUMMARY" in text else text[-3000:]
    print("\nschemathesis", tail, sep="\n")
    assert out.returncode == 0, text[-6000:]
