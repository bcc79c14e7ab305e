"""The decay statistics, River style: ``update_many(...)`` then ``get()``, no I/O.

What decays is the *model*, not the market: a market that gets harder (a lower CTR, noisier
clicks) raises every model's NE, the oracle's included. So every number of a served version
stands next to the same number for a *reference* scored on the same impressions - in the
simulation the oracle (the true click probability), in a deployment any trusted score (a
continuously trained arm) - and the alarm watches the gap between the two.

Per served model version (:class:`VersionDecay`), over a rolling window of event time
(``window_ms``, in ``bucket_ms`` buckets, ending at the latest event time seen):

* ``ne``, ``auc``, ``calibration_ratio``, ``ece`` of the served (calibrated) score on the
  joined labels, ``oracle_ne`` and ``oracle_auc`` of the reference on the same rows
  (:mod:`ctrstream.metrics`, one definition everywhere);
* ``ne_gap`` = NE / reference NE - 1 on the rows that have a reference: both NEs divide by
  the same entropy, so it is ``sum(log loss) / sum(reference log loss) - 1``, kept per bucket
  and exact over the window;
* ``baseline_gap``: the gap over the version's first ``baseline_ms`` of labelled event time,
  what the version is worth when it starts serving (a model is never as good as the oracle);
* an ADWIN (``river.drift.ADWIN``, the detector the calibrator runs on its residual,
  ``ctrstream.calibration.calibrator``) on the per-impression excess log loss over the
  reference (clipped to ``+-loss_clip``); a detection counts when the mean it settles on is
  above the mean it dropped (the model got worse, not better);
* ``psi`` per feature family against the training distribution (:func:`reference_profile`,
  :func:`psi`): the distribution of the id that keys each family of served features.

The **alarm** (latched until the version is replaced) fires at the first bucket boundary
where either rule holds, with at least ``min_clicks`` clicks in the window:

* ``gap``: the window's gap exceeds the baseline gap by ``gap_threshold``;
* ``adwin``: the ADWIN saw the excess loss rise and the window's gap exceeds the baseline by
  ``confirm_gap`` (a smaller margin: the ADWIN says *when*, the gap says *how much*).

:class:`LabelStats` watches the labels themselves: the click delay of the joined clicks and
the share of clicks that arrived after the join's attribution window (the join dead-letters
them, so the training set never sees them) over the same rolling window.

:class:`DecayMonitor` holds one :class:`VersionDecay` per version and the label statistics;
:meth:`DecayMonitor.decay_state` is the summary the controller reads through the store
(``ctrstream.store.monitor``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ctrstream import metrics as M

# --------------------------------------------------------------------------- feature drift

# family -> the impression field whose distribution keys it ("hour" is derived from the time)
FAMILIES: dict[str, str] = {
    "ad": "ad_id",
    "campaign": "campaign_id",
    "advertiser": "advertiser_id",
    "user": "user_id",
    "site": "site_id",
    "category": "ad_category",
    "device": "device_type",
    "country": "country",
    "position": "position",
    "hour": "event_time_ms",
}
PSI_EPS = 1e-4  # shares are floored at this in the PSI (an empty bin costs a finite amount)
OTHER = "__other__"


def _family_values(family: str, column: ArrayLike) -> NDArray[np.str_]:
    a = np.asarray(column)
    if family == "hour":
        a = (a.astype(np.int64) // 3_600_000) % 24
    return a.astype(str)


def reference_profile(columns: Mapping[str, ArrayLike], top: int = 20) -> dict[str, dict]:
    """The training distribution of every family whose field is in ``columns``: its ``top``
    most frequent values with their shares, and the share of all the others.

    >>> prof = reference_profile({"device_type": ["mobile"] * 3 + ["desktop"]}, top=1)
    >>> prof["device"]
    {'values': ['mobile'], 'shares': [0.75], 'other': 0.25}
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    out: dict[str, dict] = {}
    for family, fieldname in FAMILIES.items():
        if fieldname not in columns:
            continue
        vals = _family_values(family, columns[fieldname])
        if len(vals) == 0:
            continue
        uniq, counts = np.unique(vals, return_counts=True)
        order = np.lexsort((uniq, -counts))[:top]  # most frequent first, ties by value
        shares = counts[order] / len(vals)
        out[family] = {
            "values": uniq[order].tolist(),
            "shares": [float(s) for s in shares],
            "other": float(max(0.0, 1.0 - shares.sum())),
        }
    return out


