"""River online calibration of raw model scores, one calibrator per model version.

What it learns
--------------
* **Platt scaling, online** (the served method): a ``river.linear_model.LogisticRegression``
  on ``logit(raw)`` (plus optional one-hot context features, e.g. ``position=0``,
  ``device_type=mobile``), trained with constant-rate SGD so it keeps tracking a moving
  target. It starts as the identity map (weight 1 on the logit centred at the prior's logit Z_REF, intercept Z_REF). After the
  drift detector fires, the learning rates are boosted for a while so it re-converges fast.
* **Binned isotonic** (reported alongside, selectable with ``method="isotonic"``): decayed
  click/impression sums in fixed logit-space bins of the raw score, made monotone with
  pool-adjacent-violators and interpolated in logit space.

Both are *served* from a compact parameter dump (JSON, no River needed to apply them), so
the scorer and the API apply them vectorized with numpy.

Metrics and drift
-----------------
Every labeled example is first scored with the current parameters (prequential: predict,
then learn). Rolling metrics over the last ``window`` examples: log loss, mean predicted CTR,
observed CTR, their ratio and the expected calibration error (ECE over ``ece_bins``
equal-mass bins of the prediction: the CTR scores sit in a narrow band, equal-width bins
would put nearly everything in one bin), for the raw score, Platt and isotonic.
A ``river.drift.ADWIN`` watches the residual ``y - p_served`` (bounded in [-1, 1]; its mean is
0 exactly when the served score is calibrated in the mean) and fires when it shifts.

Redis layout (``CAL_*`` below)
------------------------------
* ``cal:{model_version}`` - HASH: ``version`` (counter, +1 per checkpoint), ``params`` (JSON,
  the served parameter dump), ``metrics`` (JSON, rolling metrics), ``updated_ms``.
* ``cal:{model_version}:state`` - STRING: pickle of the job's full state for that version
  (River models, ADWIN, metric windows), used to resume the job.
* ``cal:{model_version}:history`` - LIST of JSON metric snapshots (capped), for the report.
* ``cal:{model_version}:drift`` - LIST of JSON drift events (capped).
* ``cal:versions`` - SET of model versions with a calibrator.
* ``cal:seq`` - STRING counter, +1 on every checkpoint of any version: the cheap check that
  ``CalibratorClient`` does (one GET) to know when to reload.
* ``cal:job`` - STRING: pickle of the job's join state and Kafka offsets (see
  ``ctrstream.calibration.job``); written in the same MULTI/EXEC as the versions' state.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ctrstream import features as F

CAL_SEQ_KEY = "cal:seq"
CAL_VERSIONS_KEY = "cal:versions"
CAL_JOB_KEY = "cal:job"
HISTORY_CAP = 2000
DRIFT_CAP = 500

EPS = 1e-6
LOGIT_CLIP = 15.0


def cal_key(model_version: str) -> str:
    return f"cal:{model_version}"


def cal_state_key(model_version: str) -> str:
    return f"cal:{model_version}:state"


def cal_history_key(model_version: str) -> str:
    return f"cal:{model_version}:history"


def cal_drift_key(model_version: str) -> str:
    return f"cal:{model_version}:drift"


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.clip(np.log(p) - np.log1p(-p), -LOGIT_CLIP, LOGIT_CLIP)


def sigmoid(z) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


# --------------------------------------------------------------------------- metrics

def log_loss(p, y) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(y, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def expected_calibration_error(p, y, n_bins: int = 10) -> float:
    """ECE over equal-mass bins of ``p``: sum_b (n_b / N) |mean p_b - mean y_b|."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(p)
    if n == 0:
        return float("nan")
    order = np.argsort(p, kind="stable")
    ece = 0.0
    for chunk in np.array_split(order, min(n_bins, n)):
        if len(chunk):
            ece += len(chunk) / n * abs(p[chunk].mean() - y[chunk].mean())
    return float(ece)


def calibration_summary(p, y, n_bins: int = 10) -> dict:
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mean_p = float(p.mean()) if len(p) else float("nan")
    obs = float(y.mean()) if len(y) else float("nan")
    return {
        "n": int(len(p)),
        "log_loss": log_loss(p, y),
        "mean_pred": mean_p,
        "observed_ctr": obs,
        "ratio": mean_p / obs if obs > 0 else float("nan"),
        "ece": expected_calibration_error(p, y, n_bins),
    }


