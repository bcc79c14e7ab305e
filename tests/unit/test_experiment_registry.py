"""The experiment file store (ctrstream.experiments.registry): restart, duplicates, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ctrstream.config import Settings
from ctrstream.experiments import (
    Arm,
    Experiment,
    ExperimentExists,
    Registry,
    SequentialState,
    UnknownExperiment,
)
from ctrstream.experiments.analysis import ComparisonState

EXP = Experiment(
    name="exp-demo",
    salt="s1",
    arms=(
        Arm("lr", "model", 0.5, model_name="ctr_lr", model_version=2),
        Arm("prior", "prior", 0.5),
    ),
    control="lr",
)


def test_state_survives_a_new_registry_on_the_same_folder(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    rec = reg.start(EXP, at_ms=1_000)
    assert rec.running and rec.experiment == EXP and rec.started_at_ms == 1_000
    state = SequentialState()
    state.comparisons["prior:lr:ctr"] = ComparisonState(
        looks=3,
        p_value=0.01,
        lo=-0.5,
        hi=-0.1,
        decided_at_ms=9_000,
        decided_elapsed_s=8.0,
        direction="down",
    )
    state.get("prior:lr:revenue_per_request").looks = 2  # unbounded interval: inf in JSON
    reg.record_decision(EXP.name, state)
    reg.save_report(EXP.name, {"experiment": EXP.name, "elapsed_s": 8.0})

    again = Registry(tmp_path)  # a restarted process
    rec = again.get(EXP.name)
    assert rec.running and rec.experiment == EXP
    assert rec.state == state
    assert again.load_report(EXP.name) == {"experiment": EXP.name, "elapsed_s": 8.0}
    assert [r.experiment.name for r in again.list()] == [EXP.name]
    assert [r.experiment.name for r in again.running()] == [EXP.name]


def test_a_running_name_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.start(EXP, at_ms=1_000)
    with pytest.raises(ExperimentExists) as e:
        Registry(tmp_path).start(EXP, at_ms=2_000)
    msg = str(e.value)
    assert "'exp-demo' is already running" in msg and "ctrstream experiment stop exp-demo" in msg
    assert reg.get(EXP.name).started_at_ms == 1_000  # the running one is untouched


def test_stop_restart_and_archive(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.start(EXP, at_ms=1_000)
    rec = reg.stop(EXP.name, "arm lr: latency p99 900 ms > 250 ms", at_ms=5_000, by_guardrail=True)
    assert rec.status == "stopped-by-guardrail" and rec.stopped_at_ms == 5_000
    assert "latency" in rec.reason and not rec.running
    with pytest.raises(ValueError, match="is not running"):
        reg.stop(EXP.name, "again")
    rec = reg.start(EXP, at_ms=6_000)  # the name is free again; the old run is archived
    assert rec.running and rec.started_at_ms == 6_000 and rec.state == SequentialState()
    archived = tmp_path / ".archive" / "exp-demo-5000"
    assert json.loads((archived / "status.json").read_text())["status"] == "stopped-by-guardrail"
    assert reg.stop(EXP.name, "done").status == "stopped"
    reg.start(EXP, at_ms=7_000)  # archived three times without a stop time: no collision
    reg.stop(EXP.name, "done")
    reg.start(EXP, at_ms=8_000)
    reg.stop(EXP.name, "done")
    reg.start(EXP, at_ms=9_000)
    assert sorted(p.name for p in (tmp_path / ".archive").iterdir()) == [
        "exp-demo-0",
        "exp-demo-0.1",
        "exp-demo-0.2",
        "exp-demo-5000",
    ]


def test_unknown_and_corrupt_experiments_say_what_to_do(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    with pytest.raises(UnknownExperiment, match="no experiment 'nope'.*ctrstream experiment start"):
        reg.get("nope")
    reg.start(EXP, at_ms=1)
    (tmp_path / EXP.name / "status.json").write_text("{half")
    with pytest.raises(ValueError, match="status.json is not valid JSON"):
        reg.get(EXP.name)


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies before its rename leaves the previous file whole and no temporary
    file behind; a successful write leaves only the target."""
    reg = Registry(tmp_path)
    reg.start(EXP, at_ms=1_000)
    folder = tmp_path / EXP.name
    before = (folder / "status.json").read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        reg.stop(EXP.name, "never written")
    monkeypatch.undo()
    assert (folder / "status.json").read_bytes() == before
    assert Registry(tmp_path).get(EXP.name).running
    files = ["experiment.json", "sequential.json", "status.json"]
    assert sorted(p.name for p in folder.iterdir()) == files  # the temporary went too
    reg.stop(EXP.name, "done")
    assert sorted(p.name for p in folder.iterdir()) == files


def test_registry_of_settings_lives_in_the_run_dir(tmp_path: Path) -> None:
    settings = Settings(run_dir=tmp_path / "stack")
    assert Registry.of(settings).root == tmp_path / "stack" / "experiments"
    assert Registry(settings).root == Registry.of(settings).root


def test_stopping_one_arm(tmp_path: Path) -> None:
    exp = Experiment(
        name="three",
        salt="s",
        arms=(
            Arm("lr", "model", 0.4, model_name="ctr_lr"),
            Arm("prior", "prior", 0.3),
            Arm("oracle", "oracle", 0.3),
        ),
        control="lr",
    )
    reg = Registry(tmp_path)
    reg.start(exp, at_ms=0)
    rec = reg.stop_arm("three", "prior", "arm prior: error rate 5.00 % > 1.00 %", at_ms=10)
    assert rec.running and rec.stopped_arms == {
        "prior": {"reason": "arm prior: error rate 5.00 % > 1.00 %", "at_ms": 10}
    }
    assert Registry(tmp_path).get("three").stopped_arms == rec.stopped_arms
    with pytest.raises(ValueError, match="is the control of 'three': stop the experiment"):
        reg.stop_arm("three", "lr", "x")
    with pytest.raises(ValueError, match="has no deciding arm 'nope'"):
        reg.stop_arm("three", "nope", "x")
    with pytest.raises(UnknownExperiment, match="no experiment 'other'"):
        reg.record_decision("other", SequentialState())