def shares_in(profile_family: Mapping[str, Any], column: ArrayLike, family: str) -> Floats:
    """The shares of ``column``'s rows in the profile's bins (its values, then the others)."""
    vals = _family_values(family, column)
    ref = np.asarray(profile_family["values"]).astype(str)
    n = len(vals)
    out = np.zeros(len(ref) + 1)
    if n == 0:
        return out
    order = np.argsort(ref)
    pos = np.searchsorted(ref[order], vals)
    pos = np.minimum(pos, len(ref) - 1)
    hit = ref[order][pos] == vals
    counts = np.bincount(order[pos[hit]], minlength=len(ref)).astype(np.float64)
    out[: len(ref)] = counts / n
    out[-1] = 1.0 - counts.sum() / n
    return out


def psi(expected: ArrayLike, actual: ArrayLike) -> float:
    """Population stability index ``sum (a - e) * ln(a / e)`` of two share vectors (floored
    at :data:`PSI_EPS`); < 0.1 is usually read as stable, > 0.25 as a real shift.

    >>> round(psi([0.5, 0.5], [0.5, 0.5]), 6), round(psi([0.9, 0.1], [0.5, 0.5]), 3)
    (0.0, 0.879)
    """
    e = np.maximum(np.asarray(expected, dtype=np.float64), PSI_EPS)
    a = np.maximum(np.asarray(actual, dtype=np.float64), PSI_EPS)
    if e.shape != a.shape:
        raise ValueError(f"share vectors of different lengths: {e.shape} and {a.shape}")
    return float(np.sum((a - e) * np.log(a / e)))


def family_psi(profile: Mapping[str, Mapping[str, Any]], columns: Mapping[str, Any]) -> dict:
    """PSI of every family of ``profile`` whose field is in ``columns`` (rows of a window)."""
    out = {}
    for family, prof in profile.items():
        fieldname = FAMILIES.get(family)
        if fieldname is None or fieldname not in columns or len(columns[fieldname]) == 0:
            continue
        expected = np.append(np.asarray(prof["shares"], dtype=np.float64), prof["other"])
        out[family] = psi(expected, shares_in(prof, columns[fieldname], family))
    return out


# --------------------------------------------------------------------------- the statistics

Floats = NDArray[np.float64]


@dataclass(frozen=True)
class DecayConfig:
    """The monitor's knobs (event-time durations in ms)."""

    window_ms: int = 3_600_000  # the rolling window every metric is computed over
    bucket_ms: int = 60_000  # the window moves (and the alarm is evaluated) bucket by bucket
    baseline_ms: int = 3_600_000  # the version's first labelled event time: its baseline gap
    gap_threshold: float = 0.03  # gap rule: window gap > baseline gap + this
    confirm_gap: float = 0.01  # adwin rule: ... + this, after an upward ADWIN detection
    min_clicks: int = 200  # no rule fires on a window with fewer clicks
    adwin_delta: float = 0.002  # the ADWIN's confidence (the calibrator's default)
    loss_clip: float = 5.0  # the excess log loss fed to the ADWIN is clipped to +-this
    n_bins: int = M.N_BINS  # the ECE's equal-mass bins

    def __post_init__(self) -> None:
        if self.bucket_ms <= 0 or self.window_ms < self.bucket_ms:
            raise ValueError(
                f"need 0 < bucket_ms <= window_ms, got bucket_ms={self.bucket_ms}, "
                f"window_ms={self.window_ms}"
            )
        if self.baseline_ms <= 0 or self.min_clicks < 0:
            raise ValueError("baseline_ms must be > 0 and min_clicks >= 0")


def _ll(p: Floats, y: Floats) -> Floats:
    pc = np.clip(p, M.EPS, 1 - M.EPS)
    return -(y * np.log(pc) + (1 - y) * np.log1p(-pc))


@dataclass
class _Bucket:
    """One bucket of event time: its rows, and the sums the alarm rules need."""

    index: int
    p: list[Floats]
    o: list[Floats]
    y: list[Floats]
    cols: list[dict[str, Any]]
    n: int = 0
    clicks: float = 0.0
    ll: float = 0.0  # served log loss, rows with a reference
    ll_ref: float = 0.0  # reference log loss, same rows


