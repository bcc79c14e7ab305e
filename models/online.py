"""Continuous training: a CTR net that keeps learning from labelled rows as they arrive.

:class:`OnlineLearner` wraps one of the project's nets (:mod:`ctrstream.models.nets`, the
hashed LR or DCN-v2) and updates it with incremental optimizer steps on micro-batches, in the
order the rows are given - what Google's FTRL system (2013), Facebook's online joiner (2014)
and Monolith do, and what a retraining cadence approximates. It is the same net and the same
optimizers as the batch training loop (:func:`ctrstream.models.training.train`: ``Adam`` for
the dense parameters, ``SparseAdam`` for the embedding tables, its learning rates), so a
learner warm-started from a batch-trained model is that model's training continued one
micro-batch at a time: comparing it with the frozen model isolates what freshness is worth,
not a change of model family.

River-style interface, no I/O: ``predict_many`` / ``predict_one`` give probabilities,
``learn_many`` / ``learn_one`` take labelled rows (``learn_many`` steps once per micro-batch of
at most ``batch_size`` rows, in the given order; ``learn_one`` is one step on one row). Inputs
follow the model I/O contract of :mod:`ctrstream.features`: ``sparse`` int64
``(rows, N_SPARSE)``, ``dense`` float32 ``(rows, N_DENSE)`` raw (the net normalizes them with
the mean/std it carries, which stay fixed), labels 0/1.

The loss is taken on the net's full-scale logit (``logit_raw + logit_offset``): a net trained
with negative down-sampling keeps serving calibrated probabilities while it learns from
every row. The wrapped net is a copy unless ``copy=False``: the model it started from stays
as it was (the frozen model of a comparison).

Example (a hashed LR learning that one sparse id clicks more often)::

    >>> import numpy as np
    >>> from ctrstream import features as F
    >>> from ctrstream.models.nets import build
    >>> from ctrstream.models.online import OnlineLearner
    >>> rng = np.random.default_rng(0)
    >>> n = 4000
    >>> sparse = np.tile(np.arange(F.N_SPARSE) * F.HASH_BUCKETS, (n, 1))
    >>> sparse[:, 0] += rng.integers(0, 2, n)  # field 0: id 0 or id 1
    >>> dense = np.zeros((n, F.N_DENSE), dtype=np.float32)
    >>> y = (rng.random(n) < np.where(sparse[:, 0] == 1, 0.3, 0.02)).astype(np.int8)
    >>> learner = OnlineLearner(build("lr"), batch_size=256, lr=0.1, sparse_lr=0.1)
    >>> for i in range(0, n, 1000):  # rows arriving in time order
    ...     learner.learn_many(sparse[i : i + 1000], dense[i : i + 1000], y[i : i + 1000])
    >>> p = learner.predict_many(sparse, dense)
    >>> bool(p[sparse[:, 0] == 1].mean() > 4 * p[sparse[:, 0] == 0].mean())
    True
    >>> round(learner.predict_one(sparse[0], dense[0]), 2), int(sparse[0, 0])
    (0.32, 1)
    >>> learner.n_seen, learner.n_steps
    (4000, 16)
"""

from __future__ import annotations

import copy as _copy

import numpy as np
import torch
from torch import nn

from ctrstream import features as F
from ctrstream.models.nets import _CTRBase, build
from ctrstream.models.training import DEFAULTS


class OnlineLearnerError(ValueError):
    pass


