"""Experiment definitions and the traffic split (ctrstream.experiments.design, .assignment)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from ctrstream.experiments import Arm, Experiment, Guardrails, assign
from ctrstream.experiments.assignment import unit_uniform


def demo_experiment(**kw: Any) -> Experiment:
    arms = (
        Arm("lr", "model", 0.4, model_name="ctr_lr", model_version=1),
        Arm("deep", "model", 0.4, model_name="ctr_deep"),
        Arm("prior", "prior", 0.1),
        Arm("oracle", "oracle", 0.1),
        Arm("deep-shadow", "model", 0.0, model_name="ctr_deep", shadow=True),
    )
    return Experiment(name="exp-demo", salt="salt-1", arms=arms, control="lr", **kw)


def test_definition_round_trips_through_json() -> None:
    exp = demo_experiment(tau=0.2, guardrails=Guardrails(calibration_ratio=(0.7, 1.4))).validate()
    back = Experiment.from_dict(json.loads(json.dumps(exp.to_dict())))
    assert back == exp
    assert [a.name for a in back.deciding_arms] == ["lr", "deep", "prior", "oracle"]
    assert [a.name for a in back.shadow_arms] == ["deep-shadow"]
    pinned = exp.with_versions({"deep": 3})
    assert pinned.arm("deep").model_version == 3 and pinned.arm("lr").model_version == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"control": "deep-shadow"}, "control 'deep-shadow' must name a deciding arm"),
        ({"alpha": 0.7}, "alpha 0.7 must be in"),
        ({"primary_metric": "clicks"}, "primary_metric 'clicks'"),
        ({"name": "a/b"}, "is not allowed"),
        ({"arms": (Arm("a", "prior", 1.0),)}, "at least two arms"),
        ({"arms": (Arm("a", "prior", 1.0), Arm("a", "oracle", 1.0))}, "repeated ['a']"),
        ({"arms": (Arm("a", "prior", 1.0), Arm("b", "model", 1.0))}, "needs model_name"),
        ({"arms": (Arm("a", "prior", 1.0), Arm("b", "online", 1.0))}, "where its learner"),
        (
            {"arms": (Arm("a", "prior", 1.0), Arm("b", "online", 1.0, "lr", model_version=2))},
            "has no model_version",
        ),
        (
            {"arms": (Arm("a", "prior", 1.0), Arm("b", "prior", 1.0, shadow=True))},
            "give it weight 0",
        ),
        ({"guardrails": Guardrails(calibration_ratio=(1.2, 2.0))}, "0 < lo < 1 < hi"),
    ],
)
def test_bad_definitions_say_what_is_wrong(change: dict[str, Any], message: str) -> None:
    exp = demo_experiment()
    kw = {**exp.__dict__, **change}
    if "arms" in change:
        kw["control"] = "a"
    with pytest.raises(ValueError) as e:
        Experiment(**kw).validate()
    assert message in str(e.value)


def test_from_dict_rejects_unknown_keys() -> None:
    d = demo_experiment().to_dict()
    d["colour"] = "red"
    with pytest.raises(ValueError, match="not an experiment definition"):
        Experiment.from_dict(d)


_IDS = np.arange(1, 300_001, dtype=np.int64)  # consecutive ids: the hard case for a hash


def test_assignment_is_balanced_within_four_sigma() -> None:
    """Each deciding arm's share of 300,000 consecutive user ids is within 4 binomial
    standard deviations of its weight; shadow arms get no users."""
    exp = demo_experiment()
    arm = assign(_IDS, exp)
    n = len(_IDS)
    counts = np.bincount(arm, minlength=len(exp.deciding_arms))
    assert counts.sum() == n
    for a, c in zip(exp.deciding_arms, counts, strict=True):
        sigma = math.sqrt(a.weight * (1 - a.weight) / n)
        assert abs(c / n - a.weight) < 4 * sigma, (a.name, c / n, a.weight)


def test_assignment_is_deterministic_across_processes() -> None:
    """A fresh interpreter (another hash seed) assigns every user to the same arm."""
    exp = demo_experiment()
    here = assign(_IDS[:50_000], exp)
    code = (
        "import json, sys, numpy as np\n"
        "from ctrstream.experiments import Experiment, assign\n"
        "exp = Experiment.from_dict(json.loads(sys.stdin.read()))\n"
        "print(assign(np.arange(1, 50_001, dtype=np.int64), exp).tobytes().hex())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(exp.to_dict()),
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        timeout=60,
    ).stdout.strip()
    assert np.frombuffer(bytes.fromhex(out), dtype=np.int64).tolist() == here.tolist()


def test_salt_gives_an_independent_split_and_string_ids_work() -> None:
    exp = demo_experiment()
    other = Experiment(**{**exp.__dict__, "salt": "salt-2"})
    a, b = assign(_IDS, exp), assign(_IDS, other)
    w = np.array([x.weight for x in exp.deciding_arms])
    same = float((a == b).mean())
    expected = float((w / w.sum()) @ (w / w.sum()))  # independent splits agree this often
    assert abs(same - expected) < 0.01
    u = unit_uniform(_IDS, "salt-1")
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    s = assign(np.array(["u1", "u2", "u1"], dtype=object), exp)
    assert s[0] == s[2]
    with pytest.raises(TypeError, match="integer or string ids"):
        assign(np.array([1.5]), exp)


def test_an_online_arm_is_an_arm_like_any_other() -> None:
    """An ``online`` arm (a continuously trained model) validates, round-trips and splits
    traffic like the other kinds; the CLI's syntax builds it."""
    from ctrstream.loop.session import SessionError, parse_arm

    arms = (
        Arm("frozen", "model", 0.5, model_name="ctr_lr", model_version=1),
        Arm("online", "online", 0.5, model_name="ctr_lr"),
        Arm("cold-shadow", "online", 0.0, model_name="lr", shadow=True),
    )
    exp = Experiment(name="exp-online", salt="s", arms=arms, control="frozen").validate()
    assert Experiment.from_dict(json.loads(json.dumps(exp.to_dict()))) == exp
    assert [a.name for a in exp.deciding_arms] == ["frozen", "online"]
    assert exp.with_versions({"frozen": 2}).arm("online") == arms[1]
    assert parse_arm("online=online:ctr_lr:0.5") == arms[1]
    assert parse_arm("cold-shadow=online:lr", shadow=True) == arms[2]
    assert parse_arm("o=online:/runs/x/lr/checkpoint.pt:0.2").model_name == (
        "/runs/x/lr/checkpoint.pt"
    )
    for bad in ("o=online:0.5", "o=online::0.5", "o=online:lr"):
        with pytest.raises(SessionError, match="NAME=online:BASE:WEIGHT"):
            parse_arm(bad)