class VersionDecay:
    """The decay statistics of one served model version.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> t = np.arange(200_000) * 72  # 4 hours, 50 rows a second
    >>> truth = np.full(len(t), 0.05)
    >>> served = np.where(t < 7_200_000, 0.05, 0.02)  # the model goes wrong at 2 h
    >>> y = (rng.random(len(t)) < truth).astype(float)
    >>> mon = VersionDecay("ctr_deep@1")
    >>> for lo in range(0, len(t), 20_000):
    ...     _ = mon.update_many(served[lo:lo + 20_000], y[lo:lo + 20_000],
    ...                         t[lo:lo + 20_000], truth[lo:lo + 20_000])
    >>> s = mon.get()
    >>> s["alarm"], s["reason"].split(":")[0], 7_200_000 <= s["since_ms"] < 9_000_000
    (True, 'adwin', True)
    >>> round(s["baseline_gap"], 2), s["ne_gap"] > 0.05
    (0.0, True)
    """

    def __init__(
        self,
        version: str,
        cfg: DecayConfig | None = None,
        profile: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        from river import drift

        self.version = version
        self.cfg = cfg or DecayConfig()
        self.profile = dict(profile) if profile else None
        self.buckets: deque[_Bucket] = deque()
        self.adwin = drift.ADWIN(delta=self.cfg.adwin_delta)
        self.first_ms: int | None = None
        self.last_ms: int | None = None
        self.n_seen = 0
        self.n_reference = 0
        self._base_ll = 0.0
        self._base_ref = 0.0
        self._base_clicks = 0.0
        self.baseline_gap: float | None = None  # set once the baseline span is over
        self.adwin_detections: list[dict] = []  # upward detections: {t_ms, before, after}
        self._adwin_up = False
        self.alarm = False
        self.since_ms: int | None = None
        self.reason = ""
        self.alarm_events: list[dict] = []

    def restore(
        self,
        baseline_gap: float | None = None,
        alarm: bool = False,
        since_ms: int | None = None,
        reason: str = "",
    ) -> None:
        """Take back what a restarted monitor cannot measure again (the decay state it wrote):
        the baseline gap, and a raised alarm. Call it before the first rows."""
        if baseline_gap is not None and math.isfinite(baseline_gap):
            self.baseline_gap = float(baseline_gap)
        if alarm:
            self.alarm, self.since_ms, self.reason = True, since_ms, reason

    # -- learning
    def update_many(
        self,
        p: ArrayLike,
        y: ArrayLike,
        t_ms: ArrayLike,
        reference: ArrayLike | None = None,
        columns: Mapping[str, ArrayLike] | None = None,
    ) -> list[dict]:
        """Add joined rows: the served score ``p``, the label ``y``, the impression's event
        time, the reference's score (NaN where there is none) and, for the PSI, the
        impression's fields (``FAMILIES``). Returns the alarm events this call raised."""
        pa = np.asarray(p, dtype=np.float64).reshape(-1)
        ya = np.asarray(y, dtype=np.float64).reshape(-1)
        ta = np.asarray(t_ms, dtype=np.int64).reshape(-1)
        oa = (
            np.full(len(pa), np.nan)
            if reference is None
            else np.asarray(reference, dtype=np.float64).reshape(-1)
        )
        if not (len(pa) == len(ya) == len(ta) == len(oa)):
            raise ValueError(
                f"update_many got {len(pa)} scores, {len(ya)} labels, {len(ta)} times and "
                f"{len(oa)} reference scores: pass one of each per row"
            )
        if len(pa) and not np.all((pa >= 0) & (pa <= 1)):
            raise ValueError("served scores must be probabilities in [0, 1] (no NaN)")
        if len(ya) and not np.all((ya == 0) | (ya == 1)):
            raise ValueError("labels must be 0 or 1")
        has_ref = np.isfinite(oa)
        if np.any((oa[has_ref] < 0) | (oa[has_ref] > 1)):
            raise ValueError("reference scores must be probabilities in [0, 1] (NaN: none)")
        if len(pa) == 0:
            return []
        order = np.argsort(ta, kind="stable")
        pa, ya, ta, oa, has_ref = pa[order], ya[order], ta[order], oa[order], has_ref[order]
        cols = (
            {k: np.asarray(v)[order] for k, v in columns.items() if k in FAMILIES.values()}
            if columns
            else {}
        )
        events: list[dict] = []
        b = ta // self.cfg.bucket_ms
        cuts = np.flatnonzero(np.diff(b)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(ta)]):
            events += self._add(
                int(b[lo]),
                pa[lo:hi],
                ya[lo:hi],
                ta[lo:hi],
                oa[lo:hi],
                has_ref[lo:hi],
                {k: v[lo:hi] for k, v in cols.items()},
            )
        return events

    def _bucket(self, index: int) -> _Bucket:
        """The bucket ``index`` (a late row goes to its own bucket while it is in the window)."""
        for bk in reversed(self.buckets):
            if bk.index == index:
                return bk
            if bk.index < index:
                break
        bk = _Bucket(index, [], [], [], [])
        self.buckets.append(bk)
        if len(self.buckets) > 1 and self.buckets[-2].index > index:
            self.buckets = deque(sorted(self.buckets, key=lambda x: x.index))
        return bk

    def _add(self, index, p, y, t, o, has_ref, cols) -> list[dict]:
        cfg = self.cfg
        events: list[dict] = []
        if self.last_ms is not None and index > self.last_ms // cfg.bucket_ms:
            # the event time enters a new bucket: the window up to the previous one is whole
            events += self._evaluate()
        if self.first_ms is None:
            self.first_ms = int(t[0])
        self.last_ms = max(self.last_ms or int(t[-1]), int(t[-1]))
        self.n_seen += len(p)
        bk = self._bucket(index)
        bk.p.append(p)
        bk.o.append(o)
        bk.y.append(y)
        if cols:
            bk.cols.append(cols)
        bk.n += len(p)
        bk.clicks += float(y.sum())
        if has_ref.any():
            ll = _ll(p[has_ref], y[has_ref])
            ll_ref = _ll(o[has_ref], y[has_ref])
            bk.ll += float(ll.sum())
            bk.ll_ref += float(ll_ref.sum())
            self.n_reference += int(has_ref.sum())
            if self.baseline_gap is None:
                in_base = t[has_ref] < self.first_ms + cfg.baseline_ms
                self._base_ll += float(ll[in_base].sum())
                self._base_ref += float(ll_ref[in_base].sum())
                self._base_clicks += float(y[has_ref][in_base].sum())
            self._feed_adwin(np.clip(ll - ll_ref, -cfg.loss_clip, cfg.loss_clip), t[has_ref])
        if self.baseline_gap is None and self.last_ms >= self.first_ms + cfg.baseline_ms:
            self.baseline_gap = (
                self._base_ll / self._base_ref - 1.0 if self._base_ref > 0 else math.nan
            )
        # forget what left the window
        start = self.last_ms // cfg.bucket_ms - cfg.window_ms // cfg.bucket_ms + 1
        while self.buckets and self.buckets[0].index < start:
            self.buckets.popleft()
        return events

    def _feed_adwin(self, excess: Floats, t: NDArray[np.int64]) -> None:
        ad = self.adwin
        for x, tm in zip(excess.tolist(), t.tolist()):
            before_w, before_m = ad.width, ad.estimation
            ad.update(x)
            if ad.drift_detected:
                after_w, after_m = ad.width, ad.estimation
                dropped = before_w + 1 - after_w
                dropped_m = (
                    (before_m * before_w + x - after_m * after_w) / dropped if dropped else 0.0
                )
                if after_m > dropped_m:
                    self._adwin_up = True
                    self.adwin_detections.append(
                        {"t_ms": int(tm), "before": float(dropped_m), "after": float(after_m)}
                    )

    # -- the alarm
    def check(self) -> list[dict]:
        """Evaluate the rules on the window as it is now (they are evaluated at every bucket
        boundary anyway; a job that reads several partitions calls this too, because rows of
        a lagging partition fill the window after the event time has moved on)."""
        return self._evaluate()

    def _window_gap(self) -> tuple[float, float]:
        ll = sum(b.ll for b in self.buckets)
        ref = sum(b.ll_ref for b in self.buckets)
        clicks = sum(b.clicks for b in self.buckets)
        return (ll / ref - 1.0 if ref > 0 else math.nan), clicks

    def _evaluate(self) -> list[dict]:
        """The rules, on the window that ends with the bucket now complete."""
        if self.alarm or self.baseline_gap is None or not math.isfinite(self.baseline_gap):
            return []
        cfg = self.cfg
        gap, clicks = self._window_gap()
        if clicks < cfg.min_clicks or not math.isfinite(gap):
            return []
        excess = gap - self.baseline_gap
        reason = ""
        if excess > cfg.gap_threshold:
            reason = (
                f"gap: NE gap to the reference {gap:.4f} over the window exceeds the "
                f"baseline {self.baseline_gap:.4f} by {excess:.4f} > {cfg.gap_threshold}"
            )
        elif self._adwin_up and excess > cfg.confirm_gap:
            d = self.adwin_detections[-1]
            reason = (
                f"adwin: excess log loss over the reference rose from {d['before']:.5f} to "
                f"{d['after']:.5f}; NE gap {gap:.4f} exceeds the baseline "
                f"{self.baseline_gap:.4f} by {excess:.4f} > {cfg.confirm_gap}"
            )
        if not reason:
            return []
        self.alarm = True
        assert self.last_ms is not None
        self.since_ms = int(self.last_ms)
        self.reason = reason
        ev = {"version": self.version, "t_ms": self.since_ms, "ne_gap": gap, "reason": reason}
        self.alarm_events.append(ev)
        return [ev]

    # -- reading
    def window(self) -> dict[str, Any]:
        """The rows of the window as arrays: ``p``, ``o`` (reference, NaN none), ``y`` and
        the impression fields given."""
        bks = list(self.buckets)

        def cat(name: str) -> Floats:
            parts = [a for b in bks for a in getattr(b, name)]
            return np.concatenate(parts) if parts else np.zeros(0)

        cols: dict[str, Any] = {}
        for b in bks:
            for c in b.cols:
                for k, v in c.items():
                    cols.setdefault(k, []).append(v)
        return {
            "p": cat("p"),
            "o": cat("o"),
            "y": cat("y"),
            "columns": {k: np.concatenate(v) for k, v in cols.items()},
        }

    def get(self) -> dict[str, Any]:
        """Every statistic of the version over the current window (NaN where undefined)."""
        w = self.window()
        p, o, y = w["p"], w["o"], w["y"]
        s = M.summary(p, y, self.cfg.n_bins)
        ref = np.isfinite(o)
        so = M.summary(o[ref], y[ref]) if ref.any() else M.summary([], [])
        gap, _ = self._window_gap()
        out: dict[str, Any] = {
            "version": self.version,
            "n": s["n"],
            "clicks": int(y.sum()),
            "window_start_ms": (
                None if not self.buckets else self.buckets[0].index * self.cfg.bucket_ms
            ),
            "window_end_ms": self.last_ms,
            "ne": s["ne"],
            "auc": s["auc"],
            "calibration_ratio": s["ratio"],
            "ece": s["ece"],
            "oracle_ne": so["ne"],
            "oracle_auc": so["auc"],
            "ne_gap": gap,
            "baseline_gap": math.nan if self.baseline_gap is None else self.baseline_gap,
            "n_seen": self.n_seen,
            "n_reference": self.n_reference,
            "adwin_detections": len(self.adwin_detections),
            "adwin_last_ms": (self.adwin_detections[-1]["t_ms"] if self.adwin_detections else None),
            "psi": family_psi(self.profile, w["columns"]) if self.profile else {},
            "alarm": self.alarm,
            "since_ms": self.since_ms,
            "reason": self.reason,
        }
        return out


