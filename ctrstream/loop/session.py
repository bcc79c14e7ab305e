"""What ``ctrstream experiment`` and ``ctrstream loop`` do: start an experiment (resolve and
pin the model versions its arms use), run its closed loop against the local stack, report
and stop it. The definitions and state live in the experiments' file store
(``ctrstream.experiments.registry``) under the run directory; the loop's checkpoints beside
them."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from ctrstream.config import Settings

log = logging.getLogger("ctrstream.loop")

PIN_OWNER = "experiment:{name}"


class SessionError(RuntimeError):
    """A clear, actionable error of an experiment command."""


def registry(settings: Settings) -> Any:
    from ctrstream.experiments.registry import Registry

    return Registry.of(settings)


def state_dir(settings: Settings, name: str) -> Path:
    return settings.run_dir / "experiments" / name / "loop"


def parse_arm(spec: str, shadow: bool = False) -> Any:
    """``NAME=model:BASE[@VERSION]:WEIGHT``, ``NAME=online:BASE:WEIGHT``,
    ``NAME=prior:WEIGHT``, ``NAME=oracle:WEIGHT`` (a shadow: ``NAME=model:BASE[@VERSION]`` or
    ``NAME=online:BASE``, no weight) -> an ``Arm``. An online arm's BASE is where its learner
    starts (``lr`` / ``deep``: cold; a trained base name such as ``ctr_lr``: its newest
    checkpoint; a path to a ``.pt`` checkpoint)."""
    from ctrstream.experiments.design import Arm

    if "=" not in spec:
        raise SessionError(
            f"arm {spec!r}: expected NAME=KIND..., e.g. deep=model:ctr_deep:0.4, "
            "prior=prior:0.1, oracle=oracle:0.1"
        )
    name, rest = spec.split("=", 1)
    parts = rest.split(":")
    kind = parts[0]
    try:
        if kind == "model":
            base, _, ver = parts[1].partition("@")
            weight = 0.0 if shadow else float(parts[2])
            return Arm(
                name=name,
                kind="model",
                weight=weight,
                model_name=base,
                model_version=int(ver) if ver else None,
                shadow=shadow,
            )
        if kind == "online" and len(parts) == (2 if shadow else 3) and parts[1]:
            return Arm(
                name=name,
                kind="online",
                weight=0.0 if shadow else float(parts[2]),
                model_name=parts[1],
                shadow=shadow,
            )
        if kind == "prior" and not shadow:
            return Arm(name=name, kind="prior", weight=float(parts[1]))
        if kind == "oracle" and not shadow:
            return Arm(name=name, kind="oracle", weight=float(parts[1]))
    except (IndexError, ValueError):
        pass
    raise SessionError(
        f"arm {spec!r}: expected NAME=model:BASE[@VERSION]:WEIGHT, NAME=online:BASE:WEIGHT, "
        "NAME=prior:WEIGHT or NAME=oracle:WEIGHT (a shadow: NAME=model:BASE[@VERSION] or "
        "NAME=online:BASE)"
    )


def resolve_versions(settings: Settings, exp: Any) -> Any:
    """Every model arm gets the version it will use: the one named, or the newest one Triton
    serves now; each is checked to be loaded, then pinned so a publish cannot unload it."""
    from ctrstream.models.publish import (
        control_client,
        loaded_versions,
        pin_versions,
        served_model_name,
    )

    client = control_client(settings)
    try:
        live = bool(client.is_server_live())
    except Exception:  # noqa: BLE001 - any failure to reach it is the same answer
        live = False
    if not live:
        raise SessionError(
            f"Triton does not answer at {settings.triton.grpc_url}: start the stack "
            "(`ctrstream stack up`) before an experiment with model arms"
        )
    arms = []
    for a in exp.arms:
        if a.kind != "model":
            arms.append(a)
            continue
        served = served_model_name(settings, a.model_name)
        have = loaded_versions(client, served)
        if not have:
            raise SessionError(
                f"arm {a.name}: Triton serves no version of {a.model_name} ({served}); "
                "train and publish it first (`ctrstream train`)"
            )
        v = a.model_version if a.model_version is not None else max(have)
        if v not in have:
            raise SessionError(
                f"arm {a.name}: {a.model_name} v{v} is not loaded (loaded: {have}); publish it "
                "or name a loaded version"
            )
        arms.append(replace(a, model_version=v))
    exp = replace(exp, arms=tuple(arms))
    by_model: dict[str, list[int]] = {}
    for a in exp.arms:
        if a.kind == "model":
            by_model.setdefault(a.model_name, []).append(int(a.model_version))
    for base, versions in by_model.items():
        pin_versions(settings, base, sorted(set(versions)), PIN_OWNER.format(name=exp.name))
    return exp


def start(settings: Settings, exp: Any, at_ms: int, *, pin: bool = True) -> Any:
    """Validate, resolve and pin versions, and register the experiment as running."""
    exp = exp.validate()
    reg = registry(settings)
    if pin:
        exp = resolve_versions(settings, exp)
    reg.start(exp, at_ms)
    return exp


def stop(settings: Settings, name: str, reason: str = "stopped by the operator") -> None:
    from ctrstream.models.publish import unpin

    reg = registry(settings)
    if reg.get(name).running:
        reg.stop(name, reason)
    unpin(settings, PIN_OWNER.format(name=name))


def report(settings: Settings, name: str, out: Path | None = None) -> dict:
    """The experiment's report from its ledger: JSON (and markdown, plot with ``out``)."""
    from ctrstream.loop.analysis import analyze_ledger, write_plot
    from ctrstream.loop.ledger import Ledger

    reg = registry(settings)
    st = reg.get(name)
    path = state_dir(settings, name) / "ledger.npz"
    if not path.exists():
        raise SessionError(
            f"experiment {name} has no results yet: run its loop (`ctrstream loop run "
            f"--experiment {name}`)"
        )
    ledger = Ledger.load(path)
    meta = json.loads((state_dir(settings, name) / "loop-state.json").read_text())
    rep = analyze_ledger(st.experiment, ledger, reg, int(meta["clock_ms"]), act=False)
    doc = rep.to_dict()
    doc["prediction_quality"] = ledger.prediction_quality()
    doc["status"] = st.status_dict()
    doc["definition"] = st.experiment.to_dict()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "experiment.json").write_text(json.dumps(doc, indent=2, default=str))
        (out / "experiment.md").write_text(rep.markdown())
        plot = write_plot(ledger, out / "experiment.png", title=f"experiment {name}")
        doc["plot"] = str(plot) if plot else None
    return doc


__all__ = [
    "SessionError",
    "parse_arm",
    "resolve_versions",
    "start",
    "stop",
    "report",
    "registry",
    "state_dir",
]
