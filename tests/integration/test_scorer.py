"""The streaming scorer (Bytewax) against real Kafka, Redis and Triton with a published model."""

from __future__ import annotations

import numpy as np
import pytest
import redis
import torch

from ctrstream import features as F
from ctrstream.calibration.params import logit, sigmoid
from ctrstream.events import Impression, decode_prediction, encode
from ctrstream.kafka.clients import make_consumer, make_producer
from ctrstream.store import layout as L
from ctrstream.store.calibration import CalibrationStore

T0 = 1_768_435_200_000 + 10 * F.MINUTE_MS  # a day no other test of this suite writes
N = 400


def _impressions(unique):
    rng = np.random.default_rng(2)
    out = []
    for k in range(N):
        ad = int(rng.integers(0, 50))
        out.append(
            Impression(
                schema_version=1,
                impression_id=f"{unique}-{k}",
                event_time_ms=T0 + k * 1000,
                user_id=int(rng.integers(0, 1000)),
                ad_id=ad,
                campaign_id=ad // 2,
                advertiser_id=ad // 10,
                site_id=int(rng.integers(0, 20)),
                ad_category=ad % 7,
                device_type="mobile",
                country="US",
                position=int(rng.integers(0, 5)),
            )
        )
    # the same impression twice, before and after the speed view gets counts for its ad
    twin = dict(
        user_id=7,
        ad_id=999,
        campaign_id=499,
        advertiser_id=99,
        site_id=3,
        ad_category=1,
        device_type="desktop",
        country="DE",
        position=0,
        schema_version=1,
    )
    out.append(Impression(impression_id=f"{unique}-before", event_time_ms=T0 + 60_000, **twin))
    out.append(
        Impression(impression_id=f"{unique}-after", event_time_ms=T0 + 3 * F.MINUTE_MS + 5, **twin)
    )
    return out


@pytest.fixture(scope="module")
def published(settings, tmp_path_factory):
    import tritonclient.grpc as grpcclient

    from ctrstream.models.export import export_onnx
    from ctrstream.models.nets import HashedLogisticRegression
    from ctrstream.models.publish import publish

    torch.manual_seed(0)
    m = HashedLogisticRegression()
    with torch.no_grad():
        m.weights.weight.normal_(0, 0.3)
        m.dense.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("scorer") / "m.onnx"
    export_onnx(m.eval(), path)
    res = publish(settings, path, "ctr_scorer_test")
    client = grpcclient.InferenceServerClient(settings.triton.grpc_url)
    yield res
    client.close()


def _read_predictions(settings, n, timeout=60):
    c = make_consumer(settings, group_id=f"read-{settings.topics.predictions.name}")
    c.subscribe([settings.topics.predictions.name])
    out = []
    try:
        import time

        end = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < end:
            for msg in c.consume(num_messages=1000, timeout=0.5):
                if not msg.error():
                    assert msg.key().decode() == decode_prediction(msg.value()).impression_id
                    out.append(decode_prediction(msg.value()))
    finally:
        c.close()
    return out


def _run(settings, model_name, batch_size=128):
    from bytewax.testing import run_main

    from ctrstream.serving.scorer import BatchScorer, build_flow
    from ctrstream.serving.triton_client import Scorer

    scorer = Scorer(settings, model_name=model_name, max_rows=batch_size)
    bs = BatchScorer(settings, model_name=model_name, batch_size=batch_size, scorer=scorer)
    try:
        run_main(build_flow(settings, batch_size=batch_size, stop_at_end=True, batch_scorer=bs))
    finally:
        scorer.close()


def test_scorer_scores_every_impression_calibrated_then_degrades(fresh_topics, published, unique):
    s = fresh_topics
    r = redis.Redis.from_url(s.redis.url)
    mv = str(published["version"])
    # a calibrator for the served version: intercept -1 on the logit
    params = {
        "method": "platt",
        "platt": {
            "intercept": -1.0,
            "w_logit": 1.0,
            "context": {},
            "context_names": [],
            "context_mean": {},
        },
    }
    # keyed by the model's base name and version: what the scorer writes on each prediction
    CalibrationStore(r).publish_params(L.calibrator_id(published["base_name"], mv), params)
    # the speed view: ad 999 got 100 impressions, 40 clicks in the minute after T0+1min
    b = (T0 + 2 * F.MINUTE_MS) // F.MINUTE_MS
    sl = L.speed_layout()
    for t, n in (("i", 100), ("c", 40)):
        r.hset(*sl.cell_address("ad", "999", "5m", t, b), n)

    imps = _impressions(unique)
    prod = make_producer(s)
    for ev in imps:
        prod.produce(s.topics.impressions.name, key=ev.impression_id.encode(), value=encode(ev))
    prod.produce(s.topics.impressions.name, key=b"bad", value=b"{not json")
    assert prod.flush(30) == 0

    _run(s, published["model_name"])
    preds = {p.impression_id: p for p in _read_predictions(s, len(imps))}
    assert set(preds) == {e.impression_id for e in imps}  # N in, N out (the bad one skipped)
    ps = list(preds.values())
    assert not any(p.degraded for p in ps)
    assert {p.model_version for p in ps} == {mv}
    assert {p.model_name for p in ps} == {published["base_name"]}  # not the flavour's name
    raw = np.array([p.raw_score for p in ps])
    assert np.ptp(raw) > 0.05  # real model scores, not a constant
    np.testing.assert_allclose(
        [p.calibrated_score for p in ps], sigmoid(logit(raw) - 1.0), rtol=1e-5
    )
    assert all(p.event_time_ms == e.event_time_ms for e in imps for p in [preds[e.impression_id]])
    # features as of the event time: the twin after the counts landed scores differently
    before, after = preds[f"{unique}-before"], preds[f"{unique}-after"]
    assert abs(before.raw_score - after.raw_score) > 1e-4

    # Triton loses the model: predictions keep flowing, degraded, with the fallback score
    from ctrstream.models.publish import control_client

    c = control_client(s)  # model control needs the stack's key
    c.unload_model(published["model_name"])
    try:
        import msgspec

        from ctrstream.config import Topic
        from ctrstream.kafka.clients import ensure_topics

        more = [msgspec.structs.replace(e, impression_id=e.impression_id + "-2") for e in imps[:50]]
        t = s.topics
        s2 = s.model_copy(
            update={
                "topics": t.model_copy(
                    update={
                        name: Topic(
                            name=getattr(t, name).name + "-2",
                            partitions=getattr(t, name).partitions,
                        )
                        for name in ("impressions", "predictions")
                    }
                )
            }
        )
        ensure_topics(s2, [s2.topics.impressions, s2.topics.predictions])
        prod2 = make_producer(s2)
        for ev in more:
            prod2.produce(
                s2.topics.impressions.name, key=ev.impression_id.encode(), value=encode(ev)
            )
        assert prod2.flush(30) == 0
        _run(s2, published["model_name"])
        got = {p.impression_id: p for p in _read_predictions(s2, len(more))}
        deg = [got[e.impression_id] for e in more]
        assert len(deg) == 50 and all(p.degraded for p in deg)
        # fallback = the ad's smoothed historical CTR: the prior mean without counts
        assert all(abs(p.raw_score - F.PRIOR.mean) < 1e-6 for p in deg)
        assert all(p.model_version == "" for p in deg)
        assert all(p.calibrated_score == p.raw_score for p in deg)
    finally:
        c.load_model(published["model_name"])
        c.close()