class LabelStats:
    """Label delay and late clicks over a rolling window of event time.

    >>> ls = LabelStats(window_ms=3_600_000)
    >>> ls.update_labels([0, 1000, 2000], [1, 1, 0], [10_000, 30_000, None])
    >>> ls.update_late([3000])
    >>> g = ls.get()
    >>> g["clicks"], g["late_clicks"], round(g["late_share"], 3), g["delay_p50_s"]
    (2, 1, 0.333, 20.0)
    """

    def __init__(self, window_ms: int = 3_600_000):
        if window_ms <= 0:
            raise ValueError(f"window_ms must be > 0, got {window_ms}")
        self.window_ms = int(window_ms)
        self._delays: deque[tuple[int, float]] = deque()  # (impression time, delay ms)
        self._late: deque[int] = deque()  # impression times of the late clicks
        self.last_ms: int | None = None

    def _advance(self, t: int) -> None:
        self.last_ms = t if self.last_ms is None else max(self.last_ms, t)
        lo = self.last_ms - self.window_ms
        while self._delays and self._delays[0][0] <= lo:
            self._delays.popleft()
        while self._late and self._late[0] <= lo:
            self._late.popleft()

    def update_labels(self, t_ms: ArrayLike, clicked: ArrayLike, delay_ms: Iterable[Any]) -> None:
        """Joined labels: the impression's time, clicked 0/1 and the click's delay (None or
        NaN when not clicked)."""
        ts = np.asarray(t_ms, dtype=np.int64).reshape(-1)
        cl = np.asarray(clicked).reshape(-1)
        dl = np.asarray([math.nan if d is None else d for d in delay_ms], dtype=np.float64)
        if not (len(ts) == len(cl) == len(dl)):
            raise ValueError("update_labels needs one time, label and delay per row")
        order = np.argsort(ts, kind="stable")
        for t, c, d in zip(ts[order].tolist(), cl[order].tolist(), dl[order].tolist()):
            if c and math.isfinite(d):
                self._delays.append((t, d))
        if len(ts):
            self._advance(int(ts.max()))

    def update_late(self, t_ms: ArrayLike) -> None:
        """Clicks that arrived after the attribution window, by their event time."""
        ts = np.sort(np.asarray(t_ms, dtype=np.int64).reshape(-1))
        self._late.extend(ts.tolist())
        if len(ts):
            self._advance(int(ts.max()))

    def get(self) -> dict[str, Any]:
        d = np.asarray([x for _, x in self._delays], dtype=np.float64) / 1000.0
        n_late = len(self._late)
        total = len(d) + n_late
        return {
            "clicks": int(len(d)),
            "late_clicks": n_late,
            "late_share": n_late / total if total else math.nan,
            "delay_mean_s": float(d.mean()) if len(d) else math.nan,
            "delay_p50_s": float(np.median(d)) if len(d) else math.nan,
            "delay_p90_s": float(np.quantile(d, 0.9)) if len(d) else math.nan,
        }