# --------------------------------------------------------------------------- served parameters

def _context_features(context: dict | None, i: int, names: tuple[str, ...]) -> dict:
    if not context or not names:
        return {}
    out = {}
    for name in names:
        col = context.get(name)
        if col is not None:
            out[f"{name}={col[i]}"] = 1.0
    return out


# Platt scaling is learned on the logit centred at the prior's logit: SGD on an uncentred
# feature (logits of CTRs sit near -4) couples slope and intercept badly and overshoots.
Z_REF = float(np.log(F.PRIOR.mean / (1 - F.PRIOR.mean)))


def apply_params(params: dict | None, raw_scores, context: dict | None = None) -> np.ndarray:
    """Apply a served parameter dump to raw scores (vectorized). ``None`` = identity."""
    raw = np.asarray(raw_scores, dtype=np.float64)
    if not params:
        return raw.copy()
    method = params.get("method", "platt")
    z = logit(raw)
    if method == "isotonic" and params.get("isotonic"):
        iso = params["isotonic"]
        xs, ys = np.asarray(iso["x"]), np.asarray(iso["p"])
        if len(xs) >= 1:
            return sigmoid(np.interp(z, xs, logit(ys)))
    pl = params["platt"]
    out = pl["intercept"] + pl["w_logit"] * (z - pl.get("z_ref", 0.0))
    ctx_w: dict = pl.get("context", {})
    names = tuple(pl.get("context_names", ()))
    if names and ctx_w:
        if context:
            n = len(raw)
            add = np.zeros(n)
            for name in names:
                col = context.get(name)
                if col is None:
                    add += pl.get("context_mean", {}).get(name, 0.0)
                    continue
                col = np.asarray(col).astype(str)
                for value in np.unique(col):
                    w = ctx_w.get(f"{name}={value}")
                    if w:
                        add[col == value] += w
            out = out + add
        else:
            out = out + sum(pl.get("context_mean", {}).values())
    return sigmoid(out)


# --------------------------------------------------------------------------- the learners

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
    ece_bins: int = 10
    adwin_delta: float = 0.002
    iso_bins: int = 48
    iso_lo: float = -9.0  # logit range of the isotonic bins
    iso_hi: float = 3.0
    iso_half_life: float = 20_000.0  # examples
    iso_prior: float = 20.0  # pseudo-impressions per bin, at the Platt prediction


class BinnedIsotonic:
    """Decayed per-bin sums in logit space, made monotone by PAV on demand."""

    def __init__(self, cfg: CalibrationConfig):
        self.edges = np.linspace(cfg.iso_lo, cfg.iso_hi, cfg.iso_bins + 1)
        self.centers = (self.edges[:-1] + self.edges[1:]) / 2
        self.n = np.zeros(cfg.iso_bins)
        self.clicks = np.zeros(cfg.iso_bins)
        self.decay = 0.5 ** (1.0 / cfg.iso_half_life)
        self.prior = cfg.iso_prior

    def _bins(self, z: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(self.edges, z, side="right") - 1, 0, len(self.centers) - 1)

    def learn(self, z: np.ndarray, y: np.ndarray) -> None:
        f = self.decay ** len(z)
        self.n *= f
        self.clicks *= f
        b = self._bins(z)
        np.add.at(self.n, b, 1.0)
        np.add.at(self.clicks, b, y)

    def forget(self, factor: float) -> None:
        self.n *= factor
        self.clicks *= factor

    def params(self, platt_fn) -> dict:
        prior_p = platt_fn(self.centers)
        w = self.n + self.prior
        p = (self.clicks + self.prior * prior_p) / w
        p = _pav(p, w)
        return {"x": self.centers.tolist(), "p": np.clip(p, EPS, 1 - EPS).tolist()}


