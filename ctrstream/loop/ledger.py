"""The experiment's ledger: what the closed loop decided and what came of it, per user.

The randomization unit is the user, and a user is in exactly one deciding arm (a salted
hash, :func:`ctrstream.experiments.assignment.assign`), so the ledger keeps one row per user
and the arm is a column: requests, slots asked, slots filled, impressions, clicks, revenue
(what advertisers paid: the price of every clicked impression), the deciding model's
predicted clicks (its calibrated pCTR at the shown slot), and the truth - expected clicks
and expected revenue from the world's true probability of every shown impression (no click
noise). Shadow arms get their predicted clicks on the same shown impressions.

Clicks are credited when their event time has passed (:meth:`Ledger.credit_due`), as a live
experiment would see them; :meth:`Ledger.drain` credits the rest when the run ends.

Everything is numpy arrays, checkpointed with ``np.savez`` and loaded with
``allow_pickle=False`` (data, never code), so a restarted loop continues the same
experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

USER_COLUMNS = (
    "requests",
    "slots",
    "filled",
    "impressions",
    "clicks",
    "revenue",
    "predicted",
    "exp_clicks",
    "exp_revenue",
)
LATENCY_KEEP = 20_000  # ranking-latency samples kept per arm (the most recent)


@dataclass
class Ledger:
    arms: tuple[str, ...]  # deciding arm names, the index assign() returns
    shadows: tuple[str, ...]
    n_users: int
    users: dict[str, np.ndarray] = field(default_factory=dict)
    arm_of_user: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    shadow_predicted: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    # clicks decided by the world but not yet due: (click time, user, price), sorted by time
    pending_t: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pending_user: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pending_price: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    errors: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    degraded: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    excluded_requests: int = 0  # requests of stopped arms (served by the control, not counted)
    # prediction quality on the shown impressions, per scorer (deciding arms, then shadows):
    # n, sum of predictions, sum of labels, sum of log loss, sum of true p, sum of squared
    # error against the true p
    quality: np.ndarray = field(default_factory=lambda: np.zeros((0, 6)))
    series: list[dict] = field(default_factory=list)  # cumulative per arm over event time

    def __post_init__(self) -> None:
        if not self.users:
            self.users = {c: np.zeros(self.n_users, np.float64) for c in USER_COLUMNS}
        if len(self.arm_of_user) != self.n_users:
            self.arm_of_user = np.full(self.n_users, -1, np.int64)
        if self.shadow_predicted.shape != (len(self.shadows), self.n_users):
            self.shadow_predicted = np.zeros((len(self.shadows), self.n_users))
        if len(self.errors) != len(self.arms):
            self.errors = np.zeros(len(self.arms), np.int64)
            self.degraded = np.zeros(len(self.arms), np.int64)
        for a in self.arms:
            self.latency_ms.setdefault(a, [])
        if self.quality.shape != (len(self.arms) + len(self.shadows), 6):
            self.quality = np.zeros((len(self.arms) + len(self.shadows), 6))

    # ------------------------------------------------------------------ recording

    def record_requests(
        self,
        user: np.ndarray,
        arm: np.ndarray,
        slots: np.ndarray,
        filled: np.ndarray,
        latency_ms: np.ndarray,
        errors: np.ndarray,
        degraded: np.ndarray,
    ) -> None:
        """One row per request of a batch (``arm``: deciding-arm index, -1 = not counted)."""
        keep = arm >= 0
        self.excluded_requests += int((~keep).sum())
        u, a = user[keep], arm[keep]
        self.arm_of_user[u] = a
        np.add.at(self.users["requests"], u, 1.0)
        np.add.at(self.users["slots"], u, slots[keep].astype(np.float64))
        np.add.at(self.users["filled"], u, filled[keep].astype(np.float64))
        for k, name in enumerate(self.arms):
            sel = a == k
            if sel.any():
                lat = self.latency_ms[name]
                lat.extend(np.asarray(latency_ms[keep][sel], dtype=np.float64).tolist())
                if len(lat) > LATENCY_KEEP:
                    del lat[: len(lat) - LATENCY_KEEP]
                self.errors[k] += int(errors[keep][sel].sum())
                self.degraded[k] += int(degraded[keep][sel].sum())

    def record_impressions(
        self,
        user: np.ndarray,
        arm: np.ndarray,
        counted: np.ndarray,
        price: np.ndarray,
        p_true: np.ndarray,
        predicted: np.ndarray,
        shadow_predicted: list[np.ndarray],
        clicked: np.ndarray,
        click_time_ms: np.ndarray,
    ) -> None:
        """The shown impressions of a batch (``arm``: the deciding arm's index, ``counted``: the
        request's arm is counted); ``clicked`` is the world's draw, credited when due."""
        u = user[counted]
        for k in range(len(self.arms)):
            sel = counted & (arm == k)
            self._quality(k, predicted[sel], clicked[sel], p_true[sel])
        for s in range(len(self.shadows)):
            self._quality(
                len(self.arms) + s, shadow_predicted[s][counted], clicked[counted], p_true[counted]
            )
        np.add.at(self.users["impressions"], u, 1.0)
        np.add.at(self.users["exp_clicks"], u, p_true[counted])
        np.add.at(self.users["exp_revenue"], u, p_true[counted] * price[counted])
        np.add.at(self.users["predicted"], u, predicted[counted])
        for s in range(len(self.shadows)):
            np.add.at(self.shadow_predicted[s], u, shadow_predicted[s][counted])
        hit = counted & clicked
        if hit.any():
            t = np.concatenate([self.pending_t, click_time_ms[hit]])
            o = np.argsort(t, kind="stable")
            self.pending_t = t[o]
            self.pending_user = np.concatenate([self.pending_user, user[hit]])[o]
            self.pending_price = np.concatenate([self.pending_price, price[hit]])[o]

    def _quality(self, row: int, pred: np.ndarray, y: np.ndarray, p: np.ndarray) -> None:
        if not len(pred):
            return
        q = np.clip(pred.astype(np.float64), 1e-7, 1 - 1e-7)
        yy = y.astype(np.float64)
        ll = -(yy * np.log(q) + (1 - yy) * np.log1p(-q))
        self.quality[row] += (len(q), q.sum(), yy.sum(), ll.sum(), p.sum(), ((q - p) ** 2).sum())

    def prediction_quality(self) -> dict[str, dict[str, float]]:
        """Per scorer (deciding arm or shadow): log loss, predicted / observed, RMSE vs truth."""
        out = {}
        for row, name in enumerate(self.arms + self.shadows):
            n, sp, sy, sll, st, sse = self.quality[row]
            out[name] = {
                "impressions": int(n),
                "logloss": sll / n if n else float("nan"),
                "predicted_over_observed": sp / sy if sy else float("nan"),
                "predicted_over_true": sp / st if st else float("nan"),
                "rmse_vs_true_p": float(np.sqrt(sse / n)) if n else float("nan"),
                "shadow": name in self.shadows,
            }
        return out

    def credit_due(self, now_ms: int) -> tuple[np.ndarray, np.ndarray]:
        """Credit the clicks whose event time is before ``now_ms``; returns their users and
        prices."""
        k = int(np.searchsorted(self.pending_t, now_ms, side="left"))
        users, prices = self.pending_user[:k], self.pending_price[:k]
        if k:
            np.add.at(self.users["clicks"], users, 1.0)
            np.add.at(self.users["revenue"], users, prices)
            self.pending_t = self.pending_t[k:]
            self.pending_user = self.pending_user[k:]
            self.pending_price = self.pending_price[k:]
        return users, prices

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        """Credit every click still pending (the run is over)."""
        if not len(self.pending_t):
            return self.pending_user[:0], self.pending_price[:0]
        return self.credit_due(int(self.pending_t[-1]) + 1)

    def totals(self) -> dict[str, dict[str, float]]:
        """Per deciding arm, the sums of every user column."""
        out = {}
        for k, name in enumerate(self.arms):
            sel = self.arm_of_user == k
            out[name] = {c: float(self.users[c][sel].sum()) for c in USER_COLUMNS}
        return out

    def snapshot_series(self, t_ms: int) -> None:
        """Append the cumulative totals per arm at event time ``t_ms`` (for the plot)."""
        self.series.append({"t_ms": int(t_ms), "arms": self.totals()})

    # ------------------------------------------------------------------ analysis input

    def arm_users(self, k: int) -> np.ndarray:
        return np.flatnonzero(self.arm_of_user == k)

    # ------------------------------------------------------------------ checkpoint

    def save(self, path: Path) -> None:
        """Write the ledger to ``path`` (``.npz``) atomically."""
        import json

        arrays = {f"user_{c}": v for c, v in self.users.items()}
        arrays.update(
            arm_of_user=self.arm_of_user,
            shadow_predicted=self.shadow_predicted,
            pending_t=self.pending_t,
            pending_user=self.pending_user,
            pending_price=self.pending_price,
            errors=self.errors,
            degraded=self.degraded,
            quality=self.quality,
        )
        meta = {
            "arms": list(self.arms),
            "shadows": list(self.shadows),
            "n_users": self.n_users,
            "excluded_requests": self.excluded_requests,
            "latency_ms": self.latency_ms,
            "series": self.series,
        }
        arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, allow_pickle=False, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Ledger:
        import json

        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta_json"]).decode())
            led = cls(
                arms=tuple(meta["arms"]),
                shadows=tuple(meta["shadows"]),
                n_users=int(meta["n_users"]),
                users={c: z[f"user_{c}"].copy() for c in USER_COLUMNS},
                arm_of_user=z["arm_of_user"].copy(),
                shadow_predicted=z["shadow_predicted"].copy(),
                pending_t=z["pending_t"].copy(),
                pending_user=z["pending_user"].copy(),
                pending_price=z["pending_price"].copy(),
                latency_ms={k: list(v) for k, v in meta["latency_ms"].items()},
                errors=z["errors"].copy(),
                degraded=z["degraded"].copy(),
                quality=z["quality"].copy(),
                excluded_requests=int(meta["excluded_requests"]),
                series=list(meta["series"]),
            )
        return led


IMPRESSION_LOG_COLUMNS = (
    "impression_id",
    "request_id",
    "event_time_ms",
    "user_id",
    "ad_id",
    "arm",
    "counted",
    "slot",
    "price",
    "model_name",
    "model_version",
    "raw_score",
    "calibrated_score",
    "pctr0",
    "propensity",
    "explored",
    "degraded",
    "p_true",
    "clicked",
    "click_time_ms",
)


REQUEST_LOG_COLUMNS = (
    "request_id",
    "event_time_ms",
    "user_id",
    "arm",
    "counted",
    "slots",
    "filled",
    "latency_ms",
    "degraded",
)


class PartLog:
    """Rows appended as Parquet parts at each checkpoint, named by the checkpoint's clock
    (``<prefix>-<clock ms>.parquet``): a resumed loop removes the parts of a checkpoint that
    did not complete (:meth:`prune_after`), so no step is logged twice."""

    prefix = "rows"
    columns: tuple[str, ...] = ()

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._rows: list[dict[str, np.ndarray]] = []

    def add(self, cols: dict[str, np.ndarray]) -> None:
        self._rows.append(cols)

    def flush(self, clock_ms: int) -> Path | None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return None
        table = pa.Table.from_pydict(
            {c: np.concatenate([r[c] for r in self._rows]) for c in self.columns}
        )
        path = self.folder / f"{self.prefix}-{int(clock_ms):015d}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        self._rows.clear()
        return path

    def prune_after(self, clock_ms: int) -> None:
        """Remove the parts written after the checkpoint at ``clock_ms``."""
        for p in self.folder.glob(f"{self.prefix}-*.parquet"):
            if int(p.stem.split("-")[1]) > clock_ms:
                p.unlink()

    def discard(self) -> None:
        """Forget rows not yet flushed (a resumed loop redoes their steps)."""
        self._rows.clear()

    @classmethod
    def read(cls, folder: Path):  # -> pyarrow.Table | None
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = sorted(Path(folder).glob(f"{cls.prefix}-*.parquet"))
        if not parts:
            return None
        return pa.concat_tables([pq.read_table(p) for p in parts])


class ImpressionLog(PartLog):
    """The decision log: one row per shown impression with what decided it and the truth
    (the closed loop's oracle file)."""

    prefix = "impressions"
    columns = IMPRESSION_LOG_COLUMNS


class RequestLog(PartLog):
    """One row per ad request: its arm (and whether the experiment counts it), the slots
    asked and filled, its ranking latency - unfilled requests included."""

    prefix = "requests"
    columns = REQUEST_LOG_COLUMNS


__all__ = [
    "Ledger",
    "USER_COLUMNS",
    "PartLog",
    "ImpressionLog",
    "RequestLog",
    "IMPRESSION_LOG_COLUMNS",
    "REQUEST_LOG_COLUMNS",
]
