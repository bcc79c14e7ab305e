"""An online experiment's definition: its arms, its traffic split, its test and guardrails.

An :class:`Experiment` is pure data (frozen dataclasses, JSON through :meth:`to_dict` /
:meth:`from_dict`), so the registry can store it and every process that reads it back
(the closed loop, the CLI, a restarted ad server) analyses and splits traffic identically.

Arms
----
* ``model`` - ranks by a published model's calibrated pCTR (``model_name`` and a pinned
  ``model_version``; ``None`` is resolved at start and recorded);
* ``prior`` - no model, the ad's smoothed CTR;
* ``oracle`` - ranks by the world's true click probability: the welfare ceiling that
  regret is measured against (it need not maximise CTR or revenue);
* ``online`` - ranks by a continuously trained model (:mod:`ctrstream.models.online`) that
  learns from the loop's shown impressions once their attribution window has closed;
  ``model_name`` names where it starts (:data:`ONLINE_COLD_STARTS`: an untrained net of that
  kind; a trained base name such as ``ctr_lr``: the newest training run's torch checkpoint of
  that model; a path to a ``.pt`` checkpoint: that one); no ``model_version``, no calibrator;
* ``shadow=True`` (any kind, weight 0) - scores every request, never decides what is shown.

The deciding arms (:attr:`Experiment.deciding_arms`: weight > 0, not shadow) split the
users by a salted hash of the user id (:mod:`ctrstream.experiments.assignment`), in the
order of ``arms``; ``control`` names the arm every other deciding arm is compared against.

Every default lives in this module (:data:`DEFAULT_TAU`, :class:`Guardrails`, the
:class:`Experiment` fields), nowhere else.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

ArmKind = Literal["model", "prior", "oracle", "online"]
ARM_KINDS: tuple[str, ...] = ("model", "prior", "oracle", "online")
# the bases of an ``online`` arm that start from an untrained net of that kind
ONLINE_COLD_STARTS: tuple[str, ...] = ("lr", "deep")

# The metrics a comparison can be made on (the primary metric and, always, CTR).
PRIMARY_METRICS: tuple[str, ...] = ("revenue_per_request", "ctr")

# The mSPRT mixing scale on the log of the ratio treatment / control when an experiment does
# not give one: the prior standard deviation of the log-lift, "lifts of about 10 %". The test
# is valid for any tau; tau only moves its power towards effects of about that size (Johari et
# al. 2017, "Peeking at A/B tests", section 4). A smaller tau (a few per cent, typical of a
# ranking change) pays heavily while the variance is still large: at the demo's volume only
# large lifts (a model against the prior arm) can decide, and 0.1 decides them sooner than
# 0.05 at no cost in validity (tests/unit/test_experiment_analysis.py measures both the
# false-positive rate and the power at this default).
DEFAULT_TAU = 0.1

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Arm:
    """One arm: what ranks the ads of the requests assigned to it (see the module doc)."""

    name: str
    kind: ArmKind
    weight: float = 0.0
    model_name: str | None = None
    model_version: int | None = None
    shadow: bool = False

    @property
    def deciding(self) -> bool:
        """The arm decides what its users see (it has traffic and is not a shadow)."""
        return self.weight > 0 and not self.shadow

    def validate(self) -> Arm:
        """This arm, or a ValueError saying what is wrong with it."""
        if not _NAME.match(self.name):
            raise ValueError(
                f"arm name {self.name!r} is not allowed: use 1-64 letters, digits, '.', '_' "
                "or '-', starting with a letter or digit"
            )
        if self.kind not in ARM_KINDS:
            raise ValueError(f"arm {self.name!r}: kind {self.kind!r} is not one of {ARM_KINDS}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"arm {self.name!r}: weight {self.weight} must be a number >= 0")
        if self.shadow and self.weight != 0:
            raise ValueError(
                f"arm {self.name!r} is a shadow arm with weight {self.weight}: a shadow never "
                "decides, give it weight 0"
            )
        if self.kind == "model" and not self.model_name:
            raise ValueError(
                f"arm {self.name!r} of kind 'model' needs model_name (the published base "
                "name, e.g. 'ctr_lr')"
            )
        if self.kind == "online":
            if not self.model_name:
                raise ValueError(
                    f"arm {self.name!r} of kind 'online' needs model_name, where its learner "
                    f"starts: one of {ONLINE_COLD_STARTS} (cold), a trained base name such as "
                    "'ctr_lr' (its newest checkpoint) or a path to a .pt checkpoint"
                )
            if self.model_version is not None:
                raise ValueError(
                    f"arm {self.name!r} of kind 'online' has no model_version (its model "
                    "changes as it learns): drop it"
                )
        elif self.kind != "model" and (self.model_name or self.model_version is not None):
            raise ValueError(
                f"arm {self.name!r} of kind {self.kind!r} ranks without a model: drop "
                "model_name / model_version or make it kind 'model'"
            )
        if self.model_version is not None and self.model_version < 1:
            raise ValueError(f"arm {self.name!r}: model_version must be >= 1 or None")
        return self


@dataclass(frozen=True)
class Guardrails:
    """Thresholds that stop an arm (or the whole experiment) when broken.

    ``srm_p_min``: the sample-ratio-mismatch test's p-value below which the split itself is
    broken (experiment level: every comparison is then suspect); ``latency_p99_ms_max``: an
    arm's ranking latency p99 (a micro-batched ad server answers a request when its batch is
    ranked: the batch's time), checked once the arm has ``min_requests`` requests;
    ``calibration_ratio``: the (lo, hi) band of an arm's
    predicted / observed clicks, checked once the arm has ``min_clicks`` clicks;
    ``error_rate_max``: failed requests / requests, checked once the arm has
    ``min_requests`` requests. :func:`ctrstream.experiments.analysis.analyze` lists the
    breaches; the caller stops the arm or the experiment.
    """

    srm_p_min: float = 0.001
    latency_p99_ms_max: float = 250.0
    calibration_ratio: tuple[float, float] = (0.5, 2.0)
    error_rate_max: float = 0.01
    min_clicks: int = 50
    min_requests: int = 200

    def validate(self) -> Guardrails:
        lo, hi = self.calibration_ratio
        if not 0 < self.srm_p_min < 1:
            raise ValueError(f"guardrails: srm_p_min {self.srm_p_min} must be in (0, 1)")
        if not self.latency_p99_ms_max > 0:
            raise ValueError("guardrails: latency_p99_ms_max must be > 0 (milliseconds)")
        if not 0 < lo < 1 < hi:
            raise ValueError(
                f"guardrails: calibration_ratio {self.calibration_ratio} must be (lo, hi) "
                "with 0 < lo < 1 < hi"
            )
        if not 0 <= self.error_rate_max <= 1:
            raise ValueError("guardrails: error_rate_max must be in [0, 1]")
        if self.min_clicks < 0 or self.min_requests < 0:
            raise ValueError("guardrails: min_clicks and min_requests must be >= 0")
        return self


@dataclass(frozen=True)
class Experiment:
    """An experiment's definition (see the module doc).

    ``alpha``: the sequential test's type-I error (over every look); ``min_run_s``: event
    time before any decision (the world has novelty and fatigue effects: an early lift is not
    the lasting one); ``min_users_per_arm``: users in each compared arm before the test
    counts a look (the delta method's normal approximation needs a sample);
    ``primary_metric``: ``revenue_per_request`` or ``ctr``; ``tau``: the mSPRT mixing scale
    on the log-ratio (None: :data:`DEFAULT_TAU`).
    """

    name: str
    salt: str
    arms: tuple[Arm, ...]
    control: str
    alpha: float = 0.05
    min_run_s: float = 300.0
    min_users_per_arm: int = 200
    primary_metric: str = "revenue_per_request"
    tau: float | None = None
    guardrails: Guardrails = field(default_factory=Guardrails)

    @property
    def deciding_arms(self) -> tuple[Arm, ...]:
        """The arms that split the traffic, in definition order (what ``assign`` indexes)."""
        return tuple(a for a in self.arms if a.deciding)

    @property
    def shadow_arms(self) -> tuple[Arm, ...]:
        return tuple(a for a in self.arms if a.shadow)

    @property
    def mixing_tau(self) -> float:
        """The mSPRT mixing scale in use."""
        return DEFAULT_TAU if self.tau is None else self.tau

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"experiment {self.name!r} has no arm {name!r}")

    def validate(self) -> Experiment:
        """This experiment, or a ValueError saying what is wrong and what to do."""
        if not _NAME.match(self.name):
            raise ValueError(
                f"experiment name {self.name!r} is not allowed: use 1-64 letters, digits, "
                "'.', '_' or '-', starting with a letter or digit (it names a folder)"
            )
        if not self.salt:
            raise ValueError(f"experiment {self.name!r}: salt must not be empty")
        for a in self.arms:
            a.validate()
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"experiment {self.name!r}: arm names must be unique, repeated {dup}")
        deciding = self.deciding_arms
        if len(deciding) < 2:
            raise ValueError(
                f"experiment {self.name!r} has {len(deciding)} deciding arm(s): give at least "
                "two arms a weight > 0 (shadow arms do not count)"
            )
        if self.control not in {a.name for a in deciding}:
            raise ValueError(
                f"experiment {self.name!r}: control {self.control!r} must name a deciding arm "
                f"(one of {[a.name for a in deciding]})"
            )
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"experiment {self.name!r}: alpha {self.alpha} must be in (0, 0.5)")
        if not (math.isfinite(self.min_run_s) and self.min_run_s >= 0):
            raise ValueError(f"experiment {self.name!r}: min_run_s must be >= 0 seconds")
        if self.min_users_per_arm < 2:
            raise ValueError(f"experiment {self.name!r}: min_users_per_arm must be >= 2")
        if self.primary_metric not in PRIMARY_METRICS:
            raise ValueError(
                f"experiment {self.name!r}: primary_metric {self.primary_metric!r} is not one "
                f"of {PRIMARY_METRICS}"
            )
        if self.tau is not None and not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"experiment {self.name!r}: tau must be > 0 or None")
        self.guardrails.validate()
        return self

    def with_versions(self, versions: dict[str, int]) -> Experiment:
        """A copy whose model arms named in ``versions`` (arm name -> version) are pinned."""
        arms = tuple(
            replace(a, model_version=versions[a.name]) if a.name in versions else a
            for a in self.arms
        )
        return replace(self, arms=arms)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["guardrails"]["calibration_ratio"] = list(self.guardrails.calibration_ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Experiment:
        """The experiment of :meth:`to_dict`'s dict (validated); unknown keys are an error."""
        try:
            data = dict(d)
            arms = tuple(Arm(**a) for a in data.pop("arms"))
            g = dict(data.pop("guardrails", {}))
            if "calibration_ratio" in g:
                lo, hi = g["calibration_ratio"]
                g["calibration_ratio"] = (float(lo), float(hi))
            return cls(arms=arms, guardrails=Guardrails(**g), **data).validate()
        except (TypeError, KeyError) as e:
            raise ValueError(
                f"not an experiment definition ({e}): expected the keys of Experiment.to_dict()"
            ) from e