def _pav(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pool-adjacent-violators: the non-decreasing fit of ``y`` with weights ``w``."""
    vals, wts, sizes = [], [], []
    for yi, wi in zip(y.tolist(), w.tolist()):
        vals.append(yi); wts.append(wi); sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            tw = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / tw
            s = sizes[-2] + sizes[-1]
            vals[-2:] = [v]; wts[-2:] = [tw]; sizes[-2:] = [s]
    return np.repeat(vals, sizes)


@dataclass
class VersionCalibrator:
    """Online calibrator of one model version: River Platt + binned isotonic, metrics, ADWIN."""

    model_version: str
    cfg: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self):
        from river import drift, linear_model, optim

        self._opt = optim.SGD(self.cfg.lr)
        self.platt = linear_model.LogisticRegression(
            optimizer=self._opt, intercept_lr=self.cfg.intercept_lr, intercept_init=Z_REF)
        self.platt._weights["logit"] = 1.0  # start as the identity map (feature: z - Z_REF)
        self.iso = BinnedIsotonic(self.cfg)
        self.adwin = drift.ADWIN(delta=self.cfg.adwin_delta)
        w = self.cfg.window
        self._win = {k: deque(maxlen=w) for k in ("raw", "platt", "iso", "y")}
        self.n_seen = 0
        self.n_clicks = 0
        self.drift_events: list[dict] = []
        self._boost_left = 0
        self._ctx_mean: dict[str, float] = {}
        self.last_event_time_ms = 0
        self._avg: dict | None = None
        self._reset_avg = False

    # -- served parameters
    def _iterate(self) -> dict:
        w = dict(self.platt.weights)
        out = {k: float(v) for k, v in w.items()}
        out["__intercept__"] = float(self.platt.intercept)
        out.setdefault("logit", 1.0)
        return out

    def _average(self, n: int) -> None:
        """Polyak-style exponential average of the SGD iterates (what is served): constant-
        rate SGD keeps tracking, the average removes most of its step noise."""
        cur = self._iterate()
        if self._avg is None or n <= 0:
            self._avg = cur
            return
        f = 0.5 ** (n / self.cfg.avg_half_life)
        self._avg = {k: f * self._avg.get(k, 0.0) + (1 - f) * v for k, v in cur.items()}

    def params(self) -> dict:
        w = dict(self._avg) if self._avg is not None else self._iterate()
        intercept = w.pop("__intercept__")
        ctx = {k: v for k, v in w.items() if k != "logit"}
        platt = {"intercept": intercept, "w_logit": w.get("logit", 1.0), "z_ref": Z_REF,
                 "context": ctx, "context_names": list(self.cfg.context),
                 "context_mean": dict(self._ctx_mean)}
        platt_fn = lambda z: sigmoid(platt["intercept"] + platt["w_logit"] * (z - Z_REF)  # noqa: E731
                                     + sum(self._ctx_mean.values()))
        return {"model_version": self.model_version, "method": self.cfg.method,
                "platt": platt, "isotonic": self.iso.params(platt_fn),
                "n_seen": self.n_seen}

    def predict(self, raw, context: dict | None = None, method: str | None = None) -> np.ndarray:
        p = self.params()
        if method:
            p["method"] = method
        return apply_params(p, raw, context)

    # -- learning
    def learn_batch(self, raw, y, context: dict | None = None,
                    event_time_ms=None) -> list[dict]:
        """Prequential update on one micro-batch: score with the current parameters (for the
        metrics and the drift detector), then learn. Returns the drift events it raised."""
        raw = np.asarray(raw, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if len(raw) == 0:
            return []
        params = self.params()
        p_platt = apply_params({**params, "method": "platt"}, raw, context)
        p_iso = apply_params({**params, "method": "isotonic"}, raw, context)
        served = p_iso if self.cfg.method == "isotonic" else p_platt
        self._win["raw"].extend(raw.tolist())
        self._win["platt"].extend(p_platt.tolist())
        self._win["iso"].extend(p_iso.tolist())
        self._win["y"].extend(y.tolist())
        times = (np.asarray(event_time_ms, dtype=np.int64) if event_time_ms is not None
                 else np.zeros(len(raw), dtype=np.int64))
        events = []
        z = logit(raw)
        resid = y - served
        for i in range(len(raw)):
            self.n_seen += 1
            self.adwin.update(float(resid[i]))
            if self.adwin.drift_detected:
                ev = {"n_seen": self.n_seen, "event_time_ms": int(times[i]),
                      "detected_ms": int(time.time() * 1000), "signal": "residual",
                      "window_mean_residual": float(self.adwin.estimation)}
                events.append(ev)
                self._on_drift()
            x = {"logit": float(z[i]) - Z_REF}
            x.update(_context_features(context, i, self.cfg.context))
            if self._boost_left > 0:
                self._boost_left -= 1
                if self._boost_left == 0:
                    self._set_lr(1.0)
            self.platt.learn_one(x, int(y[i]))
        self.n_clicks += int(y.sum())
        if self.cfg.context and context:
            self._update_ctx_mean(context, len(raw))
        self.iso.learn(z, y)
        self._average(0 if self._reset_avg else len(raw))
        self._reset_avg = False
        if len(times):
            self.last_event_time_ms = max(self.last_event_time_ms, int(times.max()))
        self.drift_events.extend(events)
        return events

    def _set_lr(self, mult: float) -> None:
        from river import optim

        self._opt.lr = optim.schedulers.Constant(self.cfg.lr * mult)
        self.platt.intercept_lr = optim.schedulers.Constant(self.cfg.intercept_lr * mult)

    def _on_drift(self) -> None:
        self._boost_left = self.cfg.drift_boost_examples
        self._reset_avg = True  # serve the fresh iterate, not an average over the old regime
        self._set_lr(self.cfg.drift_boost)
        self.iso.forget(0.05)  # the old regime's bin rates no longer hold

    def _update_ctx_mean(self, context: dict, n: int) -> None:
        w = dict(self.platt.weights)
        for name in self.cfg.context:
            col = context.get(name)
            if col is None:
                continue
            vals, counts = np.unique(np.asarray(col).astype(str), return_counts=True)
            contrib = sum(w.get(f"{name}={v}", 0.0) * c for v, c in zip(vals, counts)) / n
            old = self._ctx_mean.get(name, contrib)
            self._ctx_mean[name] = 0.99 * old + 0.01 * contrib if name in self._ctx_mean else contrib

    # -- metrics
    def metrics(self) -> dict:
        y = np.fromiter(self._win["y"], dtype=np.float64)
        out = {"model_version": self.model_version, "n_seen": self.n_seen,
               "n_clicks": self.n_clicks, "window": len(y), "method": self.cfg.method,
               "drift_count": len(self.drift_events),
               "last_event_time_ms": self.last_event_time_ms,
               "platt_params": {k: v for k, v in self.params()["platt"].items()
                                if k in ("intercept", "w_logit")}}
        for k in ("raw", "platt", "iso"):
            out[k] = calibration_summary(np.fromiter(self._win[k], dtype=np.float64), y,
                                         self.cfg.ece_bins)
        out["calibrated"] = out["iso" if self.cfg.method == "isotonic" else "platt"]
        return out


def _finite(d):
    """JSON-safe copy (NaN -> None)."""
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_finite(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d


def dumps(obj) -> str:
    return json.dumps(_finite(obj))


# --------------------------------------------------------------------------- the client

class CalibratorClient:
    """Applies the latest checkpointed calibrator of each model version.

    Cheap freshness check: at most every ``check_interval_s`` one ``GET cal:seq``; only when
    it changed are the parameter dumps of the cached versions re-read. Redis being down is
    not an error: the last parameters (or the identity) keep being applied.
    """

    def __init__(self, settings=None, redis_client=None, check_interval_s: float = 1.0):
        import redis

        if redis_client is None:
            from ctrstream.config import get_settings

            settings = settings or get_settings()
            redis_client = redis.Redis.from_url(settings.redis.url, socket_timeout=0.5,
                                                socket_connect_timeout=0.5)
        self.r = redis_client
        self.check_interval_s = check_interval_s
        self._params: dict[str, dict | None] = {}
        self._seq: bytes | None = None
        self._checked = 0.0
        self.reloads = 0

    def _refresh(self, model_version: str) -> None:
        now = time.monotonic()
        missing = model_version not in self._params
        if not missing and now - self._checked < self.check_interval_s:
            return
        try:
            seq = self.r.get(CAL_SEQ_KEY)
            self._checked = now
            if seq != self._seq or missing:
                versions = list(self._params) if seq != self._seq else []
                if missing:
                    versions.append(model_version)
                pipe = self.r.pipeline(transaction=False)
                for v in versions:
                    pipe.hget(cal_key(v), "params")
                for v, raw in zip(versions, pipe.execute()):
                    self._params[v] = json.loads(raw) if raw else None
                self._seq = seq
                self.reloads += 1
        except Exception:  # noqa: BLE001 - Redis down: keep what we have
            self._params.setdefault(model_version, None)

    def params(self, model_version: str) -> dict | None:
        self._refresh(model_version)
        return self._params.get(model_version)

    def calibrate(self, raw_scores, model_version: str, context: dict | None = None) -> np.ndarray:
        return apply_params(self.params(model_version), raw_scores, context)
