"""Two Triton servers (``ctrstream stack up --only triton --triton-replicas 2``): requests
spread over both, the version switch across them (zero failed requests, no answer from the
old version once the switch has returned, a version on one server only is not asked), and
``kill -9`` of one server (requests keep succeeding on the other).

The module starts its own two servers (free loopback ports, a temporary run directory, the
Python backend) with the CLI and stops them with ``ctrstream stack down`` (by PID); the
session's stack is not used, so only two tritonservers run (each costs its own memory).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_publish_pins import _lr_onnx
from test_speed_features import CTRSTREAM

from ctrstream import features as F
from ctrstream.config import TRITON_NODES_FILE, Settings
from ctrstream.models.onnx_runtime import ort_predict, ort_session, random_inputs
from ctrstream.models.publish import (
    control_client,
    loaded_versions,
    model_config,
    publish,
    served_model_name,
)
from ctrstream.serving.triton_client import Scorer
from ctrstream.stack.manager import isolated_settings, settings_env
from ctrstream.stack.services import pid_alive, wait_until

REPLICAS = 2


def _cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CTRSTREAM, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _pids(run_dir: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in run_dir.glob("triton*.pid")}


class Replicas:
    def __init__(self, settings: Settings, env: dict[str, str]):
        self.settings, self.env = settings, env

    def pids(self) -> dict[str, int]:
        return _pids(self.settings.run_dir)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Iterator[Replicas]:
    """Two Triton servers started by the CLI (other free ports when one was taken
    meanwhile), stopped by ``stack down``; whatever is left of them (a killed server's
    backend stubs) is killed by process group."""
    for _attempt in range(3):
        run_dir = tmp_path_factory.mktemp("stack-triton2")
        (run_dir / "owner.pid").write_text(str(os.getpid()))
        s = isolated_settings(run_dir, triton_replicas=REPLICAS)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CTRSTREAM_")}
        env.update(settings_env(s))
        del env["CTRSTREAM_TRITON__REPLICAS"]  # --triton-replicas gives it, the record later
        env["COLUMNS"] = "200"
        t0 = time.monotonic()
        res = _cli(["stack", "up", "--only", "triton", "--triton-replicas", str(REPLICAS)], env)
        if res.returncode == 0 or "already in use" not in res.stdout + res.stderr:
            break
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"\n{REPLICAS} Triton servers up in {time.monotonic() - t0:.1f} s")
    started = _pids(s.run_dir)
    try:
        yield Replicas(s, env)
    finally:
        down = _cli(["stack", "down"], env, timeout=180)
        for pid in started.values():
            try:
                os.killpg(pid, signal.SIGKILL)  # backend stubs left in its group
            except ProcessLookupError:
                pass
        assert down.returncode == 0, down.stdout + down.stderr


def _stats(url: str, model: str) -> dict[str, int]:
    """Successful inferences of ``model`` on the server at ``url``, per version."""
    c = grpcclient.InferenceServerClient(url)
    try:
        doc = c.get_inference_statistics(model, as_json=True)
    finally:
        c.close()
    return {
        m["version"]: int(m.get("inference_stats", {}).get("success", {}).get("count", 0))
        for m in doc.get("model_stats", [])
    }


def test_two_servers_their_topology_and_requests_reach_both(replicas, tmp_path, unique):
    s, env = replicas.settings, replicas.env
    pids = replicas.pids()
    assert set(pids) == {"triton-1", "triton-2"}, pids
    assert len(set(pids.values())) == 2 and all(pid_alive(p) for p in pids.values())
    nodes = s.triton.nodes()
    ports = {p for n in nodes for p in (n.http_port, n.grpc_port, n.metrics_port)}
    assert len(ports) == 6
    assert (s.run_dir / TRITON_NODES_FILE).exists()
    recorded = Settings(_env_file=None, run_dir=s.run_dir)  # no topology given: the record's
    assert recorded.triton.grpc_urls == [f"127.0.0.1:{n.grpc_port}" for n in nodes]
    status = _cli(["stack", "status"], env, timeout=60)
    for n in nodes:
        name = f"triton-{n.index}"
        assert re.search(rf"{name}\s.*{pids[name]}.*ready.*:{n.grpc_port}", status.stdout), (
            status.stdout
        )
    again = _cli(["stack", "up", "--only", "triton"], env)  # the record gives the topology
    assert again.returncode == 0 and again.stdout.count("already running") == 2, again.stdout

    base = f"ctr_rep{unique}"
    onnx = _lr_onnx(tmp_path / "m.onnx", seed=71)
    res = publish(s, onnx, base)
    served = served_model_name(s, base)
    assert res["version"] == 1
    for url in s.triton.grpc_urls:  # loaded on every server
        c = grpcclient.InferenceServerClient(url)
        try:
            assert loaded_versions(c, served) == [1]
        finally:
            c.close()
    x = random_inputs(40, seed=3)
    want = ort_predict(ort_session(onnx), x).reshape(-1)
    with Scorer(recorded, model=base, timeout_s=30) as scorer:
        for _ in range(20):
            got = scorer.score(x[F.INPUT_SPARSE], x[F.INPUT_DENSE])
            assert not got.degraded and got.model_version == "1", got.error
            np.testing.assert_allclose(got.raw, want, atol=1e-6)
    counts = [_stats(url, served).get("1", 0) for url in s.triton.grpc_urls]
    assert all(c >= 5 for c in counts), counts  # both servers answered
    assert sum(counts) >= 20


def _traffic(settings: Settings, base: str, x, kinds: dict[str, np.ndarray]):
    """A thread scoring ``x`` in a loop; its log: (time answered, version, kind or error)."""
    log: list[tuple[float, str, str]] = []
    stop = threading.Event()
    cond = threading.Condition()

    def run() -> None:
        with Scorer(settings, model=base, timeout_s=30) as scorer:
            while not stop.is_set():
                r = scorer.score(x[F.INPUT_SPARSE], x[F.INPUT_DENSE])
                if r.degraded:
                    kind = f"error: {r.error}"
                else:
                    kind = next(
                        (k for k, p in kinds.items() if np.allclose(r.raw, p, atol=1e-6)), "other"
                    )
                with cond:
                    log.append((time.monotonic(), r.model_version, kind))
                    cond.notify_all()

    th = threading.Thread(target=run, daemon=True)
    th.start()

    def wait(n: int, timeout: float = 60) -> None:
        with cond:
            assert cond.wait_for(lambda: len(log) >= n, timeout=timeout), len(log)

    def finish() -> None:
        stop.set()
        th.join(timeout=60)

    return log, wait, finish


def test_version_switch_across_servers_under_load(replicas, tmp_path, unique):
    """A publish while requests flow: no request fails, answers move from the old version
    to the new one once and for good, and none is answered by the old version after the
    switch returned; both servers answer the new version."""
    s = replicas.settings
    base = f"ctr_sw{unique}"
    served = served_model_name(s, base)
    old, new = _lr_onnx(tmp_path / "old.onnx", seed=81), _lr_onnx(tmp_path / "new.onnx", seed=82)
    x = random_inputs(64, seed=21)
    kinds = {
        "old": ort_predict(ort_session(old), x).reshape(-1),
        "new": ort_predict(ort_session(new), x).reshape(-1),
    }
    assert np.max(np.abs(kinds["old"] - kinds["new"])) > 1e-2  # distinguishable
    assert publish(s, old, base)["version"] == 1

    log, wait, finish = _traffic(s, base, x, kinds)
    try:
        wait(20)
        res = publish(s, new, base)
        switched_at = time.monotonic()
        n_at_switch = len(log)
        wait(n_at_switch + 40)
    finally:
        finish()
    assert res["version"] == 2 and res["previous"] == [1]
    errors = [k for _, _, k in log if k not in ("old", "new")]
    assert errors == [], errors[:5]
    assert all((v, k) in {("1", "old"), ("2", "new")} for _, v, k in log), log[:5]
    kinds_in_order = [k for _, _, k in log]
    first_new = kinds_in_order.index("new")
    assert first_new >= 20 and set(kinds_in_order[:first_new]) == {"old"}
    assert set(kinds_in_order[first_new:]) == {"new"}
    assert all(k == "new" for t, _, k in log if t > switched_at)
    for url in s.triton.grpc_urls:  # both servers serve and answer the new version only
        c = grpcclient.InferenceServerClient(url)
        try:
            assert loaded_versions(c, served) == [2]
        finally:
            c.close()
        assert _stats(url, served).get("2", 0) > 0, url


def test_a_version_on_one_server_only_is_not_asked(replicas, tmp_path, unique):
    """Version 2 loaded on one server but not yet on the other (the publisher's first step,
    halfway): every request is still answered by version 1, on both servers; once the other
    server has it too, requests move to version 2."""
    s = replicas.settings
    base = f"ctr_half{unique}"
    served = served_model_name(s, base)
    publish(s, _lr_onnx(tmp_path / "a.onnx", seed=91), base)
    publish(s, _lr_onnx(tmp_path / "b.onnx", seed=92), base, load=False)  # files only
    cfg = model_config(served, "python", [1, 2], F.N_SPARSE, F.N_DENSE)
    (s.triton.model_repository / served / "config.pbtxt").write_text(cfg)
    first, second = s.triton.grpc_urls
    ctl = control_client(s, first)
    try:
        ctl.load_model(served)
        assert loaded_versions(ctl, served) == [1, 2]
    finally:
        ctl.close()
    x = random_inputs(16, seed=5)
    before = [_stats(u, served).get("1", 0) for u in (first, second)]
    with Scorer(s, model=base, timeout_s=30) as scorer:
        for _ in range(20):
            r = scorer.score(x[F.INPUT_SPARSE], x[F.INPUT_DENSE])
            assert not r.degraded and r.model_version == "1", (r.model_version, r.error)
        after = [_stats(u, served).get("1", 0) for u in (first, second)]
        assert all(a > b for a, b in zip(after, before)), (before, after)  # both answered
        assert _stats(first, served).get("2", 0) == 0  # the one-server version: never asked
        ctl = control_client(s, second)
        try:
            ctl.load_model(served)
        finally:
            ctl.close()
        wait_until(
            lambda: scorer.score(x[F.INPUT_SPARSE], x[F.INPUT_DENSE]).model_version == "2",
            10,
            what="requests to move to version 2 once every server has it",
        )


def test_kill9_one_server_requests_keep_succeeding(replicas, tmp_path, unique):
    """kill -9 of one of the two servers while requests flow: every request still succeeds
    (answered by the other server, the dead one skipped), none falls back to the prior."""
    s = replicas.settings
    base = f"ctr_k{unique}"
    onnx = _lr_onnx(tmp_path / "m.onnx", seed=61)
    publish(s, onnx, base)
    x = random_inputs(32, seed=8)
    kinds = {"ok": ort_predict(ort_session(onnx), x).reshape(-1)}
    log, wait, finish = _traffic(s, base, x, kinds)
    pid = replicas.pids()["triton-2"]
    try:
        wait(20)
        os.kill(pid, signal.SIGKILL)  # not our child (the CLI started it): nothing to reap
        t_kill = time.monotonic()
        wait_until(lambda: not pid_alive(pid), 10, what=f"triton-2 (PID {pid}) to die")
        n_at_kill = len(log)
        wait(n_at_kill + 60)
    finally:
        finish()
    bad = [k for _, _, k in log if k != "ok"]
    assert bad == [], bad[:5]
    after = [t for t, _, _ in log if t > t_kill]
    assert len(after) >= 60
    survivor = s.triton.grpc_urls[0]
    assert _stats(survivor, served_model_name(s, base)).get("1", 0) >= 60
    print(f"\nkill -9 of triton-2: {len(after)} requests after it, none failed")
