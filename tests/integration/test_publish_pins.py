"""Several versions of one model served side by side: a pinned version survives later
publishes (an experiment's arm keeps asking it), the scorer asks exactly the version it is
given, unpinned old versions are unloaded by the next publish, and a restarted Triton loads
the pinned versions again from the served record.

Triton is the session stack's real server (explicit model control, Python backend) for the
switch, and a PRIVATE Triton (own ports and model repository) for the restart."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from ctrstream.models.export import export_onnx
from ctrstream.models.nets import HashedLogisticRegression
from ctrstream.models.onnx_runtime import ort_predict, ort_session, random_inputs
from ctrstream.models.publish import (
    PublishError,
    loaded_versions,
    pin_versions,
    pinned_versions,
    publish,
    read_served,
    served_model_name,
    unpin,
    versions_on_disk,
)
from ctrstream.serving.triton_client import AsyncScorer, Scorer
from ctrstream.stack.services import TritonService, free_port


def _lr_onnx(path: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    m = HashedLogisticRegression()
    with torch.no_grad():  # spread the outputs so that two versions' scores are far apart
        m.weights.weight.normal_(0, 0.5)
        m.dense.weight.normal_(0, 0.5)
    export_onnx(m.eval(), path)
    return path


@pytest.fixture
def triton(settings):
    c = grpcclient.InferenceServerClient(settings.triton.grpc_url)
    yield c
    c.close()


def test_a_pinned_version_stays_served_next_to_newer_ones(settings, triton, tmp_path, unique):
    base = f"ctr_pin{unique}"
    served = served_model_name(settings, base)
    onnx = [_lr_onnx(tmp_path / f"m{k}.onnx", seed=40 + k) for k in range(3)]
    x = random_inputs(50, seed=9)
    want = [ort_predict(ort_session(p), x).reshape(-1) for p in onnx]
    assert np.max(np.abs(want[0] - want[1])) > 1e-2  # the versions are distinguishable

    assert publish(settings, onnx[0], base)["version"] == 1
    with pytest.raises(PublishError, match="not in the model repository"):
        pin_versions(settings, base, [7], owner=f"exp-{unique}")
    pin = pin_versions(settings, base, [1], owner=f"exp-{unique}")
    assert pin == {"model_name": served, "pinned": [1], "loaded": [1]}
    assert pinned_versions(settings, served) == {f"exp-{unique}": [1]}

    res = publish(settings, onnx[1], base)
    assert res["version"] == 2 and res["previous"] == [1] and res["serving"] == [1, 2]
    assert loaded_versions(triton, served) == [1, 2]  # the pinned v1 was not unloaded
    record = read_served(settings)
    assert record["models"][served]["versions"] == [1, 2]
    assert record["pins"][served] == {f"exp-{unique}": [1]}
    assert (
        "versions: [ 1, 2 ]"
        in (settings.triton.model_repository / served / "config.pbtxt").read_text()
    )

    # each arm's scorer asks exactly its version; no version: the newest
    for version, scores in ((1, want[0]), (2, want[1]), (None, want[1])):
        with Scorer(settings, model_name=served, model_version=version, max_rows=16) as sc:
            assert sc.ready() and sc.base_name == base
            r = sc.score(x["sparse_ids"], x["dense"])
            assert not r.degraded, r.error
            assert r.model_version == str(version or 2)
            np.testing.assert_allclose(r.raw, scores, atol=1e-6)

    # unpinned: the next publish unloads v1 (and v2, superseded)
    assert unpin(settings, f"exp-{unique}") == {served: [1]}
    assert unpin(settings, f"exp-{unique}") == {}
    assert pinned_versions(settings, served) == {}
    assert loaded_versions(triton, served) == [1, 2]  # unpinning alone unloads nothing
    res = publish(settings, onnx[2], base)
    assert res["version"] == 3 and res["serving"] == [3]
    assert loaded_versions(triton, served) == [3]
    with Scorer(settings, model_name=served, model_version=1, retries=0, timeout_s=2) as sc:
        assert not sc.ready()
        r = sc.score(x["sparse_ids"], x["dense"])
        assert r.degraded and r.model_version == ""  # v1 is gone: the fallback, never v3

    # pinning a version that is on disk but unloaded loads it next to the served one
    pin = pin_versions(settings, base, [2], owner=f"exp2-{unique}")
    assert pin["loaded"] == [2, 3] and loaded_versions(triton, served) == [2, 3]
    assert read_served(settings)["models"][served]["versions"] == [2, 3]
    unpin(settings, f"exp2-{unique}")


def test_pinned_versions_are_never_pruned(settings, tmp_path, unique):
    base = f"ctr_prune{unique}"
    served = served_model_name(settings, base)
    onnx = _lr_onnx(tmp_path / "m.onnx", seed=1)
    publish(settings, onnx, base, load=False)
    pin_versions(settings, base, [1], owner=f"exp-{unique}", load=False)
    for _ in range(3):
        publish(settings, onnx, base, load=False, keep=2)
    repo = settings.triton.model_repository
    assert versions_on_disk(repo / served) == [1, 3, 4]  # v2 pruned, the pinned v1 kept
    assert "versions: [ 1, 4 ]" in (repo / served / "config.pbtxt").read_text()
    unpin(settings, f"exp-{unique}")


def test_scorer_version_must_be_a_version_number(settings):
    for bad in (0, -1, "2", 1.5, True):
        with pytest.raises(ValueError, match="model_version"):
            AsyncScorer(settings, model_name="x_py", model_version=bad)  # type: ignore[arg-type]


def test_a_restarted_triton_serves_the_pinned_versions_again(settings, tmp_path, unique):
    priv = settings.model_copy(
        update={
            "triton": settings.triton.model_copy(
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
    triton.name = f"triton-pins-{unique}"  # its own PID file and folder in the run dir
    base = f"ctr_rs{unique}"
    pids: list[int] = []
    try:
        triton.start()
        pids.append(triton.pid())
        publish(priv, _lr_onnx(tmp_path / "a.onnx", seed=5), base)
        pin_versions(priv, base, [1], owner="exp-restart")
        publish(priv, _lr_onnx(tmp_path / "b.onnx", seed=6), base)
        served = served_model_name(priv, base)
        triton.stop()
        triton.start()
        pids.append(triton.pid())
        c = grpcclient.InferenceServerClient(priv.triton.grpc_url)
        try:  # nobody loaded anything but the restart, from the served record
            assert loaded_versions(c, served) == [1, 2]
            assert c.is_model_ready(served, "1") and c.is_model_ready(served, "2")
        finally:
            c.close()
    finally:
        triton.stop()
        for pid in pids:
            if pid is not None:
                try:
                    os.killpg(pid, signal.SIGKILL)  # backend stubs left in its group
                except ProcessLookupError:
                    pass
