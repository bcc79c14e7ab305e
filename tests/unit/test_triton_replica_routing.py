"""Several Triton servers without a server: the settings (``CTRSTREAM_TRITON__URLS``,
``--triton-replicas``, the run directory's record) and the client's choice of version and
server (``serving/triton_client.py``), with fake channels."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from ctrstream import features as F
from ctrstream.config import TRITON_NODES_FILE, Settings, TritonSettings
from ctrstream.serving import triton_client as TC
from ctrstream.stack.manager import record_triton_topology, settings_env
from ctrstream.stack.services import triton_services


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("CTRSTREAM_"):
            monkeypatch.delenv(k)
    return monkeypatch


def test_urls_from_the_environment(clean_env, tmp_path):
    clean_env.setenv("CTRSTREAM_RUN_DIR", str(tmp_path))
    clean_env.setenv("CTRSTREAM_TRITON__URLS", "triton-1:8001, triton-2:8001")
    assert Settings().triton.grpc_urls == ["triton-1:8001", "triton-2:8001"]
    assert Settings().triton.grpc_url == "triton-1:8001"
    clean_env.setenv("CTRSTREAM_TRITON__URLS", '["a:1", "b:2"]')
    assert Settings().triton.grpc_urls == ["a:1", "b:2"]
    for bad, what in (("triton-1", "not a gRPC address"), ("a:1,a:1", "twice")):
        clean_env.setenv("CTRSTREAM_TRITON__URLS", bad)
        with pytest.raises(ValueError, match=what):
            Settings()


def test_replicas_ports_default_and_given():
    t = TritonSettings(replicas=3)
    assert [(n.http_port, n.grpc_port, n.metrics_port) for n in t.nodes()] == [
        (8000, 8001, 8002),
        (8010, 8011, 8012),
        (8020, 8021, 8022),
    ]
    assert t.grpc_urls == ["127.0.0.1:8001", "127.0.0.1:8011", "127.0.0.1:8021"]
    t = TritonSettings(replicas=2, more_ports=[(9000, 9001, 9002)])
    assert t.grpc_urls == ["127.0.0.1:8001", "127.0.0.1:9001"]
    with pytest.raises(ValueError, match="overlap"):
        TritonSettings(replicas=2, more_ports=[(8000, 9001, 9002)])
    with pytest.raises(ValueError, match="needs 2"):
        TritonSettings(replicas=3, more_ports=[(9000, 9001, 9002)])
    # explicit servers win over the local topology
    assert TritonSettings(replicas=2, urls=["x:1"]).grpc_urls == ["x:1"]


def test_the_run_directory_records_the_topology(clean_env, tmp_path):
    s = Settings(
        run_dir=tmp_path,
        triton=TritonSettings(replicas=2, http_port=7000, grpc_port=7001, metrics_port=7002),
    )
    record_triton_topology(s)
    assert json.loads((tmp_path / TRITON_NODES_FILE).read_text())["replicas"] == 2
    clean_env.setenv("CTRSTREAM_RUN_DIR", str(tmp_path))
    later = Settings()  # no topology given: the record's
    assert later.triton.grpc_urls == ["127.0.0.1:7001", "127.0.0.1:7011"]
    assert [svc.name for svc in triton_services(later)] == ["triton-1", "triton-2"]
    clean_env.setenv("CTRSTREAM_TRITON__REPLICAS", "1")  # given: the record is not read
    assert [svc.name for svc in triton_services(Settings())] == ["triton"]
    env = settings_env(s)  # child processes see every server
    assert env["CTRSTREAM_TRITON__REPLICAS"] == "2"
    assert json.loads(env["CTRSTREAM_TRITON__MORE_PORTS"]) == [[7010, 7011, 7012]]


def test_stack_up_refuses_overlapping_replica_ports(clean_env, tmp_path):
    from typer.testing import CliRunner

    from ctrstream.__main__ import app

    clean_env.setenv("CTRSTREAM_RUN_DIR", str(tmp_path))
    clean_env.setenv("CTRSTREAM_TRITON__MORE_PORTS", "[[8000, 8011, 8012]]")
    from ctrstream.config import get_settings

    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(app, ["stack", "up", "--only", "triton", "--triton-replicas", "2"])
    finally:
        get_settings.cache_clear()
    assert res.exit_code != 0
    assert "--triton-replicas 2" in res.output and "overlap" in res.output, res.output


# --------------------------------------------------------------------------- the client


class _Resp:
    def __init__(self, prob: np.ndarray, version: str):
        self._prob, self._version = prob, version

    def as_numpy(self, name: str) -> np.ndarray:
        return self._prob

    def get_response(self):
        return type("R", (), {"model_version": self._version})()


class _Unavailable(Exception):
    def status(self) -> str:
        return "StatusCode.UNAVAILABLE"


class _FakeChannel:
    """A Triton server: its ready versions, or down; records the versions it was asked."""

    def __init__(self, versions: list[str], down: bool = False):
        self.versions, self.down, self.asked = versions, down, []

    async def get_model_metadata(self, name, as_json=False):
        if self.down:
            raise _Unavailable("failed to connect to all addresses")
        return {"versions": self.versions}

    async def infer(self, name, inputs, model_version="", outputs=None, client_timeout=None):
        if self.down:
            raise _Unavailable("failed to connect to all addresses")
        v = model_version or max(self.versions, key=lambda x: (len(x), x))
        if v not in self.versions:
            raise RuntimeError(f"Request for unknown model: version {v} is not found")
        self.asked.append(v)
        n = inputs[0].shape()[0]
        return _Resp(np.full((n, 1), float(v) / 10, np.float32), v)

    async def close(self):
        pass


def _scorer(channels: dict[str, _FakeChannel]) -> TC.AsyncScorer:
    s = Settings(_env_file=None)
    scorer = TC.AsyncScorer(s, model_name="m_py", urls=list(channels), timeout_s=2.0)
    for srv in scorer._servers:
        srv.client = channels[srv.url]
    return scorer


def _rows(n: int = 3):
    return np.zeros((n, F.N_SPARSE), np.int64), np.zeros((n, F.N_DENSE), np.float32)


def test_asks_the_newest_version_ready_on_every_server_and_spreads():
    a, b = _FakeChannel(["1", "2"]), _FakeChannel(["1"])  # a publish halfway: v2 on a only
    scorer = _scorer({"a:1": a, "b:1": b})

    async def run():
        out = [await scorer.infer(*_rows()) for _ in range(10)]
        b.versions = ["1", "2"]  # now on both
        await scorer._fresh_view(force=True)
        out += [await scorer.infer(*_rows()) for _ in range(10)]
        return out

    out = asyncio.run(run())
    assert [v for _, v, _ in out] == ["1"] * 10 + ["2"] * 10
    assert a.asked.count("1") == b.asked.count("1") == 5  # in turn, each with no request open
    assert a.asked.count("2") == b.asked.count("2") == 5


def test_an_unreachable_server_is_skipped_and_tried_again_later(monkeypatch):
    a, b = _FakeChannel(["3"]), _FakeChannel(["3"])
    scorer = _scorer({"a:1": a, "b:1": b})
    clock = [1000.0]
    monkeypatch.setattr(TC.time, "monotonic", lambda: clock[0])

    async def run():
        await scorer.infer(*_rows())  # the view: both have 3
        b.down = True
        results = [await scorer.infer(*_rows()) for _ in range(6)]
        skipped = len(b.asked)
        b.down = False
        clock[0] += TC.DEAD_RETRY_S + TC.VIEW_TTL_S + 0.1  # later: b is asked again
        await scorer._fresh_view(force=True)
        results += [await scorer.infer(*_rows()) for _ in range(4)]
        return results, skipped

    results, skipped = asyncio.run(run())
    assert all(v == "3" for _, v, _ in results)  # every request answered
    assert skipped <= 1 and len(a.asked) >= 6
    assert len(b.asked) >= skipped + 2  # back in the rotation


def test_a_version_gone_mid_switch_is_asked_again_from_the_new_view():
    a, b = _FakeChannel(["1", "2"]), _FakeChannel(["1", "2"])
    scorer = _scorer({"a:1": a, "b:1": b})

    async def run():
        await scorer.infer(*_rows())
        # the publisher's last step: the old version unloaded, the client's view still old
        scorer._servers[0].versions = frozenset({"1"})
        scorer._servers[1].versions = frozenset({"1"})
        a.versions, b.versions = ["2"], ["2"]
        return await scorer.score(*_rows())

    res = asyncio.run(run())
    assert not res.degraded and res.model_version == "2", res.error


def test_one_server_asks_no_version():
    a = _FakeChannel(["4", "5"])
    scorer = _scorer({"a:1": a})
    raw, version, _ = asyncio.run(scorer.infer(*_rows()))
    assert version == "5" and a.asked == ["5"]
    assert not scorer._balanced


class _Control:
    """A control client of one server: load/unload calls, or a failure."""

    def __init__(self, url: str, fail: bool = False):
        self.url, self.fail, self.calls = url, fail, []

    def load_model(self, name: str) -> None:
        self.calls.append("load")
        if self.fail:
            raise RuntimeError("connection refused")

    def unload_model(self, name: str) -> None:
        self.calls.append("unload")
        if self.fail:
            raise RuntimeError("connection refused")


def test_a_rollback_reaches_every_server_and_names_the_one_that_failed(tmp_path):
    from ctrstream.models import publish as P

    model_dir = tmp_path / "m_py"
    new = model_dir / "2"
    new.mkdir(parents=True)
    a, b = _Control("a:1", fail=True), _Control("b:1")
    with pytest.raises(P.PublishError, match="a:1"):
        P._rollback([a, b], "m_py", model_dir, "the old config", [1], [new])
    assert b.calls == ["load"]  # the second server is restored although the first failed
    assert (model_dir / "config.pbtxt").read_text() == "the old config"
    assert not new.exists()
    # a first publish (nothing to restore): unloaded wherever it can be, no error
    new.mkdir()
    a, b = _Control("a:1", fail=True), _Control("b:1")
    P._rollback([a, b], "m_py", model_dir, None, [], [new])
    assert a.calls == b.calls == ["unload"] and not new.exists()
