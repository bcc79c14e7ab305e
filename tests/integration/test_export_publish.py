"""ONNX export parity, publishing into the Triton repository and the live version switch.

Triton is the session stack's real server (explicit model control, Python backend); the
models are small DCN-v2 / LR networks with random weights (training is covered elsewhere).
"""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
import torch

from ctrstream import features
from ctrstream.models.export import ParityError, check_parity, export_onnx
from ctrstream.models.nets import DCNv2, HashedLogisticRegression
from ctrstream.models.onnx_runtime import ort_predict, ort_session, random_inputs
from ctrstream.models.publish import (
    PublishError,
    infer,
    loaded_versions,
    publish,
    served_model_name,
    versions_on_disk,
)


def small_dcn(seed: int) -> DCNv2:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    m = DCNv2(
        embed_dim=4,
        cross_layers=2,
        mlp_dims=(32, 16),
        dense_mean=rng.normal(0, 1, features.N_DENSE),
        dense_std=rng.uniform(0.5, 2.0, features.N_DENSE),
    )
    with torch.no_grad():  # spread the outputs so that two models' scores are far apart
        m.embedding.weight.normal_(0, 0.3)
        m.head.bias.fill_(1.0)
    m.set_negative_sampling_rate(0.25)
    return m.eval()


class FrozenCounter(HashedLogisticRegression):
    """A model whose exported graph is not the model: tracing freezes a Python counter that
    the eager model keeps changing, so ONNX and PyTorch disagree on every later call."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, sparse_ids, dense):
        self.calls += 1
        return torch.sigmoid(super().logit_raw(sparse_ids, dense) + 0.1 * self.calls)


# --------------------------------------------------------------------------- export


def test_export_has_contract_io_dynamic_batch_and_parity(tmp_path):
    m = small_dcn(1)
    res = export_onnx(m, tmp_path / "m.onnx")
    assert res["parity_max_abs_diff"] <= 1e-5
    g = onnx.load(str(tmp_path / "m.onnx")).graph
    io = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(g.input) + list(g.output)
    }
    assert io[features.INPUT_SPARSE] == ["batch", features.N_SPARSE]
    assert io[features.INPUT_DENSE] == ["batch", features.N_DENSE]
    assert io[features.OUTPUT_PROB] == ["batch", 1]
    # normalization and the down-sampling offset are inside the graph: the ONNX output
    # equals the eager model's probability, which includes both
    x = random_inputs(33, seed=99)
    want = m(torch.from_numpy(x["sparse_ids"]), torch.from_numpy(x["dense"])).detach().numpy()
    got = ort_predict(ort_session(tmp_path / "m.onnx"), x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.ptp(got) > 0.05  # the probe really exercises the model


def test_parity_check_rejects_a_graph_that_is_not_the_model(tmp_path):
    a, b = small_dcn(1), small_dcn(2)
    export_onnx(a, tmp_path / "a.onnx")
    with pytest.raises(ParityError, match="disagree"):
        check_parity(b, tmp_path / "a.onnx")
    path = tmp_path / "frozen.onnx"
    with pytest.raises(ParityError):
        export_onnx(FrozenCounter(), path)
    assert not path.exists()  # a failed export leaves no file to publish by mistake


# --------------------------------------------------------------------------- publishing


@pytest.fixture
def triton(settings):
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(settings.triton.grpc_url)
    yield c
    c.close()


def test_publish_serves_the_same_scores_as_onnxruntime(settings, triton, tmp_path, unique):
    base = f"ctr_t{unique}"
    m = small_dcn(3)
    export_onnx(m, tmp_path / "m.onnx")
    res = publish(settings, tmp_path / "m.onnx", base, card={"name": base})
    served = served_model_name(settings, base)
    assert res["model_name"] == served == base + "_py"  # the local stack loads the Python flavour
    assert res["version"] == 1 and res["previous"] == []
    assert loaded_versions(triton, served) == [1]

    repo = settings.triton.model_repository
    prod = (repo / base / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in prod and "KIND_GPU" in prod
    assert "dynamic_batching" in prod and "max_batch_size: 8192" in prod
    local = (repo / served / "config.pbtxt").read_text()
    assert 'backend: "python"' in local and "KIND_CPU" in local
    assert "versions: [ 1 ]" in local
    for d in (repo / base / "1", repo / served / "1"):
        assert (d / "model.onnx").read_bytes() == (tmp_path / "m.onnx").read_bytes()
    assert (repo / served / "1" / "model.py").exists()

    x = random_inputs(300, seed=5)
    want = ort_predict(ort_session(tmp_path / "m.onnx"), x)
    got_unpinned = infer(triton, served, x)
    got_pinned = infer(triton, served, x, version=1)
    np.testing.assert_allclose(got_unpinned, want, atol=1e-6)
    np.testing.assert_allclose(got_pinned, want, atol=1e-6)

    # requests that arrive together are batched into one ONNX Runtime run and split back
    results, errors = {}, []

    def one(i):
        try:
            xi = random_inputs(1 + i, seed=100 + i)
            results[i] = (
                infer(triton, served, xi),
                ort_predict(ort_session(tmp_path / "m.onnx"), xi),
            )
        except Exception as e:  # noqa: BLE001 - a thread's failure of any kind is reported below  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, (got, want) in results.items():
        assert got.shape == (1 + i, 1)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_publish_rejects_a_file_that_breaks_the_contract(settings, tmp_path, unique):
    class Wrong(torch.nn.Module):
        def forward(self, x):
            return x

    torch.onnx.export(
        Wrong(),
        (torch.zeros(2, 3),),
        str(tmp_path / "w.onnx"),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
    )
    with pytest.raises(PublishError, match="contract"):
        publish(settings, tmp_path / "w.onnx", f"ctr_w{unique}")
    assert versions_on_disk(settings.triton.model_repository / f"ctr_w{unique}_py") == []


def test_live_version_switch_loses_no_request(settings, triton, tmp_path, unique):
    base = f"ctr_s{unique}"
    served = served_model_name(settings, base)
    old_m, new_m = small_dcn(10), small_dcn(11)
    export_onnx(old_m, tmp_path / "old.onnx")
    export_onnx(new_m, tmp_path / "new.onnx")
    x = random_inputs(64, seed=21)
    old_p = ort_predict(ort_session(tmp_path / "old.onnx"), x)
    new_p = ort_predict(ort_session(tmp_path / "new.onnx"), x)
    assert np.max(np.abs(old_p - new_p)) > 1e-2  # the two versions are distinguishable

    assert publish(settings, tmp_path / "old.onnx", base)["version"] == 1

    log: list[str] = []  # "old" | "new" | "other" | "error: ..." per request, in order
    stop = threading.Event()
    got_enough = threading.Condition()

    def traffic():
        import tritonclient.grpc as grpcclient

        c = grpcclient.InferenceServerClient(settings.triton.grpc_url)
        try:
            while not stop.is_set():
                try:
                    p = infer(c, served, x, timeout_s=30)
                    kind = (
                        "old"
                        if np.allclose(p, old_p, atol=1e-6)
                        else "new"
                        if np.allclose(p, new_p, atol=1e-6)
                        else "other"
                    )
                except Exception as e:  # noqa: BLE001 - any failed request is logged as an error and asserted on
                    kind = f"error: {e}"
                with got_enough:
                    log.append(kind)
                    got_enough.notify_all()
        finally:
            c.close()

    th = threading.Thread(target=traffic, daemon=True)
    th.start()
    try:
        with got_enough:
            assert got_enough.wait_for(lambda: len(log) >= 20, timeout=60)
        res = publish(settings, tmp_path / "new.onnx", base)
        n_at_switch = len(log)
        with got_enough:  # traffic keeps flowing after the switch
            assert got_enough.wait_for(lambda: len(log) >= n_at_switch + 20, timeout=60)
    finally:
        stop.set()
        th.join(timeout=60)

    assert res["version"] == 2 and res["previous"] == [1]
    assert loaded_versions(triton, served) == [2]  # the old version is unloaded
    errors = [k for k in log if k not in ("old", "new")]
    assert errors == [], errors[:5]
    # responses move from the old version's scores to the new one's, once, for good
    first_new = log.index("new")
    assert first_new >= 20 and set(log[:first_new]) == {"old"}
    assert set(log[first_new:]) == {"new"}
    assert set(log[n_at_switch:]) == {"new"}


def test_publishing_needs_no_torch(stack_env, settings, tmp_path, unique):
    """``ctrstream publish`` in an image built without the ``train`` extra: with PyTorch
    unimportable, the command line loads and a model is published, verified on Triton
    against in-process ONNX Runtime, and served."""
    import subprocess
    import sys

    export_onnx(small_dcn(4), tmp_path / "m.onnx")
    base = f"ctr_nt{unique}"
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed (the lean image)")
sys.meta_path.insert(0, NoTorch())
from ctrstream.__main__ import app  # the whole command line loads without torch
from ctrstream.config import get_settings
from ctrstream.models.publish import publish
res = publish(get_settings(), {str(tmp_path / "m.onnx")!r}, {base!r})
assert "torch" not in sys.modules
print(res["model_name"], res["version"], res["verify_max_abs_diff"])
"""
    out = subprocess.run(
        [sys.executable, "-c", script], env=stack_env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    name, version, diff = out.stdout.split()
    assert name == served_model_name(settings, base) and version == "1" and float(diff) <= 1e-5
