"""Online calibration of raw model scores: a pure, River-style learner (no I/O).

:class:`Calibrator` learns, example by example, the map from a model's raw click
probability to a calibrated one, and serves it as a parameter dump
(:mod:`ctrstream.calibration.params`) that the scorer and the API apply with numpy.
:class:`VersionCalibrator` is what the calibration job keeps per model version: a
:class:`Calibrator` scored prequentially (predict, then learn) with rolling metrics.
Persistence is the store's (:mod:`ctrstream.store.calibration`); the Kafka join is the job's
(:mod:`ctrstream.calibration.job`).

What it learns
--------------
* **Platt scaling, online** (served by default): a logistic regression on ``logit(raw)``
  centred at the prior's logit (``Z_REF``), plus optional one-hot context features (e.g.
  ``position=0``, ``device_type=mobile``), trained with constant-rate SGD so that it keeps
  tracking a moving target (:class:`PlattSGD`: River's ``LogisticRegression`` update,
  written out so that it can start as the identity map - weight 1 on the logit, intercept
  ``Z_REF`` - through its constructor rather than River's private weights).
* **Polyak-style averaging**: what is served is an exponential average of the SGD iterates
  (half-life ``avg_half_life`` examples): constant-rate SGD keeps tracking, the average
  removes most of its step noise.
* **Drift**: a ``river.drift.ADWIN`` watches the residual ``y - p_served`` (bounded in
  [-1, 1]; its mean is 0 exactly when the served score is calibrated in the mean). When it
  fires, the learning rates are multiplied by ``drift_boost`` for ``drift_boost_examples``
  examples, the average restarts from the current iterate and the isotonic bins forget
  most of the old regime.
* **Binned isotonic** (reported alongside, served with ``method="isotonic"``): decayed
  click/impression sums in fixed logit-space bins of the raw score, made monotone with
  pool-adjacent-violators and interpolated in logit space.

Rolling metrics (:meth:`VersionCalibrator.metrics`) over the last ``window`` examples, for
the raw score, Platt and isotonic, are :func:`ctrstream.metrics.summary` - the same
definitions as the model card and the demo's report.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ctrstream import metrics as M
from ctrstream.calibration.params import (
    EPS,
    Z_REF,
    Context,
    Params,
    apply_params,
    logit,
    sigmoid,
)
from ctrstream.calibration.state import (
    LEARNER_KIND,
    STATE_FORMAT,
    AdwinState,
    CalibrationConfigState,
    LearnerState,
    PlattState,
    adwin_blob,
    adwin_state,
)

Floats = NDArray[np.float64]


@dataclass
class CalibrationConfig:
    method: str = "platt"  # served: "platt" or "isotonic"
    context: tuple[str, ...] = ()  # e.g. ("position", "device_type")
    lr: float = 0.005  # SGD rate of the logit weight and context weights
    intercept_lr: float = 0.01
    drift_boost: float = 5.0  # learning-rate multiplier after a drift detection ...
    drift_boost_examples: int = 3000  # ... for this many examples
    avg_half_life: float = 4000.0  # examples; served = exponential average of SGD iterates
    window: int = 10_000  # rolling-metrics window (examples)
    adwin_delta: float = 0.002
    iso_bins: int = 48
    iso_lo: float = -9.0  # logit range of the isotonic bins
    iso_hi: float = 3.0
    iso_half_life: float = 20_000.0  # examples
    iso_prior: float = 20.0  # pseudo-impressions per bin, at the Platt prediction

    def __post_init__(self) -> None:
        if self.method not in ("platt", "isotonic"):
            raise ValueError(f"method must be 'platt' or 'isotonic', got {self.method!r}")
        if self.window < 1 or self.iso_bins < 1 or self.avg_half_life <= 0:
            raise ValueError("window, iso_bins and avg_half_life must be positive")


# --------------------------------------------------------------------------- Platt by SGD


def _log_loss_gradient(y: int, z: float) -> float:
    """d(log loss)/dz at logit ``z`` for label ``y`` (0/1): ``sigmoid(z) - y``, computed as
    ``river.optim.losses.Log.gradient`` does (the same floating-point result)."""
    t = 1 if y else -1
    m = z * t
    if m > 18.0:
        return math.exp(-m) * -t
    if m < -18.0:
        return float(-t)
    return -t / (math.exp(m) + 1.0)


class PlattSGD:
    """Logistic regression on a dict of features by constant-rate SGD.

    River's ``LogisticRegression(optimizer=optim.SGD(lr), intercept_lr=intercept_lr)``
    update (intercept and weights step on the gradient at the pre-update weights; a feature's
    weight starts at its entry in ``weights_init``, else 0), with the learning rates scaled
    by :attr:`lr_multiplier`.

    Parameters
    ----------
    lr
        Learning rate of the weights.
    intercept_lr
        Learning rate of the intercept.
    intercept_init
        Initial intercept.
    weights_init
        Initial weights (features not listed start at 0).

    Examples
    --------
    >>> m = PlattSGD(lr=0.1, intercept_lr=0.1, weights_init={"z": 1.0})
    >>> m.predict_proba_one({"z": 0.0})
    0.5
    >>> m.learn_one({"z": 0.0}, 1)
    >>> round(m.intercept, 4), m.weights
    (0.05, {'z': 1.0})

    """

    def __init__(
        self,
        lr: float,
        intercept_lr: float,
        intercept_init: float = 0.0,
        weights_init: Mapping[str, float] | None = None,
    ):
        self.lr = float(lr)
        self.intercept_lr = float(intercept_lr)
        self.intercept = float(intercept_init)
        self.weights: dict[str, float] = dict(weights_init or {})
        self.lr_multiplier = 1.0

    def raw_one(self, x: Mapping[str, float]) -> float:
        """The logit: ``intercept + sum_k weights[k] * x[k]``."""
        w = self.weights
        return sum(w.get(k, 0.0) * v for k, v in x.items()) + self.intercept

    def predict_proba_one(self, x: Mapping[str, float]) -> float:
        return float(sigmoid(self.raw_one(x)))

    def learn_one(self, x: Mapping[str, float], y: int) -> None:
        g = _log_loss_gradient(y, self.raw_one(x))
        lr = self.lr * self.lr_multiplier
        self.intercept -= self.intercept_lr * self.lr_multiplier * g
        w = self.weights
        for k, v in x.items():
            w[k] = w.get(k, 0.0) - lr * (v * g)


# --------------------------------------------------------------------------- binned isotonic


class BinnedIsotonic:
    """Decayed per-bin sums in logit space, made monotone by PAV on demand."""

    def __init__(self, cfg: CalibrationConfig):
        self.edges = np.linspace(cfg.iso_lo, cfg.iso_hi, cfg.iso_bins + 1)
        self.centers = (self.edges[:-1] + self.edges[1:]) / 2
        self.n = np.zeros(cfg.iso_bins)
        self.clicks = np.zeros(cfg.iso_bins)
        self.decay = 0.5 ** (1.0 / cfg.iso_half_life)
        self.prior = cfg.iso_prior

    def _bins(self, z: Floats) -> NDArray[np.intp]:
        return np.clip(np.searchsorted(self.edges, z, side="right") - 1, 0, len(self.centers) - 1)

    def learn(self, z: Floats, y: Floats) -> None:
        f = self.decay ** len(z)
        self.n *= f
        self.clicks *= f
        b = self._bins(z)
        np.add.at(self.n, b, 1.0)
        np.add.at(self.clicks, b, y)

    def forget(self, factor: float) -> None:
        self.n *= factor
        self.clicks *= factor

    def params(self, platt_fn: Callable[[Floats], Floats]) -> dict[str, list[float]]:
        """Bin centres (logit) and monotone rates; each bin is shrunk towards ``platt_fn``
        at its centre by ``prior`` pseudo-impressions."""
        prior_p = platt_fn(self.centers)
        w = self.n + self.prior
        p = (self.clicks + self.prior * prior_p) / w
        p = _pav(p, w)
        return {"x": self.centers.tolist(), "p": np.clip(p, EPS, 1 - EPS).tolist()}


def _pav(y: Floats, w: Floats) -> Floats:
    """Pool-adjacent-violators: the non-decreasing fit of ``y`` with weights ``w``."""
    vals: list[float] = []
    wts: list[float] = []
    sizes: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist()):
        vals.append(yi)
        wts.append(wi)
        sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            tw = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / tw
            s = sizes[-2] + sizes[-1]
            vals[-2:] = [v]
            wts[-2:] = [tw]
            sizes[-2:] = [s]
    return np.repeat(vals, sizes)


# --------------------------------------------------------------------------- the learner


def _context_columns(context: Context | None, names: tuple[str, ...]) -> dict[str, NDArray[Any]]:
    """The context columns the learner uses (those of ``names`` that are given), as arrays."""
    if not context or not names:
        return {}
    return {name: np.asarray(context[name]) for name in names if context.get(name) is not None}


def _context_features(columns: dict[str, NDArray[Any]], i: int) -> dict[str, float]:
    """One-hot features ``{name}={value}`` of row ``i`` of the context columns."""
    return {f"{name}={col[i]}": 1.0 for name, col in columns.items()}


class Calibrator:
    """Online calibrator of one model's raw click probabilities (see the module docstring).

    River-style: :meth:`learn_one` / :meth:`predict_one` on a dict ``x`` with the raw score
    under ``"raw"`` and the context columns of ``cfg.context`` under their names; the batch
    forms :meth:`learn_many` / :meth:`predict_many` take numpy arrays (the job learns
    micro-batches). Unlike a River classifier, :meth:`predict_one` returns the calibrated
    click probability (:meth:`predict_proba_one` gives River's ``{False: 1 - p, True: p}``).
    :meth:`params` is the served parameter dump: ``predict_*`` is ``apply_params`` of it.

    Parameters
    ----------
    cfg
        Learning rates, drift response, isotonic bins; :class:`CalibrationConfig`.

    Attributes
    ----------
    n_seen, n_clicks
        Examples and clicks learned from.
    drift_events
        One dict per drift detection: ``n_seen``, ``event_time_ms``, ``signal``,
        ``window_mean_residual`` (the residual mean that ADWIN settled on: > 0 means more
        clicks than the served score predicts).

    Examples
    --------
    It starts as the identity map:

    >>> cal = Calibrator()
    >>> round(cal.predict_one({"raw": 0.05}), 9)
    0.05

    A model that ignored its 10 % negative down-sampling predicts several times too high;
    after 50,000 labeled examples the served map has its mean right (held-out mean
    prediction / observed CTR within 10 % of 1) and undoes the distortion:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> p = 1 / (1 + np.exp(-rng.normal(-3.5, 0.8, 60_000)))  # true click probabilities
    >>> raw = p / (p + (1 - p) * 0.1)                         # the model's scores
    >>> y = (rng.random(60_000) < p).astype(float)
    >>> for s in range(0, 50_000, 1000):
    ...     _ = cal.learn_many(raw[s:s + 1000], y[s:s + 1000])
    >>> held = slice(50_000, None)
    >>> bool(raw[held].mean() / y[held].mean() > 5)
    True
    >>> ratio = cal.predict_many(raw[held]).mean() / y[held].mean()
    >>> bool(abs(ratio - 1) < 0.1)
    True
    >>> bool(abs(cal.predict_one({"raw": 0.5}) - 0.1 * 0.5 / (1 - 0.5 + 0.1 * 0.5)) < 0.01)
    True

    One example at a time works the same way (it is :meth:`learn_many` of one example):

    >>> cal.learn_one({"raw": 0.3}, True)
    >>> cal.n_seen
    50001

    """

    def __init__(self, cfg: CalibrationConfig | None = None):
        from river import drift

        self.cfg = cfg or CalibrationConfig()
        self.platt = PlattSGD(
            self.cfg.lr, self.cfg.intercept_lr, intercept_init=Z_REF, weights_init={"logit": 1.0}
        )  # the identity (feature z - Z_REF)
        self.iso = BinnedIsotonic(self.cfg)
        self.adwin = drift.ADWIN(delta=self.cfg.adwin_delta)
        self.n_seen = 0
        self.n_clicks = 0
        self.drift_events: list[dict[str, Any]] = []
        self.last_event_time_ms = 0
        self._boost_left = 0
        self._ctx_mean: dict[str, float] = {}
        self._avg: dict[str, float] | None = None
        self._reset_avg = False

    # -- River-style, one example

    def _one(self, x: Mapping[str, Any]) -> tuple[Floats, Context]:
        if "raw" not in x:
            raise ValueError(f"x must hold the raw score under 'raw', got keys {sorted(x)}")
        return (
            np.array([float(x["raw"])]),
            {name: [x[name]] for name in self.cfg.context if name in x},
        )

    def learn_one(self, x: Mapping[str, Any], y: bool | int) -> None:
        """Learn from one example: ``x = {"raw": score, **context}``, ``y`` clicked."""
        raw, ctx = self._one(x)
        self.learn_many(raw, np.array([float(y)]), ctx)

    def predict_one(self, x: Mapping[str, Any]) -> float:
        """The served (calibrated) click probability of ``x = {"raw": score, **context}``."""
        raw, ctx = self._one(x)
        return float(self.predict_many(raw, ctx)[0])

    def predict_proba_one(self, x: Mapping[str, Any]) -> dict[bool, float]:
        p = self.predict_one(x)
        return {False: 1.0 - p, True: p}

    # -- batches

    def predict_many(
        self, raw: ArrayLike, context: Context | None = None, method: str | None = None
    ) -> Floats:
        """Served probabilities of raw scores (``method`` overrides ``cfg.method``)."""
        if (method or self.cfg.method) == "isotonic":
            return apply_params({**self.params(), "method": "isotonic"}, raw, context)
        # Platt needs neither the isotonic fit nor the rest of the dump
        return apply_params({"method": "platt", "platt": self._platt_params()}, raw, context)

    def learn_many(
        self,
        raw: ArrayLike,
        y: ArrayLike,
        context: Context | None = None,
        event_time_ms: ArrayLike | None = None,
    ) -> list[dict[str, Any]]:
        """Learn from a batch of examples, in order: each one first updates the drift
        detector with its residual under the parameters served before the batch, then the
        SGD step; the isotonic sums and the served average move once per batch. Returns the
        drift events the batch raised."""
        raw_a = np.asarray(raw, dtype=np.float64).reshape(-1)
        y_a = np.asarray(y, dtype=np.float64).reshape(-1)
        if len(raw_a) != len(y_a):
            raise ValueError(f"{len(raw_a)} raw scores for {len(y_a)} labels")
        if len(raw_a) == 0:
            return []
        served = self.predict_many(raw_a, context)
        times = (
            np.asarray(event_time_ms, dtype=np.int64).reshape(-1)
            if event_time_ms is not None
            else np.zeros(len(raw_a), dtype=np.int64)
        )
        events = []
        z = logit(raw_a)
        resid = y_a - served
        columns = _context_columns(context, self.cfg.context)
        for i in range(len(raw_a)):
            self.n_seen += 1
            self.adwin.update(float(resid[i]))
            if self.adwin.drift_detected:
                events.append(
                    {
                        "n_seen": self.n_seen,
                        "event_time_ms": int(times[i]),
                        "signal": "residual",
                        "window_mean_residual": float(self.adwin.estimation),
                    }
                )
                self._on_drift()
            x = {"logit": float(z[i]) - Z_REF}
            x.update(_context_features(columns, i))
            if self._boost_left > 0:
                self._boost_left -= 1
                if self._boost_left == 0:
                    self.platt.lr_multiplier = 1.0
            self.platt.learn_one(x, int(y_a[i]))
        self.n_clicks += int(y_a.sum())
        if self.cfg.context and context:
            self._update_ctx_mean(context, len(raw_a))
        self.iso.learn(z, y_a)
        self._average(0 if self._reset_avg else len(raw_a))
        self._reset_avg = False
        if len(times):
            self.last_event_time_ms = max(self.last_event_time_ms, int(times.max()))
        self.drift_events.extend(events)
        return events

    # -- the served parameters

    def _iterate(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.platt.weights.items()}
        out["__intercept__"] = float(self.platt.intercept)
        out.setdefault("logit", 1.0)
        return out

    def _average(self, n: int) -> None:
        """Exponential average of the SGD iterates over ``n`` more examples (0: restart)."""
        cur = self._iterate()
        if self._avg is None or n <= 0:
            self._avg = cur
            return
        f = 0.5 ** (n / self.cfg.avg_half_life)
        self._avg = {k: f * self._avg.get(k, 0.0) + (1 - f) * v for k, v in cur.items()}

    def _platt_params(self) -> dict[str, Any]:
        w = dict(self._avg) if self._avg is not None else self._iterate()
        intercept = w.pop("__intercept__")
        ctx = {k: v for k, v in w.items() if k != "logit"}
        return {
            "intercept": intercept,
            "w_logit": w.get("logit", 1.0),
            "z_ref": Z_REF,
            "context": ctx,
            "context_names": list(self.cfg.context),
            "context_mean": dict(self._ctx_mean),
        }

    def params(self) -> Params:
        """The served parameter dump (:mod:`ctrstream.calibration.params`), without the
        model version."""
        platt = self._platt_params()
        shift = sum(self._ctx_mean.values())

        def platt_fn(z: Floats) -> Floats:
            return sigmoid(platt["intercept"] + platt["w_logit"] * (z - Z_REF) + shift)

        return {
            "method": self.cfg.method,
            "platt": platt,
            "isotonic": self.iso.params(platt_fn),
            "n_seen": self.n_seen,
        }

    # -- drift and context

    def _on_drift(self) -> None:
        self._boost_left = self.cfg.drift_boost_examples
        self._reset_avg = True  # serve the fresh iterate, not an average over the old regime
        self.platt.lr_multiplier = self.cfg.drift_boost
        self.iso.forget(0.05)  # the old regime's bin rates no longer hold

    def _update_ctx_mean(self, context: Context, n: int) -> None:
        w = self.platt.weights
        for name in self.cfg.context:
            col = context.get(name)
            if col is None:
                continue
            vals, counts = np.unique(np.asarray(col).astype(str), return_counts=True)
            contrib = sum(w.get(f"{name}={v}", 0.0) * c for v, c in zip(vals, counts)) / n
            old = self._ctx_mean.get(name, contrib)
            self._ctx_mean[name] = (
                0.99 * old + 0.01 * contrib if name in self._ctx_mean else contrib
            )


# --------------------------------------------------------------------------- per model version


def _adwin_from_state(s: AdwinState) -> Any:
    """A ``river.drift.ADWIN`` holding the window of ``s``."""
    from river import drift

    adwin = drift.ADWIN(
        delta=s.delta,
        clock=s.clock,
        max_buckets=s.max_buckets,
        min_window_length=int(s.min_window_length),
        grace_period=int(s.grace_period),
    )
    adwin._helper.__setstate__(adwin_blob(s))
    adwin._drift_detected = s.drift_detected
    return adwin


class RollingMetrics:
    """The last ``window`` (raw, Platt, isotonic, label) quadruples, and their metrics."""

    SCORES = ("raw", "platt", "iso")

    def __init__(self, window: int):
        self.win: dict[str, deque[float]] = {k: deque(maxlen=window) for k in (*self.SCORES, "y")}

    def extend(self, raw: Floats, platt: Floats, iso: Floats, y: Floats) -> None:
        for k, a in zip((*self.SCORES, "y"), (raw, platt, iso, y)):
            self.win[k].extend(a.tolist())

    def __len__(self) -> int:
        return len(self.win["y"])

    def summaries(self) -> dict[str, dict[str, Any]]:
        """:func:`ctrstream.metrics.summary` of each score over the window."""
        y = np.fromiter(self.win["y"], dtype=np.float64)
        return {k: M.summary(np.fromiter(self.win[k], dtype=np.float64), y) for k in self.SCORES}


@dataclass
class VersionCalibrator:
    """The calibration job's state of one model version: a :class:`Calibrator` scored
    prequentially - every batch is first predicted with the current parameters, into the
    :class:`RollingMetrics`, then learned from."""

    model_version: str
    cfg: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        self.calibrator = Calibrator(self.cfg)
        self.rolling = RollingMetrics(self.cfg.window)

    def to_state(self) -> LearnerState:
        """Everything the learner knows, as plain data (:mod:`ctrstream.calibration.state`):
        :meth:`from_state` of it predicts and learns exactly as this one does."""
        c = self.calibrator
        cfg = self.cfg
        return LearnerState(
            kind=LEARNER_KIND,
            state_format=STATE_FORMAT,
            model_version=self.model_version,
            cfg=CalibrationConfigState(
                method=cfg.method,
                context=list(cfg.context),
                lr=cfg.lr,
                intercept_lr=cfg.intercept_lr,
                drift_boost=cfg.drift_boost,
                drift_boost_examples=cfg.drift_boost_examples,
                avg_half_life=cfg.avg_half_life,
                window=cfg.window,
                adwin_delta=cfg.adwin_delta,
                iso_bins=cfg.iso_bins,
                iso_lo=cfg.iso_lo,
                iso_hi=cfg.iso_hi,
                iso_half_life=cfg.iso_half_life,
                iso_prior=cfg.iso_prior,
            ),
            platt=PlattState(
                lr=c.platt.lr,
                intercept_lr=c.platt.intercept_lr,
                intercept=float(c.platt.intercept),
                weights={k: float(v) for k, v in c.platt.weights.items()},
                lr_multiplier=c.platt.lr_multiplier,
            ),
            iso_n=c.iso.n.tolist(),
            iso_clicks=c.iso.clicks.tolist(),
            adwin=adwin_state(c.adwin._helper.__getstate__(), bool(c.adwin.drift_detected)),
            n_seen=int(c.n_seen),
            n_clicks=int(c.n_clicks),
            drift_events=[dict(e) for e in c.drift_events],
            last_event_time_ms=c.last_event_time_ms,
            boost_left=c._boost_left,
            ctx_mean={k: float(v) for k, v in c._ctx_mean.items()},
            avg=None if c._avg is None else {k: float(v) for k, v in c._avg.items()},
            reset_avg=c._reset_avg,
            rolling={k: list(v) for k, v in self.rolling.win.items()},
        )

    @classmethod
    def from_state(cls, state: LearnerState) -> VersionCalibrator:
        """The learner :meth:`to_state` wrote (``state`` is validated by its decoder)."""
        sc = state.cfg
        cfg = CalibrationConfig(
            method=sc.method,
            context=tuple(sc.context),
            lr=sc.lr,
            intercept_lr=sc.intercept_lr,
            drift_boost=sc.drift_boost,
            drift_boost_examples=sc.drift_boost_examples,
            avg_half_life=sc.avg_half_life,
            window=sc.window,
            adwin_delta=sc.adwin_delta,
            iso_bins=sc.iso_bins,
            iso_lo=sc.iso_lo,
            iso_hi=sc.iso_hi,
            iso_half_life=sc.iso_half_life,
            iso_prior=sc.iso_prior,
        )
        vc = cls(state.model_version, cfg)
        c = vc.calibrator
        p = state.platt
        c.platt.lr, c.platt.intercept_lr = p.lr, p.intercept_lr
        c.platt.intercept, c.platt.weights = p.intercept, dict(p.weights)
        c.platt.lr_multiplier = p.lr_multiplier
        c.iso.n = np.asarray(state.iso_n, dtype=np.float64)
        c.iso.clicks = np.asarray(state.iso_clicks, dtype=np.float64)
        c.adwin = _adwin_from_state(state.adwin)
        c.n_seen, c.n_clicks = state.n_seen, state.n_clicks
        c.drift_events = [dict(e) for e in state.drift_events]
        c.last_event_time_ms = state.last_event_time_ms
        c._boost_left = state.boost_left
        c._ctx_mean = dict(state.ctx_mean)
        c._avg = None if state.avg is None else dict(state.avg)
        c._reset_avg = state.reset_avg
        for k, values in state.rolling.items():
            vc.rolling.win[k].extend(values)
        return vc

    # the job's and the report's view of the learner
    @property
    def n_seen(self) -> int:
        return self.calibrator.n_seen

    @property
    def n_clicks(self) -> int:
        return self.calibrator.n_clicks

    @property
    def drift_events(self) -> list[dict[str, Any]]:
        return self.calibrator.drift_events

    def learn_many(
        self,
        raw: ArrayLike,
        y: ArrayLike,
        context: Context | None = None,
        event_time_ms: ArrayLike | None = None,
    ) -> list[dict[str, Any]]:
        """Score the batch for the rolling metrics, then :meth:`Calibrator.learn_many`; the
        drift events it returns carry ``detected_ms`` (wall clock) too."""
        raw_a = np.asarray(raw, dtype=np.float64).reshape(-1)
        y_a = np.asarray(y, dtype=np.float64).reshape(-1)
        if len(raw_a) == 0:
            return []
        params = self.calibrator.params()
        p_platt = apply_params({**params, "method": "platt"}, raw_a, context)
        p_iso = apply_params({**params, "method": "isotonic"}, raw_a, context)
        events = self.calibrator.learn_many(raw_a, y_a, context, event_time_ms)
        self.rolling.extend(raw_a, p_platt, p_iso, y_a)
        now_ms = int(time.time() * 1000)
        for ev in events:
            ev["detected_ms"] = now_ms
        return events

    def predict_many(
        self, raw: ArrayLike, context: Context | None = None, method: str | None = None
    ) -> Floats:
        return self.calibrator.predict_many(raw, context, method)

    def params(self) -> Params:
        """The served parameter dump, with the model version."""
        return {"model_version": self.model_version, **self.calibrator.params()}

    def metrics(self) -> dict[str, Any]:
        """Rolling metrics of the raw, Platt and isotonic scores (``calibrated``: the served
        one) and the learner's counters."""
        c = self.calibrator
        platt = c.params()["platt"]
        out: dict[str, Any] = {
            "model_version": self.model_version,
            "n_seen": c.n_seen,
            "n_clicks": c.n_clicks,
            "window": len(self.rolling),
            "method": self.cfg.method,
            "drift_count": len(c.drift_events),
            "last_event_time_ms": c.last_event_time_ms,
            "platt_params": {k: platt[k] for k in ("intercept", "w_logit")},
        }
        out.update(self.rolling.summaries())
        out["calibrated"] = out["iso" if self.cfg.method == "isotonic" else "platt"]
        return out


__all__ = [
    "STATE_FORMAT",
    "BinnedIsotonic",
    "CalibrationConfig",
    "Calibrator",
    "PlattSGD",
    "RollingMetrics",
    "VersionCalibrator",
]