class DecayMonitor:
    """One :class:`VersionDecay` per served version and the :class:`LabelStats`."""

    def __init__(
        self,
        cfg: DecayConfig | None = None,
        profiles: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
        default_profile: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.cfg = cfg or DecayConfig()
        self.profiles = dict(profiles or {})
        self.default_profile = default_profile
        self.versions: dict[str, VersionDecay] = {}
        self.labels = LabelStats(self.cfg.window_ms)

    def version(self, version: str) -> VersionDecay:
        v = self.versions.get(version)
        if v is None:
            prof = self.profiles.get(version, self.default_profile)
            v = self.versions[version] = VersionDecay(version, self.cfg, prof)
        return v

    def update_many(
        self,
        version: str,
        p: ArrayLike,
        y: ArrayLike,
        t_ms: ArrayLike,
        reference: ArrayLike | None = None,
        columns: Mapping[str, ArrayLike] | None = None,
    ) -> list[dict]:
        """:meth:`VersionDecay.update_many` of ``version``."""
        return self.version(version).update_many(p, y, t_ms, reference, columns)

    def check(self) -> list[dict]:
        """:meth:`VersionDecay.check` of every version: the alarm events raised."""
        return [e for v in self.versions.values() for e in v.check()]

    def get(self) -> dict[str, Any]:
        return {
            "versions": {k: v.get() for k, v in sorted(self.versions.items())},
            "labels": self.labels.get(),
        }

    def served_version(self) -> str | None:
        """The version with the latest labelled event time (ties: the most rows seen)."""
        if not self.versions:
            return None
        return max(self.versions.values(), key=lambda v: (v.last_ms or 0, v.n_seen)).version

    def decay_state(self, stats: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The summary the controller reads (``ctrstream.store.monitor``): the served
        version's ``version``, ``alarm``, ``since_ms``, ``reason``, ``ne_gap`` (window),
        ``baseline_gap``, the window's end, and every version's alarm, gap and baseline gap
        in ``versions`` (what a restarted monitor takes back: :meth:`VersionDecay.restore`)."""
        served = self.served_version()
        if served is None:
            return None
        st = stats if stats is not None else self.get()
        vs = st["versions"]
        s = vs[served]

        def num(x: Any) -> float:
            return math.nan if x is None else float(x)

        return {
            "version": served,
            "alarm": bool(s["alarm"]),
            "since_ms": s["since_ms"],
            "reason": s["reason"],
            "ne_gap": num(s["ne_gap"]),
            "baseline_gap": num(s["baseline_gap"]),
            "event_time_ms": s["window_end_ms"],
            "versions": {
                k: {
                    "alarm": bool(v["alarm"]),
                    "since_ms": v["since_ms"],
                    "reason": v["reason"],
                    "ne_gap": num(v["ne_gap"]),
                    "baseline_gap": num(v["baseline_gap"]),
                }
                for k, v in vs.items()
            },
        }


__all__ = [
    "FAMILIES",
    "DecayConfig",
    "DecayMonitor",
    "LabelStats",
    "VersionDecay",
    "family_psi",
    "psi",
    "reference_profile",
    "shares_in",
]
