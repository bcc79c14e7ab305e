"""The online learner (``ctrstream.models.online``): River-style, learns in the given order,
leaves the model it started from alone, refuses bad input with a clear error."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

from ctrstream import features as F
from ctrstream.metrics import log_loss
from ctrstream.models import online
from ctrstream.models.nets import build
from ctrstream.models.online import OnlineLearner, OnlineLearnerError


def _rows(n: int, seed: int, p_hot: float, p_cold: float = 0.02):
    """Rows whose only signal is field 0's id (0 or 1): id 1 clicks with ``p_hot``."""
    rng = np.random.default_rng(seed)
    sparse = np.tile(np.arange(F.N_SPARSE) * F.HASH_BUCKETS, (n, 1)).astype(np.int64)
    sparse[:, 0] += rng.integers(0, 2, n)
    dense = rng.normal(0, 1, (n, F.N_DENSE)).astype(np.float32)
    p = np.where(sparse[:, 0] == 1, p_hot, p_cold)
    y = (rng.random(n) < p).astype(np.int8)
    return sparse, dense, y, p


def test_docstring_example_runs() -> None:
    result = doctest.testmod(online)
    assert result.attempted > 0 and result.failed == 0


def test_learning_lowers_the_loss_and_leaves_the_start_model_alone() -> None:
    torch.manual_seed(0)
    start = build("lr")
    before = start.weights.weight.detach().clone()
    learner = OnlineLearner(start, lr=0.05, sparse_lr=0.05, batch_size=500)
    sparse, dense, y, _ = _rows(20_000, seed=1, p_hot=0.3)
    test_s, test_d, test_y, _ = _rows(5_000, seed=2, p_hot=0.3)
    loss0 = log_loss(learner.predict_many(test_s, test_d), test_y)
    learner.learn_many(sparse, dense, y)
    loss1 = log_loss(learner.predict_many(test_s, test_d), test_y)
    assert loss1 < loss0 - 0.01
    assert learner.n_seen == 20_000 and learner.n_steps == 40  # one step per micro-batch
    assert torch.equal(start.weights.weight, before)  # learned on a copy
    in_place = OnlineLearner(start, copy=False)
    in_place.learn_many(sparse[:100], dense[:100], y[:100])
    assert not torch.equal(start.weights.weight, before)


def test_deterministic_and_one_row_calls_match_many() -> None:
    sparse, dense, y, _ = _rows(3_000, seed=3, p_hot=0.2)
    torch.manual_seed(0)
    net = build("deep", embed_dim=4, cross_layers=1, low_rank=4, mlp_dims=(16,))
    a, b = OnlineLearner(net, batch_size=256), OnlineLearner(net, batch_size=256)
    a.learn_many(sparse, dense, y)
    b.learn_many(sparse, dense, y)
    pa, pb = a.predict_many(sparse[:50], dense[:50]), b.predict_many(sparse[:50], dense[:50])
    assert np.array_equal(pa, pb)
    assert a.predict_one(sparse[7], dense[7]) == pytest.approx(pa[7], rel=1e-6)
    c, d = OnlineLearner(net, batch_size=1), OnlineLearner(net, batch_size=1)
    for i in range(5):
        c.learn_one(sparse[i], dense[i], int(y[i]))
    d.learn_many(sparse[:5], dense[:5], y[:5])
    assert c.n_steps == d.n_steps == 5
    assert np.allclose(
        c.predict_many(sparse[:50], dense[:50]), d.predict_many(sparse[:50], dense[:50])
    )


def test_continuing_tracks_a_shift_a_frozen_model_misses() -> None:
    """Before: id 1 clicks at 5 %; after: at 30 %. The learner continued on the new rows
    predicts the new rate; the model it started from still predicts the old one."""
    sparse, dense, y, _ = _rows(30_000, seed=4, p_hot=0.05)
    dense[:] = 0.0
    first = OnlineLearner(build("lr"), lr=0.05, sparse_lr=0.05, batch_size=1000)
    first.learn_many(sparse, dense, y)
    frozen = first.snapshot()
    cont = OnlineLearner(frozen, lr=0.05, sparse_lr=0.05, batch_size=1000)
    s2, d2, y2, p2 = _rows(30_000, seed=5, p_hot=0.30)
    d2[:] = 0.0
    cont.learn_many(s2, d2, y2)
    hot = s2[:, 0] == 1
    from ctrstream.models.training import predict

    p_frozen = predict(frozen, s2, d2)
    p_cont = cont.predict_many(s2, d2)
    assert p_frozen[hot].mean() < 0.1
    assert abs(p_cont[hot].mean() - 0.30) < 0.05
    assert log_loss(p_cont, y2) < log_loss(p_frozen, y2)


def test_down_sampled_model_stays_calibrated_while_learning_every_row() -> None:
    """The loss is on the full-scale logit (with the model's down-sampling offset)."""
    sparse, dense, y, p = _rows(40_000, seed=6, p_hot=0.1)
    dense[:] = 0.0
    net = build("lr")
    net.set_negative_sampling_rate(0.1)
    learner = OnlineLearner(net, lr=0.05, sparse_lr=0.05, batch_size=1000)
    learner.learn_many(sparse, dense, y)
    pred = learner.predict_many(sparse[-5000:], dense[-5000:])
    assert pred.mean() == pytest.approx(p[-5000:].mean(), rel=0.25)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s, d, y: (s[:, :3], d, y), "sparse must have shape"),
        (lambda s, d, y: (s, d[:, :5], y), "dense must have shape"),
        (lambda s, d, y: (s[:-1], d, y), "rows but dense has"),
        (lambda s, d, y: (s.astype(np.float64), d, y), "must be integers"),
        (lambda s, d, y: (s - 10**9, d, y), "sparse ids must be in"),
        (lambda s, d, y: (s, np.full_like(d, np.nan), y), "NaN"),
        (lambda s, d, y: (s, d, y + 2), "labels must be 0"),
        (lambda s, d, y: (s, d, y[:-1]), "one label per row"),
    ],
)
def test_bad_input_is_refused_clearly(change, message: str) -> None:
    sparse, dense, y, _ = _rows(10, seed=7, p_hot=0.5)
    learner = OnlineLearner(build("lr"))
    with pytest.raises(OnlineLearnerError, match=message):
        learner.learn_many(*change(sparse, dense, y))
    assert learner.n_seen == 0


def test_bad_construction_is_refused_clearly() -> None:
    with pytest.raises(OnlineLearnerError, match="nets' models"):
        OnlineLearner(torch.nn.Linear(3, 1))  # type: ignore[arg-type]
    with pytest.raises(OnlineLearnerError, match="batch_size"):
        OnlineLearner(build("lr"), batch_size=0)
    with pytest.raises(OnlineLearnerError, match="learning rates"):
        OnlineLearner(build("lr"), lr=-1.0)
    with pytest.raises(OnlineLearnerError, match="unknown model kind"):
        OnlineLearner.cold("gbdt")
    assert OnlineLearner.cold("lr").kind == "lr"