class OnlineLearner:
    """A CTR net updated online by incremental optimizer steps (see the module docstring).

    ``net``: the model to continue (a batch-trained one, or ``build(kind)`` for a cold
    start); ``lr`` / ``sparse_lr``: the step sizes of the dense and the embedding parameters
    (default: the batch training loop's for the net's kind); ``batch_size``: the largest
    micro-batch one step takes; ``copy``: learn on a copy of ``net`` (default) or on it.
    """

    def __init__(
        self,
        net: _CTRBase,
        *,
        lr: float | None = None,
        sparse_lr: float | None = None,
        batch_size: int = 4096,
        copy: bool = True,
    ) -> None:
        if not isinstance(net, _CTRBase):
            raise OnlineLearnerError(
                f"net must be one of ctrstream.models.nets' models (build('lr'|'deep')), "
                f"got {type(net).__name__}"
            )
        kind = net.config.get("kind")
        if kind not in DEFAULTS:
            raise OnlineLearnerError(f"unknown model kind {kind!r} in net.config")
        if batch_size < 1:
            raise OnlineLearnerError(f"batch_size must be >= 1, got {batch_size}")
        self.kind: str = kind
        self.lr: float = float(lr if lr is not None else DEFAULTS[kind]["lr"])
        self.sparse_lr: float = float(
            sparse_lr if sparse_lr is not None else DEFAULTS[kind]["sparse_lr"]
        )
        if not (self.lr > 0 and self.sparse_lr > 0):
            raise OnlineLearnerError(
                f"learning rates must be > 0, got lr={self.lr} sparse_lr={self.sparse_lr}"
            )
        self.batch_size = int(batch_size)
        self.net: _CTRBase = _copy.deepcopy(net) if copy else net
        self.net.eval()
        self._opts: list[torch.optim.Optimizer] = [
            torch.optim.Adam(self.net.dense_parameters(), lr=self.lr)
        ]
        if self.net.sparse_parameters():
            self._opts.append(
                torch.optim.SparseAdam(self.net.sparse_parameters(), lr=self.sparse_lr)
            )
        self._loss = nn.BCEWithLogitsLoss()
        self._n_sparse = int(net.config.get("n_sparse", F.N_SPARSE))
        self._n_dense = int(net.config.get("n_dense", F.N_DENSE))
        self._n_emb = int(net.config.get("num_embeddings", F.N_SPARSE * F.HASH_BUCKETS))
        self.n_seen = 0  # labelled rows learned from
        self.n_steps = 0  # optimizer steps taken

    @classmethod
    def cold(cls, kind: str, **kwargs) -> OnlineLearner:
        """A learner starting from an untrained net of ``kind`` ("lr" | "deep", the batch
        defaults' architecture); ``kwargs`` go to the constructor."""
        if kind not in DEFAULTS:
            raise OnlineLearnerError(f"unknown model kind {kind!r}: use 'lr' or 'deep'")
        return cls(build(kind, **DEFAULTS[kind]["model_args"]), copy=False, **kwargs)

    # ------------------------------------------------------------------ inputs
    def _inputs(self, sparse: np.ndarray, dense: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        s = np.asarray(sparse)
        d = np.asarray(dense)
        if s.ndim != 2 or s.shape[1] != self._n_sparse:
            raise OnlineLearnerError(
                f"sparse must have shape (rows, {self._n_sparse}) (features.sparse_ids), "
                f"got {s.shape}"
            )
        if d.ndim != 2 or d.shape[1] != self._n_dense:
            raise OnlineLearnerError(
                f"dense must have shape (rows, {self._n_dense}) (features.dense_from_counts), "
                f"got {d.shape}"
            )
        if len(s) != len(d):
            raise OnlineLearnerError(f"sparse has {len(s)} rows but dense has {len(d)}")
        if s.dtype.kind not in "iu":
            raise OnlineLearnerError(f"sparse ids must be integers, got dtype {s.dtype}")
        if len(s) and (s.min() < 0 or s.max() >= self._n_emb):
            raise OnlineLearnerError(
                f"sparse ids must be in [0, {self._n_emb}) (hash them with features.sparse_ids)"
            )
        d32 = np.ascontiguousarray(d, dtype=np.float32)
        if not np.isfinite(d32).all():
            raise OnlineLearnerError("dense holds NaN or infinite values: fix the feature rows")
        return torch.from_numpy(np.ascontiguousarray(s, dtype=np.int64)), torch.from_numpy(d32)

    # ------------------------------------------------------------------ predicting
    @torch.no_grad()
    def predict_many(self, sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """Click probabilities (float64, 1-D) of the rows, with the net as it is now."""
        s, d = self._inputs(sparse, dense)
        if len(s) == 0:
            return np.zeros(0)
        return self.net(s, d).reshape(-1).double().numpy()

    def predict_one(self, sparse: np.ndarray, dense: np.ndarray) -> float:
        """The click probability of one row (``sparse`` ``(N_SPARSE,)``, ``dense``
        ``(N_DENSE,)``)."""
        s, d = np.asarray(sparse), np.asarray(dense)
        return float(self.predict_many(s.reshape(1, -1), d.reshape(1, -1))[0])

    # ------------------------------------------------------------------ learning
    def learn_many(self, sparse: np.ndarray, dense: np.ndarray, y: np.ndarray) -> None:
        """Learn from labelled rows, in the given order: one optimizer step per consecutive
        micro-batch of at most ``batch_size`` rows."""
        s, d = self._inputs(sparse, dense)
        yy = np.asarray(y)
        if yy.ndim != 1 or len(yy) != len(s):
            raise OnlineLearnerError(
                f"y must be 1-D with one label per row ({len(s)}), got {yy.shape}"
            )
        if len(yy) and not np.isin(yy, (0, 1)).all():
            raise OnlineLearnerError("labels must be 0 (no click) or 1 (click)")
        y_t = torch.from_numpy(yy.astype(np.float32)).reshape(-1, 1)
        self.net.train()
        try:
            for i in range(0, len(s), self.batch_size):
                sl = slice(i, i + self.batch_size)
                logit = self.net.logit_raw(s[sl], d[sl]) + self.net.logit_offset
                loss = self._loss(logit, y_t[sl])
                for o in self._opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in self._opts:
                    o.step()
                self.n_steps += 1
        finally:
            self.net.eval()
        self.n_seen += len(s)

    def learn_one(self, sparse: np.ndarray, dense: np.ndarray, y: int) -> None:
        """Learn from one labelled row (one optimizer step; prefer ``learn_many`` on
        micro-batches: one row is a noisy step)."""
        s, d = np.asarray(sparse), np.asarray(dense)
        self.learn_many(s.reshape(1, -1), d.reshape(1, -1), np.asarray([y]))

    def state_dict(self) -> dict:
        """Everything a restarted learner needs to continue exactly (the net's parameters,
        the optimizers' moments, the counters): tensors and numbers only, for ``torch.save``
        and ``torch.load(..., weights_only=True)``."""
        return {
            "config": dict(self.net.config),
            "net": self.net.state_dict(),
            "optimizers": [o.state_dict() for o in self._opts],
            "n_seen": self.n_seen,
            "n_steps": self.n_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` of a learner of the same architecture."""
        if dict(state["config"]) != dict(self.net.config):
            raise OnlineLearnerError(
                f"the saved learner's net {state['config']} is not this learner's "
                f"{dict(self.net.config)}: restore it into a learner built the same way"
            )
        if len(state["optimizers"]) != len(self._opts):
            raise OnlineLearnerError("the saved learner has a different set of optimizers")
        self.net.load_state_dict(state["net"])
        for o, st in zip(self._opts, state["optimizers"], strict=True):
            o.load_state_dict(st)
        self.n_seen = int(state["n_seen"])
        self.n_steps = int(state["n_steps"])
        self.net.eval()

    def snapshot(self) -> _CTRBase:
        """A copy of the net as it is now (to export, publish or freeze), in eval mode."""
        net = _copy.deepcopy(self.net)
        net.eval()
        return net

    def __repr__(self) -> str:
        return (
            f"OnlineLearner(kind={self.kind!r}, lr={self.lr:g}, sparse_lr={self.sparse_lr:g}, "
            f"batch_size={self.batch_size}, n_seen={self.n_seen}, n_steps={self.n_steps})"
        )


__all__ = ["OnlineLearner", "OnlineLearnerError"]
