"""The Triton scoring client against the real Triton of the test stack."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from ctrstream import features as F
from ctrstream.bench.api import write_demo_model
from ctrstream.features import historical_ctr
from ctrstream.models.publish import control_client
from ctrstream.serving.triton_client import AsyncScorer, Scorer, fallback_scores
from ctrstream.stack.services import free_port

W = np.linspace(-0.05, 0.05, F.N_DENSE).astype(np.float32)


def _expected(dense: np.ndarray, bias: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(dense.astype(np.float64) @ W.astype(np.float64) + bias)))


def _rows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 500, (n, len(F.ENTITIES), F.N_WINDOWS, 2))
    counts[..., 1] = np.minimum(counts[..., 1], counts[..., 0] // 5)
    sparse = F.sparse_ids(
        {
            "user_id": rng.integers(0, 99, n),
            "ad_id": rng.integers(0, 99, n),
            "campaign_id": np.ones(n, int),
            "advertiser_id": np.ones(n, int),
            "site_id": np.ones(n, int),
            "ad_category": np.ones(n, int),
            "device_type": np.array(["mobile"] * n),
            "country": np.array(["US"] * n),
            "position": np.zeros(n, int),
            "event_time_ms": np.full(n, 10**12),
        }
    )
    return sparse, F.dense_from_counts(counts), counts


@pytest.fixture(scope="module")
def model(settings):
    name = "tc_demo_py"
    write_demo_model(settings.triton.model_repository, name, version=1, weights=W, bias=-1.0)
    client = control_client(settings)  # model control needs the stack's key
    client.load_model(name)
    yield name, client
    try:
        client.unload_model(name)
    finally:
        client.close()


def test_scores_in_batches_match_the_model_and_report_the_version(settings, model):
    name, _ = model
    sparse, dense, _ = _rows(23)

    async def go():
        scorer = AsyncScorer(settings, model_name=name, max_rows=5)
        try:
            return await scorer.score(sparse, dense)
        finally:
            await scorer.close()

    res = asyncio.run(go())
    assert not res.degraded and res.error is None
    assert res.model_version == "1" and res.model_name == name
    assert res.attempts == 5  # 23 rows in requests of at most 5
    np.testing.assert_allclose(res.raw, _expected(dense, -1.0), rtol=1e-5)
    assert res.raw.dtype == np.float32 and res.raw.shape == (23,)


def test_sync_wrapper_and_a_new_version_is_reported(settings, model):
    name, client = model
    sparse, dense, _ = _rows(40, seed=1)
    with Scorer(settings, model_name=name, max_rows=16) as scorer:
        assert scorer.ready()
        first = scorer.score(sparse, dense)
        assert first.model_version == "1" and not first.degraded
        write_demo_model(settings.triton.model_repository, name, version=2, weights=W, bias=0.5)
        client.load_model(name)  # the default policy serves the latest version
        second = scorer.score(sparse, dense)
    assert second.model_version == "2" and not second.degraded
    np.testing.assert_allclose(second.raw, _expected(dense, 0.5), rtol=1e-5)
    assert not np.allclose(first.raw, second.raw)


def test_unreachable_triton_gives_the_flagged_fallback_within_the_deadline(settings):
    sparse, dense, counts = _rows(12, seed=2)
    counts[3] = 0  # a row without any history: the prior mean
    dense = F.dense_from_counts(counts)
    dead = settings.model_copy(
        update={
            "triton": settings.triton.model_copy(
                update={"grpc_port": free_port(), "timeout_s": 0.5}
            )
        }
    )
    t0 = time.monotonic()
    with Scorer(dead, model_name="whatever_py", retries=2) as scorer:
        res = scorer.score(sparse, dense)
        assert not scorer.ready()
    assert time.monotonic() - t0 < 3.0
    assert res.degraded and res.model_version == "" and "ScoringError" in res.error
    assert 1 <= res.attempts <= 3
    np.testing.assert_allclose(res.raw, historical_ctr(counts), rtol=1e-5)
    assert res.raw[3] == pytest.approx(F.PRIOR.mean)
    np.testing.assert_allclose(fallback_scores(dense), historical_ctr(counts), rtol=1e-5)


def test_unknown_model_is_degraded_not_an_error(settings):
    sparse, dense, counts = _rows(3)
    with Scorer(settings, model_name="no_such_model_py", retries=1) as scorer:
        res = scorer.score(sparse, dense)
    assert res.degraded and "no_such_model_py" in res.error
    assert res.attempts == 2
    np.testing.assert_allclose(res.raw, historical_ctr(counts), rtol=1e-5)


def test_a_slow_model_times_out_into_the_fallback(settings):
    name = "tc_slow_py"
    d = write_demo_model(settings.triton.model_repository, name, version=1, weights=W, bias=0.0)
    src = (d / "1" / "model.py").read_text()
    (d / "1" / "model.py").write_text(
        src.replace(
            "    def execute(self, requests):\n",
            "    def execute(self, requests):\n        import time\n        time.sleep(1.5)\n",
        )
    )
    client = control_client(settings)  # model control needs the stack's key
    client.load_model(name)
    try:
        sparse, dense, counts = _rows(4)
        fast = settings.model_copy(
            update={"triton": settings.triton.model_copy(update={"timeout_s": 0.3})}
        )
        t0 = time.monotonic()
        with Scorer(fast, model_name=name, retries=3) as scorer:
            res = scorer.score(sparse, dense)
        assert time.monotonic() - t0 < 1.2  # the whole call, retries included, within the deadline
        assert res.degraded and res.attempts >= 1
        np.testing.assert_allclose(res.raw, historical_ctr(counts), rtol=1e-5)
    finally:
        client.unload_model(name)
        client.close()


def test_empty_input_and_bad_max_rows(settings, model):
    name, _ = model
    with Scorer(settings, model_name=name) as scorer:
        res = scorer.score(
            np.zeros((0, F.N_SPARSE), np.int64), np.zeros((0, F.N_DENSE), np.float32)
        )
    assert res.raw.shape == (0,) and not res.degraded
    with pytest.raises(ValueError):
        AsyncScorer(settings, model_name=name, max_rows=0)
