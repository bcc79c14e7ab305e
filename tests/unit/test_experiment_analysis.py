"""The production analysis path (ctrstream.experiments.analyze) on simulated experiments.

Data: :mod:`ctrstream.experiments.synthetic` - users with Poisson requests (Gamma-distributed
rates), 1-3 slots per request, Beta-distributed user CTRs around 2 %, log-normal prices;
users split by the production ``assign``; cumulative per-user aggregates at every look.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps

from ctrstream.experiments import (
    Arm,
    ArmData,
    Comparison,
    Experiment,
    SequentialState,
    analyze,
    arm_data,
    assign,
)
from ctrstream.experiments.synthetic import World, simulate

AB = Experiment(
    name="ab",
    salt="s",
    arms=(Arm("a", "prior", 0.5), Arm("b", "prior", 0.5)),
    control="a",
    alpha=0.05,
    min_run_s=2.0,  # looks are 1 s apart: the first never counts
    min_users_per_arm=200,
)


def run(
    exp: Experiment,
    world: World,
    lifts: dict[str, float],
    seed: int,
    n: int,
    *,
    cuped_every_other: bool = False,
) -> tuple[list[list[Comparison]], int]:
    """``n`` experiments, each looked at after every one of ``world.looks`` looks with one
    SequentialState (peeking): the final look's comparisons of each, and how many
    experiments a naive fixed-horizon z-test on the primary metric would have rejected at
    some counted look (|z| > the 1 - alpha / 2 normal quantile). ``cuped_every_other``:
    every second experiment has a pre-period covariate (the CUPED path)."""
    rng = np.random.default_rng(seed)
    out = []
    naive = 0
    z_crit = NormalDist().inv_cdf(1 - exp.alpha / 2)
    with_pre = replace(world, pre_looks=4)
    for r in range(n):
        e = replace(exp, salt=f"{exp.name}-{seed}-{r}")
        cuped = cuped_every_other and r % 2 == 1
        cohort = simulate(e, rng, with_pre if cuped else world, lifts)
        state = SequentialState()
        rejected = False
        for k in range(world.looks):
            data = cohort.at(k, e, cuped=cuped)
            report = analyze(e, data, elapsed_s=float(k + 1), at_ms=k, state=state)
            c = report.comparisons[0]
            rejected |= c.counted and abs(c.z) > z_crit
        naive += rejected
        out.append(report.comparisons)
    return out, naive


def upper95(k: int, n: int) -> float:
    """One-sided 95 % Clopper-Pearson upper bound of a binomial rate."""
    return 1.0 if k >= n else float(sps.beta.ppf(0.95, k + 1, n - k))


def test_aa_false_positive_rate_with_peeking() -> None:
    """1,000 A/A experiments (half of them with CUPED), each looked at 10 times (9 of them
    from min_run_s on), through analyze with a SequentialState: the rate of experiments that
    decide (on the primary metric, on CTR, on either) has a Clopper-Pearson 95 % upper bound
    <= alpha + 0.02."""
    n = 1000
    world = World(users=1000, looks=10)
    results, naive = run(
        replace(AB, min_users_per_arm=150), world, {}, seed=2026, n=n, cuped_every_other=True
    )
    assert sum(c[0].cuped for c in results) == n // 2
    primary = sum(c[0].decided for c in results)
    ctr = sum(c[1].decided for c in results)
    either = sum(c[0].decided or c[1].decided for c in results)
    for name, k in (("revenue_per_request", primary), ("ctr", ctr), ("either", either)):
        print(
            f"A/A false-positive rate ({name}): {k}/{n} = {k / n:.3f}, "
            f"upper 95 % bound {upper95(k, n):.4f} (alpha {AB.alpha})"
        )
        assert upper95(k, n) <= AB.alpha + 0.02
    assert all(c[0].counted for c in results)  # the looks did count: the test ran
    # the same looks through a fixed-horizon z-test: peeking inflates its error (why the
    # analysis uses the mSPRT), which shows the data would expose a test that peeks badly
    print(f"A/A naive z-test at every look (revenue_per_request): {naive}/{n} = {naive / n:.3f}")
    assert naive / n > 2 * AB.alpha


def test_ab_with_a_known_lift_is_detected_and_covered() -> None:
    """150 A/B experiments of 5,000 users with a true +30 % CTR lift (so +30 % revenue per
    request), 10 looks each. The stated power: the sequential test decides CTR in >= 85 % of
    them and revenue per request (noisier: log-normal prices) in >= 50 %, never in the wrong
    direction; the final always-valid interval covers the true lift - the population's +30 %
    and each run's realized truth from exp_* - in >= 1 - alpha - 0.02 of them (the stated
    slack) on both metrics."""
    n, lift = 150, 0.30
    world = World(users=5000, looks=10)
    results, _ = run(AB, world, {"b": lift}, seed=7, n=n)
    for j, (metric, min_power) in enumerate((("revenue_per_request", 0.5), ("ctr", 0.85))):
        cs = [c[j] for c in results]
        assert all(c.metric == metric for c in cs)
        power = sum(c.decided for c in cs) / n
        wrong = sum(c.decided and c.direction != "up" for c in cs)
        cover_pop = sum(c.lo <= lift <= c.hi for c in cs) / n
        cover_true = sum(bool(c.covered) for c in cs) / n
        right = sum(bool(c.right) for c in cs if c.decided)
        print(
            f"A/B +30 % ({metric}): power {power:.3f}, coverage of the population lift "
            f"{cover_pop:.3f}, of the realized true lift {cover_true:.3f}, wrong decisions "
            f"{wrong}"
        )
        assert power >= min_power
        assert wrong == 0 and right == sum(c.decided for c in cs)
        assert cover_pop >= 1 - AB.alpha - 0.02
        assert cover_true >= 1 - AB.alpha - 0.02


def test_sequential_state_is_monotone_and_survives_a_restart() -> None:
    """Over the looks the always-valid p-value never rises and the intervals are nested; a
    decision, once made, stands with its time; the state through JSON (a restart) continues
    exactly as the one kept in memory."""
    world = World(users=6000, looks=10)
    e = replace(AB, salt="mono")
    cohort = simulate(e, np.random.default_rng(3), world, {"b": 0.3})
    state, restarted = SequentialState(), SequentialState()
    seen = []
    for k in range(world.looks):
        data = cohort.at(k, e)
        c = analyze(e, data, elapsed_s=float(k + 1), at_ms=1000 * k, state=state).comparisons[1]
        restarted = SequentialState.from_dict(json.loads(json.dumps(restarted.to_dict())))
        c2 = analyze(e, data, elapsed_s=float(k + 1), at_ms=1000 * k, state=restarted)
        assert c2.comparisons[1] == c
        seen.append(c)
    counted = [c for c in seen if c.counted]
    assert len(counted) == 9 and not seen[0].counted  # min_run_s = 2 s: looks at 2 s .. 10 s
    for a, b in zip(counted, counted[1:], strict=False):
        assert b.p_value <= a.p_value
        assert a.lo <= b.lo and b.hi <= a.hi
        assert b.decided or not a.decided
    first = next(c for c in seen if c.decided)
    assert first.decided_at_ms is not None and first.decided_at_ms >= 2000
    assert all(c.decided_at_ms == first.decided_at_ms for c in seen if c.decided)
    assert seen[-1].verdict == "b beats a" and seen[-1].right


def test_no_decision_before_min_run_or_min_users() -> None:
    """A huge lift does not decide before min_run_s of event time, nor with fewer users per
    arm than the minimum; the verdict says why."""
    e = replace(AB, min_run_s=3600.0)
    cohort = simulate(e, np.random.default_rng(4), World(users=20_000, looks=3), {"b": 1.0})
    c = analyze(e, cohort.at(2, e), elapsed_s=600.0).comparisons[0]
    assert c.look_p_value < 1e-6 and not c.decided and not c.counted
    assert "600 of min 3,600 s run" in c.verdict
    e = replace(AB, min_users_per_arm=100_000)
    c = analyze(e, cohort.at(2, e), elapsed_s=600.0).comparisons[0]
    assert not c.decided and "of min 100,000 users per arm" in c.verdict


def fixed_arm(n: int, rng: np.random.Generator, *, clicks_scale: float = 1.0) -> ArmData:
    """An arm of ``n`` users with 10 requests and 20 impressions each."""
    imp = np.full(n, 20.0)
    clk = rng.binomial(20, 0.02 * clicks_scale, size=n).astype(float)
    return ArmData(
        user_id=np.arange(n),
        requests=np.full(n, 10.0),
        impressions=imp,
        clicks=clk,
        revenue=clk * 0.5,
        filled_slots=imp,
        slots=np.full(n, 25.0),
        exp_clicks=imp * 0.02 * clicks_scale,
        exp_revenue=imp * 0.01 * clicks_scale,
        predicted_clicks=imp * 0.02 * clicks_scale,
        latency_ms=np.full(100, 4.0),
    )


def test_srm_fires_on_a_52_48_split_and_not_on_a_fair_one() -> None:
    rng = np.random.default_rng(8)
    skewed = {"a": fixed_arm(10_400, rng), "b": fixed_arm(9_600, rng)}
    r = analyze(AB, skewed, elapsed_s=10.0)
    assert r.srm.p_value < AB.guardrails.srm_p_min and r.stop_experiment
    assert [b.guardrail for b in r.breaches] == ["srm"]
    assert "sample ratio mismatch" in r.breaches[0].message
    ids = np.arange(20_000)
    counts = np.bincount(assign(ids, AB), minlength=2)
    fair = {"a": fixed_arm(int(counts[0]), rng), "b": fixed_arm(int(counts[1]), rng)}
    r = analyze(AB, fair, elapsed_s=10.0)
    assert r.srm.p_value > 0.01 and not r.breaches and not r.stop_experiment
    c = r.comparison("b", "ctr")  # same arms: the report says plainly what it cannot see
    assert not c.decided and c.verdict.startswith("inconclusive so far (lifts under ~")


@pytest.mark.parametrize(
    ("guardrail", "change"),
    [
        ("latency_p99_ms", {"latency_ms": np.r_[np.full(97, 4.0), np.full(3, 900.0)]}),
        ("calibration_ratio", {"predicted_clicks": None}),
        ("error_rate", {"errors": 300}),
    ],
)
def test_each_guardrail_fires(guardrail: str, change: dict[str, Any]) -> None:
    rng = np.random.default_rng(9)
    a, b = fixed_arm(1000, rng), fixed_arm(1000, rng)
    assert not analyze(AB, {"a": a, "b": b}, elapsed_s=1.0).breaches
    if "predicted_clicks" in change:
        change = {"predicted_clicks": b.predicted_clicks * 3.0}  # 3x over-predicting
    bad = replace(b, **change)
    r = analyze(AB, {"a": a, "b": bad}, elapsed_s=1.0)
    assert [(x.arm, x.guardrail) for x in r.breaches] == [("b", guardrail)]
    assert r.breached_arms == ["b"] and not r.stop_experiment
    assert r.breaches[0].message.startswith("arm b: ")


def test_a_serving_breach_the_control_shares_does_not_stop_the_treatment() -> None:
    """A slow machine ranks every arm's requests in the same micro-batches: when the control
    breaks the latency guardrail too, the treatment is not stopped for it (an A/A's second
    arm was, in a demo run), unless it is much slower than the control."""
    rng = np.random.default_rng(11)
    slow = np.full(100, 1000.0)
    a = replace(fixed_arm(1000, rng), latency_ms=slow)
    b = replace(fixed_arm(1000, rng), latency_ms=slow * 1.1)
    r = analyze(AB, {"a": a, "b": b}, elapsed_s=1.0)
    assert [(x.arm, x.guardrail) for x in r.breaches] == [("a", "latency_p99_ms")]
    assert r.breached_arms == ["a"] and not r.stop_experiment
    much_slower = replace(b, latency_ms=slow * 2.0)
    r = analyze(AB, {"a": a, "b": much_slower}, elapsed_s=1.0)
    assert [(x.arm, x.guardrail) for x in r.breaches] == [
        ("a", "latency_p99_ms"),
        ("b", "latency_p99_ms"),
    ]
    # a model's guardrail stays the arm's own even when the control breaks it too
    over = replace(b, predicted_clicks=b.predicted_clicks * 3.0)
    r = analyze(
        AB, {"a": replace(a, predicted_clicks=a.predicted_clicks * 3.0), "b": over}, elapsed_s=1.0
    )
    assert ("b", "calibration_ratio") in [(x.arm, x.guardrail) for x in r.breaches]


def test_truth_regret_and_the_report() -> None:
    """True values come from exp_*, regret is against the oracle arm, and the report is
    strict JSON and a markdown table with every arm and comparison."""
    exp = Experiment(
        name="four",
        salt="s",
        arms=(
            Arm("lr", "model", 0.45, model_name="ctr_lr", model_version=1),
            Arm("prior", "prior", 0.45),
            Arm("oracle", "oracle", 0.1),
            Arm("shadow", "model", 0.0, model_name="ctr_deep", shadow=True),
        ),
        control="lr",
        min_run_s=0.0,
    )
    rng = np.random.default_rng(10)
    data = {
        "lr": fixed_arm(4500, rng),
        "prior": fixed_arm(4500, rng, clicks_scale=0.5),
        "oracle": fixed_arm(1000, rng, clicks_scale=1.5),
    }
    r = analyze(exp, data, elapsed_s=100.0)
    lr, prior, oracle = r.arm("lr"), r.arm("prior"), r.arm("oracle")
    assert lr.metrics["ctr"].true == pytest.approx(0.02)
    assert lr.metrics["revenue_per_request"].true == pytest.approx(0.02)  # 20 * 0.01 / 10
    assert oracle.regret_ctr == 0 and lr.regret_ctr == pytest.approx(0.01)
    assert prior.regret_revenue_per_request == pytest.approx(0.03 - 0.01)
    assert r.arm("shadow").users == 0 and "shadow" not in r.srm.arms
    c = r.comparison("prior", "revenue_per_request")
    assert c.true_lift == pytest.approx(-0.5) and c.decided and c.direction == "down"
    assert c.right and c.covered
    assert 0 < c.mde < 0.5  # 4,500 users per arm see lifts of a few per cent, not 50 %
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert {a["name"] for a in d["arms"]} == {"lr", "prior", "oracle", "shadow"}
    md = r.markdown()
    assert "| lr | model 45 % |" in md and "| prior | revenue_per_request |" in md
    assert "| shadow | model (shadow) | 0 |" in md
    assert "true lift" in md and "-50.00 %" in md and "down at 100 s, right" in md


def test_arm_data_aggregates_per_user() -> None:
    d = arm_data(
        request_user=np.array([7, 3, 7]),
        request_slots=np.array([3, 2, 1]),
        request_filled=np.array([2, 2, 1]),
        imp_user=np.array([7, 7, 3, 3, 7]),
        imp_clicked=np.array([1, 0, 0, 1, 0]),
        imp_price=np.array([0.4, 0.5, 0.6, 0.7, 0.8]),
        imp_p_true=np.array([0.1, 0.2, 0.3, 0.4, 0.5]),
        imp_predicted=np.array([0.2, 0.2, 0.2, 0.2, 0.2]),
        latency_ms=np.array([1.0, 2.0, 3.0]),
        errors=1,
        pre=(np.array([7, 99]), np.array([5.0, 9.0])),
    )
    assert d.user_id.tolist() == [3, 7]
    assert d.requests.tolist() == [1, 2] and d.impressions.tolist() == [2, 3]
    assert d.clicks.tolist() == [1, 1] and d.revenue.tolist() == pytest.approx([0.7, 0.4])
    assert d.slots.tolist() == [2, 4] and d.filled_slots.tolist() == [2, 3]
    assert d.exp_clicks.tolist() == pytest.approx([0.7, 0.8])
    assert d.exp_revenue.tolist() == pytest.approx([0.18 + 0.28, 0.04 + 0.1 + 0.4])
    assert d.pre_metric is not None and d.pre_metric.tolist() == [0.0, 5.0]
    with pytest.raises(ValueError, match="has no request in this arm"):
        arm_data(
            request_user=np.array([1]),
            request_slots=np.array([1]),
            request_filled=np.array([1]),
            imp_user=np.array([2]),
            imp_clicked=np.array([0]),
            imp_price=np.array([1.0]),
            imp_p_true=np.array([0.1]),
        )


def test_bad_data_is_refused_with_a_clear_message() -> None:
    rng = np.random.default_rng(1)
    a = fixed_arm(10, rng)
    with pytest.raises(ValueError, match=r"arms \['c'\] that experiment 'ab' does not define"):
        analyze(AB, {"a": a, "c": a}, elapsed_s=1.0)
    with pytest.raises(ValueError, match="column clicks has 3 values for 10 users"):
        analyze(AB, {"a": replace(a, clicks=np.zeros(3))}, elapsed_s=1.0)
    with pytest.raises(ValueError, match=r"columns \['revenue'\] have negative"):
        analyze(AB, {"a": replace(a, revenue=-a.revenue - 1)}, elapsed_s=1.0)
    # an arm without data yet is empty, not an error
    r = analyze(AB, {"a": a}, elapsed_s=1.0)
    assert r.arm("b").users == 0 and math.isnan(r.comparisons[0].lift)
    assert not r.comparisons[0].decided
