"""The continuous learner as a closed-loop arm (``ctrstream.loop.online_arm``): it learns a
shown impression only once its attribution window has closed, with the join's label."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ctrstream import features as F
from ctrstream.loop.online_arm import OnlineArm
from ctrstream.models.nets import build
from ctrstream.models.online import OnlineLearner
from ctrstream.store.reader import FeatureRead

W = 1_800_000  # the attribution window


def _impressions(n: int, t0: int, seed: int, p_hot: float):
    rng = np.random.default_rng(seed)
    t = t0 + np.sort(rng.integers(0, 600_000, n))
    sparse = np.tile(np.arange(F.N_SPARSE) * F.HASH_BUCKETS, (n, 1)).astype(np.int64)
    sparse[:, 0] += rng.integers(0, 2, n)
    dense = np.zeros((n, F.N_DENSE), dtype=np.float32)
    clicked = rng.random(n) < np.where(sparse[:, 0] == 1, p_hot, 0.02)
    click_t = np.where(clicked, t + rng.integers(1_000, 60_000, n), -1)
    return t, sparse, dense, clicked, click_t


class _Store:
    """Window counts from the ad id alone (no Redis)."""

    def read_columns(self, cols: dict, t_ms: int) -> FeatureRead:
        ad = np.asarray(cols["ad_id"])
        counts = np.zeros((len(ad), len(F.ENTITIES), F.N_WINDOWS, 2), dtype=np.int64)
        counts[..., 0] = 1000
        counts[..., 1] = (5 * (ad % 7))[:, None, None]
        return FeatureRead(counts, t_ms, None, None, None)


def _requests(n: int, m: int = 6, seed: int = 1) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    off = np.arange(n + 1, dtype=np.int64) * m
    ad = rng.integers(0, 200, n * m)
    return SimpleNamespace(
        request_id=np.array([f"q{k:012d}" for k in range(n)], dtype=object),
        event_time_ms=np.sort(1_768_435_200_000 + rng.integers(0, 150_000, n)),
        user_id=rng.integers(0, 1000, n),
        site_id=rng.integers(0, 20, n),
        device_type=np.array(["mobile", "desktop"], dtype=object)[rng.integers(0, 2, n)],
        country=np.array(["US", "DE"], dtype=object)[rng.integers(0, 2, n)],
        n_slots=rng.integers(1, 4, n),
        cand_offsets=off,
        cand_ad_id=ad,
        cand_campaign_id=ad // 2,
        cand_advertiser_id=ad // 10,
        cand_ad_category=ad % 7,
        cand_bid=rng.lognormal(0, 0.3, n * m),
        cand_new=np.zeros(n * m, dtype=bool),
    )


def _arm() -> OnlineArm:
    return OnlineArm(OnlineLearner(build("lr"), lr=0.05, sparse_lr=0.05, batch_size=500), W)


def test_learns_only_final_labels_in_time_order() -> None:
    arm = _arm()
    t, s, d, c, ct = _impressions(2_000, 0, seed=1, p_hot=0.3)
    arm.observe(t, s, d, c, ct)
    assert arm.advance(W - 1) == 0 and arm.pending == 2_000  # nothing final yet
    k = arm.advance(int(t[999]) + W)
    assert k == int((t <= t[999]).sum()) and arm.learner.n_seen == k
    assert arm.pending == 2_000 - k
    assert arm.advance(int(t[-1]) + W) == 2_000 - k and arm.pending == 0
    with pytest.raises(ValueError, match="time order"):
        arm.observe(t[:1], s[:1], d[:1], c[:1], ct[:1])
    with pytest.raises(ValueError, match="one row per impression"):
        arm.observe(t, s[:-1], d, c, ct)


def test_late_clicks_are_negatives_like_the_join() -> None:
    arm = _arm()
    t = np.array([0, 0], dtype=np.int64)
    s = np.tile(np.arange(F.N_SPARSE) * F.HASH_BUCKETS, (2, 1)).astype(np.int64)
    d = np.zeros((2, F.N_DENSE), dtype=np.float32)
    arm.observe(t, s, d, np.array([True, True]), np.array([W, W + 1]))
    assert arm._label[0].tolist() == [1, 0]


def test_the_arm_ranks_with_what_it_learned() -> None:
    arm = _arm()
    r = arm.ranker("online")
    assert r.kind == "model" and r.calibrate is None and r.score is not None
    t, s, d, c, ct = _impressions(20_000, 0, seed=2, p_hot=0.3)
    hot = s[:, 0] == 1
    before = r.score(s[:200], d[:200])
    assert before.model_version == "online-0" and not before.degraded
    arm.observe(t, s, d, c, ct)
    arm.advance(int(t[-1]) + W)
    after = r.score(s, d)
    assert after.model_version == f"online-{arm.learner.n_steps}"
    assert after.raw[hot].mean() > 3 * after.raw[~hot].mean()


def test_the_ad_server_hands_the_arm_the_shown_impressions_inputs() -> None:
    """With ``keep_inputs`` the decisions carry each shown impression's model inputs at its
    slot - the rows the arm scored there - and the arm learns from them once final."""
    from ctrstream.serving.adserver import AdServer
    from ctrstream.serving.auction import AuctionConfig

    arm = _arm()
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def spy(sparse: np.ndarray, dense: np.ndarray):
        calls.append((sparse.copy(), dense.copy()))
        return arm.score(sparse, dense)

    ranker = arm.ranker("online")
    ranker.score = spy
    batch = _requests(40)
    server = AdServer(None, _Store(), AuctionConfig(explore_share=0.0))
    d = server.decide(batch, np.zeros(40, np.int64), {"online": ranker}, keep_inputs=True)
    assert d.inputs is not None
    sparse, dense = d.inputs
    assert sparse.shape == (len(d), F.N_SPARSE) and dense.shape == (len(d), F.N_DENSE)
    # the second scoring call is the shown impressions at their slots: the same inputs
    np.testing.assert_array_equal(calls[1][0], sparse)
    np.testing.assert_array_equal(calls[1][1], dense)
    assert server.decide(batch, np.zeros(40, np.int64), {"online": ranker}).inputs is None
    t = batch.event_time_ms[d.request_index]
    clicked = np.zeros(len(d), dtype=bool)
    clicked[::3] = True
    arm.observe(t, sparse, dense, clicked, np.where(clicked, t + 5_000, -1))
    assert arm.advance(int(t.max()) + W) == len(d) and arm.learner.n_seen == len(d)


def test_a_saved_arm_continues_exactly_where_it_stopped(tmp_path) -> None:
    """The loop's checkpoint of an online arm (net, optimizer moments, counters, the rows
    waiting for their labels) restores a learner that continues as if never stopped."""
    t, s, d, c, ct = _impressions(6_000, 0, seed=3, p_hot=0.3)
    half = 3_000
    straight, resumed = _arm(), _arm()
    for arm in (straight, resumed):
        arm.observe(t[:half], s[:half], d[:half], c[:half], ct[:half])
        arm.advance(int(t[1_000]) + W)  # some learned, the rest pending
    resumed.save(tmp_path / "online.pt")
    fresh = _arm()
    fresh.load(tmp_path / "online.pt")
    assert fresh.pending == resumed.pending > 0
    assert fresh.learner.n_seen == resumed.learner.n_seen > 0
    assert fresh.learned_until_ms == resumed.learned_until_ms
    assert fresh.version == resumed.version
    for arm in (straight, fresh):
        arm.observe(t[half:], s[half:], d[half:], c[half:], ct[half:])
        arm.advance(int(t[-1]) + W)
    assert fresh.learner.n_seen == straight.learner.n_seen == 6_000
    np.testing.assert_allclose(
        fresh.learner.predict_many(s, d), straight.learner.predict_many(s, d), rtol=1e-6
    )
    # the optimizer's moments came back too: a learner with the net only drifts apart
    net_only = _arm()
    net_only.learner.net.load_state_dict(resumed.learner.net.state_dict())
    net_only.observe(t[half:], s[half:], d[half:], c[half:], ct[half:])
    net_only.advance(int(t[-1]) + W)
    assert not np.allclose(net_only.learner.predict_many(s, d), fresh.learner.predict_many(s, d))


def test_a_saved_arm_refuses_another_window_or_net(tmp_path) -> None:
    arm = _arm()
    arm.save(tmp_path / "online.pt")
    other = OnlineArm(OnlineLearner(build("lr"), batch_size=500), W + 1)
    with pytest.raises(ValueError, match="attribution window"):
        other.load(tmp_path / "online.pt")
    deep = OnlineArm(OnlineLearner.cold("deep"), W)
    with pytest.raises(ValueError, match="restore it into a learner built the same way"):
        deep.load(tmp_path / "online.pt")


def test_an_online_arm_starts_cold_or_from_a_training_runs_checkpoint(tmp_path) -> None:
    """``online_learner``: ``lr``/``deep`` cold, ``ctr_lr`` the newest training run's torch
    checkpoint (the net the served model was exported from), or a ``.pt`` path."""
    import torch

    from ctrstream.loop.session import SessionError
    from ctrstream.loop.wiring import online_learner
    from ctrstream.models.training import save_checkpoint

    settings = SimpleNamespace(data_dir=tmp_path)
    assert online_learner(settings, "deep").kind == "deep"
    cold = online_learner(settings, "lr")
    assert cold.kind == "lr" and cold.n_seen == 0
    with pytest.raises(SessionError, match="run `ctrstream train` first"):
        online_learner(settings, "ctr_lr")
    net = build("lr")
    with torch.no_grad():
        net.weights.weight.normal_(0, 0.5)
    run = tmp_path / "models" / "20260101-000000"
    save_checkpoint(net, run / "lr" / "checkpoint.pt")
    (tmp_path / "models" / "LATEST").write_text(run.name)
    s = np.tile(np.arange(F.N_SPARSE) * F.HASH_BUCKETS, (4, 1)).astype(np.int64)
    s[:, 0] += np.arange(4)
    d = np.zeros((4, F.N_DENSE), dtype=np.float32)
    want = net.eval()(torch.from_numpy(s), torch.from_numpy(d)).detach().double().numpy()
    for base in ("ctr_lr", str(run / "lr" / "checkpoint.pt")):
        np.testing.assert_allclose(online_learner(settings, base).predict_many(s, d), want.ravel())
    with pytest.raises(SessionError, match="has no"):
        online_learner(settings, "ctr_deep")
    with pytest.raises(SessionError, match="neither a cold start"):
        online_learner(settings, "ctr_xyz")
