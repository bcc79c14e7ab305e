"""The continuous learner as an arm of the closed loop: a ranker that scores with an
:class:`~ctrstream.models.online.OnlineLearner` and learns from the loop's shown impressions
as their labels become final.

:class:`OnlineArm` is pure (no I/O): the loop hands it every shown impression's model inputs
at its slot (``observe``: event time, sparse ids, dense features) with its outcome from the
world (clicked, click time), and at every step's start calls ``advance(now)``: the rows whose
attribution window has closed (``t + window <= now``) are learned from, in event-time order,
with the join's label (a click within the window) - what the stack's ``labeled`` stream would
carry, no earlier. :meth:`OnlineArm.ranker` is the ad server's :class:`Ranker` of the arm:
a model ranker whose version names the learner's step count, uncalibrated (the learner
learns from every final label, so its probabilities stay on the label's scale).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ctrstream.models.online import OnlineLearner
from ctrstream.serving.adserver import Ranker
from ctrstream.serving.triton_client import ScoreResult


class OnlineArm:
    """See the module docstring. ``window_ms``: the attribution window (labels are final
    after it); ``model_name``: the name the arm's scores are logged under."""

    def __init__(
        self, learner: OnlineLearner, window_ms: int, *, model_name: str = "online"
    ) -> None:
        if window_ms < 0:
            raise ValueError(f"window_ms must be >= 0, got {window_ms}")
        self.learner = learner
        self.window_ms = int(window_ms)
        self.model_name = model_name
        self._t: list[np.ndarray] = []
        self._sparse: list[np.ndarray] = []
        self._dense: list[np.ndarray] = []
        self._label: list[np.ndarray] = []
        self.learned_until_ms: int | None = None  # rows before it have been learned from

    @property
    def pending(self) -> int:
        """Rows observed whose labels are not final yet (not learned from)."""
        return int(sum(len(t) for t in self._t))

    @property
    def version(self) -> str:
        return f"online-{self.learner.n_steps}"

    def observe(
        self,
        t_ms: np.ndarray,
        sparse: np.ndarray,
        dense: np.ndarray,
        clicked: np.ndarray,
        click_time_ms: np.ndarray,
    ) -> None:
        """Shown impressions (any arm's) with their outcome; learned from once final."""
        t = np.asarray(t_ms, dtype=np.int64).reshape(-1)
        n = len(t)
        s, d = np.asarray(sparse), np.asarray(dense)
        c, ct = np.asarray(clicked).reshape(-1), np.asarray(click_time_ms).reshape(-1)
        if len(s) != n or len(d) != n or len(c) != n or len(ct) != n:
            raise ValueError(
                f"observe needs one row per impression ({n}): sparse {len(s)}, dense "
                f"{len(d)}, clicked {len(c)}, click times {len(ct)}"
            )
        if n == 0:
            return
        if self.learned_until_ms is not None and int(t.min()) < self.learned_until_ms:
            raise ValueError(
                f"an impression at {int(t.min())} arrived after the labels up to "
                f"{self.learned_until_ms} were learned from: observe impressions in time order"
            )
        label = (c.astype(bool) & (ct - t >= 0) & (ct - t <= self.window_ms)).astype(np.int8)
        self._t.append(t)
        self._sparse.append(s)
        self._dense.append(np.asarray(d, dtype=np.float32))
        self._label.append(label)

    def advance(self, now_ms: int) -> int:
        """Learn from every observed row whose label is final at ``now_ms``; the number."""
        cutoff = int(now_ms) - self.window_ms
        if self.learned_until_ms is None or cutoff > self.learned_until_ms:
            self.learned_until_ms = cutoff
        if not self._t:
            return 0
        t = np.concatenate(self._t)
        order = np.argsort(t, kind="stable")
        t = t[order]
        s = np.concatenate(self._sparse)[order]
        d = np.concatenate(self._dense)[order]
        y = np.concatenate(self._label)[order]
        k = int(np.searchsorted(t, cutoff, side="right"))
        if k:
            self.learner.learn_many(s[:k], d[:k], y[:k])
        self._t, self._sparse, self._dense, self._label = (
            ([t[k:]], [s[k:]], [d[k:]], [y[k:]]) if k < len(t) else ([], [], [], [])
        )
        return k

    # ------------------------------------------------------------------ state

    def save(self, path: Path) -> None:
        """The learner (net, optimizers, counters) and the rows waiting for their labels,
        written to ``path`` atomically (a temporary file, then replaced)."""

        def cat(parts: list[np.ndarray], empty: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts) if parts else empty))

        state = {
            "learner": self.learner.state_dict(),
            "window_ms": self.window_ms,
            "learned_until_ms": self.learned_until_ms,
            "t": cat(self._t, np.zeros(0, dtype=np.int64)),
            "sparse": cat(self._sparse, np.zeros((0, self.learner._n_sparse), dtype=np.int64)),
            "dense": cat(self._dense, np.zeros((0, self.learner._n_dense), dtype=np.float32)),
            "label": cat(self._label, np.zeros(0, dtype=np.int8)),
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def load(self, path: Path) -> None:
        """Continue from :meth:`save`'s file: the learner as it was and its pending rows."""
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if int(state["window_ms"]) != self.window_ms:
            raise ValueError(
                f"{path}: saved with an attribution window of {state['window_ms']} ms, this "
                f"arm has {self.window_ms} ms: restart with the same settings or start fresh"
            )
        self.learner.load_state_dict(state["learner"])
        lu = state["learned_until_ms"]
        self.learned_until_ms = None if lu is None else int(lu)
        t = state["t"].numpy()
        if len(t):
            self._t = [t.astype(np.int64)]
            self._sparse = [state["sparse"].numpy().astype(np.int64)]
            self._dense = [state["dense"].numpy().astype(np.float32)]
            self._label = [state["label"].numpy().astype(np.int8)]
        else:
            self._t, self._sparse, self._dense, self._label = [], [], [], []

    # ------------------------------------------------------------------ serving

    def score(self, sparse: np.ndarray, dense: np.ndarray) -> ScoreResult:
        """The ad server's scoring call (the ad server turns an error into its fallback)."""
        raw = self.learner.predict_many(sparse, dense).astype(np.float32)
        return ScoreResult(raw, self.version, False, self.model_name)

    def ranker(self, name: str) -> Ranker:
        """The arm's ranker (a model ranker, no calibrator)."""
        return Ranker(name, "model", self.score, None, model_name=self.model_name)


__all__ = ["OnlineArm"]
