"""An experiment's analysis at one look: per-arm metrics, comparisons, SRM, guardrails, truth.

:func:`analyze` is the one production path: the closed loop calls it at every look, the
report calls it at the end, and the unit tests run thousands of simulated A/A and A/B
experiments through it. It takes per-user aggregates per arm (:class:`ArmData`; build them
with :func:`arm_data` from per-request and per-impression arrays) and returns a
:class:`Report`. The statistics (delta method over users, CUPED, the mSPRT, the SRM test)
are :mod:`ctrstream.experiments.stats`; their definitions and references are documented
there.

What a report holds
-------------------
* per arm (:class:`ArmStats`): users, requests, impressions, clicks, revenue; CTR, revenue
  per request, eCPM, fill rate and calibration (predicted / observed clicks), each a
  :class:`Estimate` with a fixed-horizon ``1 - alpha`` delta-method interval over users (a
  description of the arm, not a test) and its **true value** from the world's click
  probabilities (``exp_clicks``, ``exp_revenue``: the expectation of the arm's decisions,
  without click noise); latency p50 / p99, error and degraded rates; regret against the
  oracle arm in true revenue per request and true CTR.
* per treatment arm vs control, for the primary metric and CTR (:class:`Comparison`): the
  relative lift ``M_T / M_C - 1`` (log-ratio scale internally, CUPED-adjusted when every
  compared arm has a pre-period covariate), its **always-valid** confidence interval and
  p-value (mSPRT normal mixture), whether it is decided, the true lift and whether the
  interval covers it, and whether a decision was right (its direction is the true lift's).
* the SRM test of users per deciding arm vs the weights, and the guardrail breaches.

A shadow arm decides nothing: its data are the requests it scored and the impressions other
arms showed (their labels), so of its per-arm numbers only calibration (its predictions
against those labels) and latency are its own; it is in no comparison and not in the SRM
test, and the markdown table shows only those columns for it. The SRM test runs at every
look at a small threshold (``Guardrails.srm_p_min``, 0.001 by default) so that repeated
checking seldom raises a false alarm.

Looks and decisions (:class:`SequentialState`)
----------------------------------------------
A look *counts* once the experiment has run ``min_run_s`` of event time and every compared
arm has ``min_users_per_arm`` users: the world has novelty and fatigue effects (an early
lift is not the lasting one) and the mSPRT's guarantee rests on a normal approximation that
needs a sample. Pass the same :class:`SequentialState` to every look (the registry stores
it): it keeps, per comparison, the running minimum of the always-valid p-value and the
running intersection of the confidence intervals over counted looks, so both are monotone,
and the event time and direction of the first decision (``p < alpha``), which then stands.
Without a state, one look is analysed on its own.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import stats
from .design import Experiment

# the per-user columns of an arm's moment matrix
_REQ, _IMP, _CLK, _REV, _FILL, _SLOTS, _XCLK, _XREV, _PRED, _PRE = range(10)
_COLS = (
    "requests",
    "impressions",
    "clicks",
    "revenue",
    "filled_slots",
    "slots",
    "exp_clicks",
    "exp_revenue",
    "predicted_clicks",
)
# metric -> (numerator column, denominator column, scale, true numerator column or None)
_METRICS: dict[str, tuple[int, int, float, int | None]] = {
    "ctr": (_CLK, _IMP, 1.0, _XCLK),
    "revenue_per_request": (_REV, _REQ, 1.0, _XREV),
    "ecpm": (_REV, _IMP, 1000.0, _XREV),
    "fill_rate": (_FILL, _SLOTS, 1.0, None),
    "calibration": (_PRED, _CLK, 1.0, None),
}


def _empty() -> NDArray[np.float64]:
    return np.zeros(0, dtype=np.float64)


@dataclass
class ArmData:
    """Per-user aggregates of one arm over the experiment so far (arrays of one length).

    ``revenue``: what advertisers paid (the prices of clicked impressions);
    ``exp_clicks`` / ``exp_revenue``: the sums of the true click probability and of true
    probability x price over the user's impressions (the world's truth);
    ``predicted_clicks``: the sum of the deciding model's calibrated pCTR at the shown slot;
    ``pre_metric``: the user's pre-period value of a metric (the CUPED covariate), optional;
    ``latency_ms``: per-request ranking latency samples; ``errors`` / ``degraded``:
    requests that failed / were served degraded.
    """

    user_id: np.ndarray
    requests: np.ndarray
    impressions: np.ndarray
    clicks: np.ndarray
    revenue: np.ndarray
    filled_slots: np.ndarray
    slots: np.ndarray
    exp_clicks: np.ndarray
    exp_revenue: np.ndarray
    predicted_clicks: np.ndarray
    pre_metric: np.ndarray | None = None
    latency_ms: np.ndarray = field(default_factory=_empty)
    errors: int = 0
    degraded: int = 0

    @classmethod
    def empty(cls) -> ArmData:
        z = _empty()
        return cls(np.zeros(0, np.int64), z, z, z, z, z, z, z, z, z)

    def validate(self, arm: str = "?") -> ArmData:
        """This data, or a ValueError naming the arm and the column that is wrong."""
        self._checked(arm)
        return self

    def _checked(self, arm: str) -> NDArray[np.float64]:
        """The per-user columns as a matrix (users x columns), checked."""
        n = len(self.user_id)
        cols = {c: getattr(self, c) for c in _COLS}
        if self.pre_metric is not None:
            cols["pre_metric"] = self.pre_metric
        for c, v in cols.items():
            if len(v) != n:
                raise ValueError(
                    f"arm {arm!r}: column {c} has {len(v)} values for {n} users: every "
                    "per-user column must have one value per user_id"
                )
        x = self.matrix(False)
        if x.size and not (np.isfinite(x).all() and (x >= 0).all()):
            bad = [
                c
                for j, c in enumerate(_COLS)
                if not (np.isfinite(x[:, j]).all() and (x[:, j] >= 0).all())
            ]
            raise ValueError(f"arm {arm!r}: columns {bad} have negative or non-finite values")
        if self.pre_metric is not None and not np.isfinite(self.pre_metric).all():
            raise ValueError(f"arm {arm!r}: pre_metric has non-finite values (use 0 for none)")
        if self.errors < 0 or self.degraded < 0:
            raise ValueError(f"arm {arm!r}: errors and degraded must be >= 0")
        return x

    def matrix(self, with_pre: bool = False) -> NDArray[np.float64]:
        """The per-user columns (users x columns; the covariate last when ``with_pre``)."""
        cols = [np.asarray(getattr(self, c), dtype=np.float64) for c in _COLS]
        if with_pre:
            pre = np.zeros(len(self.user_id)) if self.pre_metric is None else self.pre_metric
            cols.append(np.asarray(pre, dtype=np.float64))
        return np.column_stack(cols) if cols[0].size else np.zeros((0, len(cols)))


def arm_data(
    *,
    request_user: np.ndarray,
    request_slots: np.ndarray,
    request_filled: np.ndarray,
    imp_user: np.ndarray,
    imp_clicked: np.ndarray,
    imp_price: np.ndarray,
    imp_p_true: np.ndarray,
    imp_predicted: np.ndarray | None = None,
    latency_ms: np.ndarray | None = None,
    errors: int = 0,
    degraded: int = 0,
    pre: tuple[np.ndarray, np.ndarray] | None = None,
) -> ArmData:
    """One arm's per-user aggregates from its per-request and per-impression arrays.

    ``request_*``: one value per request (its user, slots offered, slots filled);
    ``imp_*``: one per impression (its user, clicked, price per click, true p at its slot,
    the model's calibrated pCTR at its slot); ``pre``: (user ids, values) of the CUPED
    covariate, users not in it get 0.
    """
    users, inv = np.unique(np.asarray(request_user), return_inverse=True)
    n = len(users)
    iu = np.searchsorted(users, np.asarray(imp_user))
    if len(imp_user) and (
        (iu >= n).any() or (users[np.minimum(iu, max(n - 1, 0))] != imp_user).any()
    ):
        raise ValueError("an impression's user has no request in this arm: pass every request")

    def per_user(idx: np.ndarray, w: np.ndarray | None) -> NDArray[np.float64]:
        return np.bincount(idx, weights=w, minlength=n).astype(np.float64)

    clicked = np.asarray(imp_clicked, dtype=np.float64)
    price = np.asarray(imp_price, dtype=np.float64)
    p_true = np.asarray(imp_p_true, dtype=np.float64)
    pre_metric = None
    if pre is not None:
        pu, pv = np.asarray(pre[0]), np.asarray(pre[1], dtype=np.float64)
        order = np.argsort(pu)
        pu, pv = pu[order], pv[order]
        j = np.searchsorted(pu, users)
        jj = np.minimum(j, max(len(pu) - 1, 0))
        hit = (j < len(pu)) & (pu[jj] == users) if len(pu) else np.zeros(n, bool)
        pre_metric = np.where(hit, pv[jj] if len(pv) else 0.0, 0.0)
    return ArmData(
        user_id=users,
        requests=per_user(inv, None),
        impressions=per_user(iu, None),
        clicks=per_user(iu, clicked),
        revenue=per_user(iu, clicked * price),
        filled_slots=per_user(inv, np.asarray(request_filled, dtype=np.float64)),
        slots=per_user(inv, np.asarray(request_slots, dtype=np.float64)),
        exp_clicks=per_user(iu, p_true),
        exp_revenue=per_user(iu, p_true * price),
        predicted_clicks=per_user(
            iu, np.zeros(len(iu)) if imp_predicted is None else np.asarray(imp_predicted, float)
        ),
        pre_metric=pre_metric,
        latency_ms=_empty() if latency_ms is None else np.asarray(latency_ms, dtype=np.float64),
        errors=errors,
        degraded=degraded,
    ).validate()


@dataclass
class Estimate:
    """A per-arm ratio metric: the estimate, its fixed-horizon interval, the truth."""

    value: float
    lo: float
    hi: float
    se: float
    true: float | None = None


@dataclass
class ArmStats:
    name: str
    kind: str
    shadow: bool
    weight: float
    users: int
    requests: int
    impressions: int
    clicks: int
    revenue: float
    metrics: dict[str, Estimate]
    latency_p50_ms: float
    latency_p99_ms: float
    error_rate: float
    degraded_rate: float
    # the oracle arm's true value minus this arm's (None without an oracle arm); it can be
    # negative: the oracle maximises welfare (bid x true p), not revenue or CTR
    regret_revenue_per_request: float | None = None
    regret_ctr: float | None = None


@dataclass
class Comparison:
    """Treatment vs control on one metric at this look (see the module doc)."""

    metric: str
    treatment: str
    control: str
    lift: float  # relative: M_T / M_C - 1 (CUPED-adjusted when cuped)
    lo: float  # always-valid interval of the lift (running intersection with a state)
    hi: float
    p_value: float  # always-valid (running minimum with a state)
    look_p_value: float  # this look's 1 / Lambda alone
    z: float  # this look's log-ratio / its standard error: a fixed-horizon z, never a decision
    mde: float  # the relative lift a fixed-horizon test of this sample detects with 80 %
    # power, exp((z_{1-alpha/2} + z_0.8) * se) - 1: a lower bound of what the sequential
    # test can decide (it needs more), i.e. what "inconclusive" means at this sample
    counted: bool  # this look met min_run_s and min_users_per_arm
    decided: bool
    direction: str | None  # "up" / "down" when decided
    decided_at_ms: int | None
    decided_elapsed_s: float | None
    true_lift: float | None
    covered: bool | None
    right: bool | None  # decided and the direction is the true lift's sign
    cuped: bool
    variance_reduction: float  # CUPED: 1 - Var(adjusted) / Var(raw); 0 without it
    users: tuple[int, int]  # (treatment, control)
    verdict: str


@dataclass
class Srm:
    arms: list[str]
    users: list[int]
    weights: list[float]
    chi2: float
    p_value: float


@dataclass
class Breach:
    """A broken guardrail: ``arm`` None means the whole experiment (SRM)."""

    arm: str | None
    guardrail: str
    value: float
    threshold: str
    message: str


@dataclass
class ComparisonState:
    looks: int = 0
    p_value: float = 1.0
    lo: float = -math.inf  # log-ratio scale
    hi: float = math.inf
    decided_at_ms: int | None = None
    decided_elapsed_s: float | None = None
    direction: str | None = None


@dataclass
class SequentialState:
    """Per comparison (``"treatment:control:metric"``): counted looks, the running minimum
    p-value, the running interval intersection (log-ratio scale), and the first decision.
    JSON through :meth:`to_dict` / :meth:`from_dict` (infinities as ``None``)."""

    comparisons: dict[str, ComparisonState] = field(default_factory=dict)

    @staticmethod
    def key(treatment: str, control: str, metric: str) -> str:
        return f"{treatment}:{control}:{metric}"

    def get(self, key: str) -> ComparisonState:
        return self.comparisons.setdefault(key, ComparisonState())

    def to_dict(self) -> dict[str, Any]:
        return {"comparisons": {k: _jsonable(asdict(v)) for k, v in self.comparisons.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SequentialState:
        out = cls()
        for k, v in d.get("comparisons", {}).items():
            v = dict(v)
            v["lo"] = -math.inf if v.get("lo") is None else float(v["lo"])
            v["hi"] = math.inf if v.get("hi") is None else float(v["hi"])
            out.comparisons[k] = ComparisonState(**v)
        return out


def _jsonable(x: Any) -> Any:
    """``x`` with non-finite floats as None and tuples as lists (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


@dataclass
class Report:
    experiment: str
    elapsed_s: float
    at_ms: int | None
    alpha: float
    primary_metric: str
    control: str
    arms: list[ArmStats]
    comparisons: list[Comparison]
    srm: Srm
    breaches: list[Breach]

    @property
    def breached_arms(self) -> list[str]:
        """Arms with a broken guardrail (the caller stops them)."""
        return sorted({b.arm for b in self.breaches if b.arm is not None})

    @property
    def stop_experiment(self) -> bool:
        """An experiment-level guardrail broke (sample ratio mismatch)."""
        return any(b.arm is None for b in self.breaches)

    def arm(self, name: str) -> ArmStats:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"no arm {name!r} in the report of {self.experiment!r}")

    def comparison(self, treatment: str, metric: str) -> Comparison:
        for c in self.comparisons:
            if c.treatment == treatment and c.metric == metric:
                return c
        raise KeyError(f"no comparison of {treatment!r} on {metric!r} in {self.experiment!r}")

    def to_dict(self) -> dict[str, Any]:
        d = _jsonable(asdict(self))
        d["breached_arms"] = self.breached_arms
        d["stop_experiment"] = self.stop_experiment
        return dict(d)

    def markdown(self) -> str:
        """The per-arm table (estimate with interval, true value) and the comparisons."""
        conf = f"{100 * (1 - self.alpha):.0f} %"
        out = [
            f"### Experiment `{self.experiment}` after {self.elapsed_s:,.0f} s of event time",
            "",
            f"Per arm (intervals: {conf}, delta method over users; true: from the world's "
            "click probabilities)",
            "",
            "| arm | kind | users | requests | impressions | clicks | CTR | true CTR "
            "| revenue/request | true revenue/request | eCPM | fill rate | calibration "
            "| latency p99 ms | regret rev/req vs oracle |",
            "|---|---|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for a in self.arms:
            m = a.metrics
            if a.shadow:  # it decided nothing: only its calibration and latency are its own
                out.append(
                    f"| {a.name} | {a.kind} (shadow) | {a.users:,} | {a.requests:,} "
                    f"| {a.impressions:,} | {a.clicks:,} | - | - | - | - | - | - "
                    f"| {_num(m['calibration'].value)} | {_num(a.latency_p99_ms, digits=1)} | - |"
                )
                continue
            kind = f"{a.kind} {100 * a.weight:.0f} %"
            out.append(
                f"| {a.name} | {kind} | {a.users:,} | {a.requests:,} | {a.impressions:,} "
                f"| {a.clicks:,} | {_est(m['ctr'], pct=True)} | {_num(m['ctr'].true, pct=True)} "
                f"| {_est(m['revenue_per_request'])} | {_num(m['revenue_per_request'].true)} "
                f"| {_num(m['ecpm'].value)} | {_num(m['fill_rate'].value, pct=True)} "
                f"| {_num(m['calibration'].value)} | {_num(a.latency_p99_ms, digits=1)} "
                f"| {_num(a.regret_revenue_per_request)} |"
            )
        out += [
            "",
            f"Comparisons vs `{self.control}` (relative lift; always-valid {conf} interval and "
            "p-value, mSPRT)",
            "",
            "| treatment | metric | lift | interval | p | decided | true lift | covered "
            "| verdict |",
            "|---|---|---:|---|---:|---|---:|---|---|",
        ]
        for c in self.comparisons:
            dec = "no"
            if c.decided:
                when = "" if c.decided_elapsed_s is None else f" at {c.decided_elapsed_s:,.0f} s"
                right = "" if c.right is None else (", right" if c.right else ", WRONG")
                dec = f"{c.direction}{when}{right}"
            out.append(
                f"| {c.treatment} | {c.metric}{' (CUPED)' if c.cuped else ''} "
                f"| {_num(c.lift, pct=True, sign=True)} "
                f"| [{_num(c.lo, pct=True, sign=True)}, {_num(c.hi, pct=True, sign=True)}] "
                f"| {c.p_value:.3g} | {dec} | {_num(c.true_lift, pct=True, sign=True)} "
                f"| {'-' if c.covered is None else ('yes' if c.covered else 'NO')} "
                f"| {c.verdict} |"
            )
        out += [
            "",
            f"Sample ratio: users {dict(zip(self.srm.arms, self.srm.users, strict=True))} vs "
            f"weights {dict(zip(self.srm.arms, self.srm.weights, strict=True))}: chi-square "
            f"{self.srm.chi2:.2f}, p = {self.srm.p_value:.3g}",
        ]
        if self.breaches:
            out += ["", "Guardrail breaches:", ""]
            out += [f"* {b.message}" for b in self.breaches]
        return "\n".join(out) + "\n"


def _num(
    x: float | None, *, pct: bool = False, sign: bool = False, digits: int | None = None
) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if pct:
        return f"{100 * x:+.2f} %" if sign else f"{100 * x:.3f} %"
    d = 4 if digits is None else digits
    return f"{x:.{d}f}"


def _est(e: Estimate, *, pct: bool = False) -> str:
    if not math.isfinite(e.value):
        return "-"
    return f"{_num(e.value, pct=pct)} [{_num(e.lo, pct=pct)}, {_num(e.hi, pct=pct)}]"


def analyze(
    exp: Experiment,
    data: dict[str, ArmData],
    *,
    elapsed_s: float,
    at_ms: int | None = None,
    state: SequentialState | None = None,
    stopped: Collection[str] = (),
) -> Report:
    """The experiment at one look (see the module doc).

    ``data``: arm name -> its per-user aggregates (an arm without data counts as empty);
    ``elapsed_s``: event time since the start; ``at_ms``: the look's event time (recorded
    with a decision); ``state``: the experiment's sequential state, updated in place;
    ``stopped``: arms a guardrail stopped (left out of the sample-ratio check).
    """
    known = {a.name for a in exp.arms}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"data for arms {unknown} that experiment {exp.name!r} does not define "
            f"(its arms: {sorted(known)})"
        )
    z = stats.norm_ppf(1 - exp.alpha / 2)
    arm_data_ = {a.name: data[a.name] if a.name in data else ArmData.empty() for a in exp.arms}
    with_pre = all(
        arm_data_[a.name].pre_metric is not None for a in exp.deciding_arms if a.name in data
    ) and any(a.name in data for a in exp.deciding_arms)
    moments: dict[str, stats.Moments] = {}
    ratios: dict[str, dict[str, stats.Ratio]] = {}
    arms: list[ArmStats] = []
    for a in exp.arms:
        d = arm_data_[a.name]
        x = d._checked(a.name)
        if with_pre and a.deciding:
            pre = np.zeros(len(d.user_id)) if d.pre_metric is None else d.pre_metric
            x = np.column_stack([x, np.asarray(pre, dtype=np.float64)])
        m = stats.Moments.of(x)
        moments[a.name] = m
        sums = m.mean * m.n
        ratios[a.name] = {}
        metrics: dict[str, Estimate] = {}
        for metric, (num, den, scale, true_num) in _METRICS.items():
            r = stats.ratio(m, num, den)
            ratios[a.name][metric] = r
            se = scale * r.se
            value = scale * r.value
            true = None
            if true_num is not None and sums[den] > 0:
                true = scale * float(sums[true_num] / sums[den])
            elif metric == "calibration" and sums[_XCLK] > 0:
                true = float(sums[_PRED] / sums[_XCLK])  # against the true expected clicks
            metrics[metric] = Estimate(value, value - z * se, value + z * se, se, true)
        n_req = int(round(sums[_REQ])) if m.n else 0
        lat = (
            np.percentile(d.latency_ms, [50, 99]).tolist()
            if len(d.latency_ms)
            else [math.nan, math.nan]
        )
        arms.append(
            ArmStats(
                name=a.name,
                kind=a.kind,
                shadow=a.shadow,
                weight=a.weight,
                users=m.n,
                requests=n_req,
                impressions=int(round(sums[_IMP])) if m.n else 0,
                clicks=int(round(sums[_CLK])) if m.n else 0,
                revenue=float(sums[_REV]) if m.n else 0.0,
                metrics=metrics,
                latency_p50_ms=lat[0],
                latency_p99_ms=lat[1],
                error_rate=d.errors / n_req if n_req else math.nan,
                degraded_rate=d.degraded / n_req if n_req else math.nan,
            )
        )
    by_name = {a.name: a for a in arms}
    oracle = next((a for a in exp.deciding_arms if a.kind == "oracle"), None)
    if oracle is not None:
        o = by_name[oracle.name].metrics
        for st in arms:
            t_rpr = st.metrics["revenue_per_request"].true
            t_ctr = st.metrics["ctr"].true
            o_rpr = o["revenue_per_request"].true
            o_ctr = o["ctr"].true
            if t_rpr is not None and o_rpr is not None:
                st.regret_revenue_per_request = o_rpr - t_rpr
            if t_ctr is not None and o_ctr is not None:
                st.regret_ctr = o_ctr - t_ctr

    comparisons = []
    metrics_compared = [exp.primary_metric] + (["ctr"] if exp.primary_metric != "ctr" else [])
    for t in exp.deciding_arms:
        if t.name == exp.control:
            continue
        for metric in metrics_compared:
            comparisons.append(
                _compare(
                    exp, t.name, metric, moments, ratios, by_name, with_pre, elapsed_s, at_ms, state
                )
            )

    # the split is checked over the arms still deciding: a stopped arm's users are served by
    # the control and no longer counted, so its share stops growing by design
    deciding = [a.name for a in exp.deciding_arms if a.name not in stopped]
    counts = [by_name[n].users for n in deciding]
    weights = [a.weight for a in exp.deciding_arms if a.name not in stopped]
    chi2, srm_p = stats.srm(counts, weights) if len(deciding) >= 2 else (0.0, 1.0)
    srm = Srm(deciding, counts, weights, chi2, srm_p)
    return Report(
        experiment=exp.name,
        elapsed_s=elapsed_s,
        at_ms=at_ms,
        alpha=exp.alpha,
        primary_metric=exp.primary_metric,
        control=exp.control,
        arms=arms,
        comparisons=comparisons,
        srm=srm,
        breaches=_breaches(exp, arms, srm),
    )


def _compare(
    exp: Experiment,
    t: str,
    metric: str,
    moments: dict[str, stats.Moments],
    ratios: dict[str, dict[str, stats.Ratio]],
    by_name: dict[str, ArmStats],
    with_pre: bool,
    elapsed_s: float,
    at_ms: int | None,
    state: SequentialState | None,
) -> Comparison:
    c = exp.control
    num, den, _, _ = _METRICS[metric]
    rt, rc = ratios[t][metric], ratios[c][metric]
    reduction = 0.0
    if with_pre:
        (rt, rc), _, reduction = stats.cuped([(moments[t], rt), (moments[c], rc)], num, den, _PRE)
    theta, v = stats.log_ratio(rt, rc)
    tau = exp.mixing_tau
    look_p = stats.msprt_p(theta, v, tau)
    r = stats.msprt_radius(v, tau, exp.alpha)
    lo, hi = (theta - r, theta + r) if math.isfinite(theta) else (-math.inf, math.inf)
    users = (moments[t].n, moments[c].n)
    counted = (
        elapsed_s >= exp.min_run_s and min(users) >= exp.min_users_per_arm and math.isfinite(v)
    )
    p = look_p
    decided_at_ms: int | None = None
    decided_elapsed: float | None = None
    direction: str | None = None
    decided = False
    if state is not None:
        s = state.get(SequentialState.key(t, c, metric))
        if counted:
            s.looks += 1
            s.p_value = min(s.p_value, look_p)
            nlo, nhi = max(s.lo, lo), min(s.hi, hi)
            if nlo <= nhi:  # an empty intersection keeps the last interval
                s.lo, s.hi = nlo, nhi
            if s.decided_at_ms is None and s.decided_elapsed_s is None and s.p_value < exp.alpha:
                s.decided_at_ms = at_ms
                s.decided_elapsed_s = elapsed_s
                s.direction = "up" if theta > 0 else "down"
        if s.looks:
            p, lo, hi = s.p_value, s.lo, s.hi
        decided = s.decided_elapsed_s is not None
        decided_at_ms, decided_elapsed, direction = (
            s.decided_at_ms,
            s.decided_elapsed_s,
            s.direction,
        )
    elif counted and look_p < exp.alpha:
        decided, decided_at_ms, decided_elapsed = True, at_ms, elapsed_s
        direction = "up" if theta > 0 else "down"

    mde = (
        math.expm1((stats.norm_ppf(1 - exp.alpha / 2) + stats.norm_ppf(0.8)) * math.sqrt(v))
        if math.isfinite(v)
        else math.inf
    )
    tt = by_name[t].metrics[metric].true
    tc = by_name[c].metrics[metric].true
    true_lift = tt / tc - 1 if tt is not None and tc is not None and tc > 0 else None
    lift = math.exp(theta) - 1 if math.isfinite(theta) else math.nan
    lift_lo = math.exp(lo) - 1 if lo > -math.inf else -1.0
    lift_hi = math.exp(hi) - 1 if hi < math.inf else math.inf
    covered = None if true_lift is None else bool(lift_lo <= true_lift <= lift_hi)
    right = None
    if decided and true_lift is not None:
        right = (true_lift > 0) == (direction == "up")
    if decided:
        verdict = f"{t} {'beats' if direction == 'up' else 'loses to'} {c}"
    elif not counted:
        why = []
        if elapsed_s < exp.min_run_s:
            why.append(f"{elapsed_s:,.0f} of min {exp.min_run_s:,.0f} s run")
        if min(users) < exp.min_users_per_arm:
            why.append(f"{min(users):,} of min {exp.min_users_per_arm:,} users per arm")
        verdict = "too early: " + "; ".join(why) if why else "no data"
    else:
        verdict = f"inconclusive so far (lifts under ~{100 * mde:.1f} % are not detectable yet)"
    return Comparison(
        metric=metric,
        treatment=t,
        control=c,
        lift=lift,
        lo=lift_lo,
        hi=lift_hi,
        p_value=p,
        look_p_value=look_p,
        z=theta / math.sqrt(v) if math.isfinite(theta) and v > 0 else math.nan,
        mde=mde,
        counted=counted,
        decided=decided,
        direction=direction,
        decided_at_ms=decided_at_ms,
        decided_elapsed_s=decided_elapsed,
        true_lift=true_lift,
        covered=covered,
        right=right,
        cuped=with_pre and reduction != 0.0,
        variance_reduction=reduction,
        users=users,
        verdict=verdict,
    )


def _breaches(exp: Experiment, arms: list[ArmStats], srm: Srm) -> list[Breach]:
    g = exp.guardrails
    out = []
    if srm.p_value < g.srm_p_min:
        out.append(
            Breach(
                None,
                "srm",
                srm.p_value,
                f"p >= {g.srm_p_min}",
                f"sample ratio mismatch: users {srm.users} for weights {srm.weights} "
                f"(chi-square p = {srm.p_value:.2g} < {g.srm_p_min}); the split or the logging "
                "is broken: stop the experiment and investigate",
            )
        )
    lo, hi = g.calibration_ratio
    for a in arms:
        lat_checked = a.requests >= g.min_requests and math.isfinite(a.latency_p99_ms)
        if lat_checked and a.latency_p99_ms > g.latency_p99_ms_max:
            out.append(
                Breach(
                    a.name,
                    "latency_p99_ms",
                    a.latency_p99_ms,
                    f"<= {g.latency_p99_ms_max}",
                    f"arm {a.name}: ranking latency p99 {a.latency_p99_ms:.1f} ms > "
                    f"{g.latency_p99_ms_max} ms",
                )
            )
        cal = a.metrics["calibration"].value
        cal_checked = a.clicks >= max(g.min_clicks, 1) and math.isfinite(cal) and cal > 0
        if cal_checked and not lo <= cal <= hi:
            out.append(
                Breach(
                    a.name,
                    "calibration_ratio",
                    cal,
                    f"in [{lo}, {hi}]",
                    f"arm {a.name}: calibration (predicted / observed clicks) {cal:.3f} "
                    f"outside [{lo}, {hi}] over {a.clicks} clicks",
                )
            )
        if a.requests >= g.min_requests and a.error_rate > g.error_rate_max:
            out.append(
                Breach(
                    a.name,
                    "error_rate",
                    a.error_rate,
                    f"<= {g.error_rate_max}",
                    f"arm {a.name}: error rate {a.error_rate:.2%} > {g.error_rate_max:.2%} "
                    f"over {a.requests} requests",
                )
            )
    return _shared_serving_breaches_dropped(exp.control, out)


SERVING_GUARDRAILS = ("latency_p99_ms", "error_rate")
"""Guardrails of the serving system, not of an arm's model: every arm's requests are ranked in
the same micro-batches by the same servers."""
SHARED_BREACH_FACTOR = 1.25
"""A treatment's serving breach is the control's too when its value is at most this times the
control's (which breaks the same guardrail)."""


def _shared_serving_breaches_dropped(control: str, breaches: list[Breach]) -> list[Breach]:
    """``breaches`` without a treatment's serving-guardrail breach that the control shares
    (the control breaks the same guardrail and the treatment is not worse than
    :data:`SHARED_BREACH_FACTOR` times it): a slow or failing machine is not the treatment's
    doing, and stopping the treatment for it would move its users to an arm that is no better
    (an A/A's second arm stopped for the machine's latency). The control's breach stays in
    the report; a control is never stopped."""
    of_control = {b.guardrail: b.value for b in breaches if b.arm == control}
    kept = []
    for b in breaches:
        shared = (
            b.arm not in (None, control)
            and b.guardrail in SERVING_GUARDRAILS
            and b.guardrail in of_control
            and b.value <= SHARED_BREACH_FACTOR * of_control[b.guardrail]
        )
        if not shared:
            kept.append(b)
    return kept
