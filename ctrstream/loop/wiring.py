"""Putting the closed loop together: the world, the ad server with one ranker per arm, the
experiment and its state, from settings and a started experiment."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ctrstream.config import Settings
from ctrstream.loop import session
from ctrstream.loop.online_arm import OnlineArm
from ctrstream.loop.runner import ClosedLoop, LoopConfig, LoopSummary


def build_world(
    settings: Settings,
    *,
    traffic: Any = None,
    scenario: str = "steady",
    start_ms: int | None = None,
    request_rate: float | None = None,
    overrides: dict | None = None,
) -> tuple[Any, int]:
    """The world and the event time the loop starts at: after ``traffic`` (an open-loop
    :class:`~ctrstream.simulation.traffic.Traffic` or its folder, whose market and state the
    world continues) or at the scenario's start."""
    from ctrstream.simulation.scenarios import load_scenario
    from ctrstream.simulation.traffic import read_traffic
    from ctrstream.simulation.world import World

    if isinstance(traffic, (str, Path)):
        traffic = read_traffic(traffic)
    if traffic is not None:
        sc = traffic.scenario.replace(**(overrides or {}))
        t_end = int(traffic.impressions.column("event_time_ms").to_numpy().max()) + 1
        start = int(start_ms) if start_ms is not None else t_end
    else:
        sc = load_scenario(scenario, **(overrides or {}))
        start = int(start_ms) if start_ms is not None else int(sc.start_ms)
    world = World(sc, start, history=traffic, request_rate=request_rate)
    return world, start


def online_learner(settings: Settings, base: str) -> Any:
    """The :class:`~ctrstream.models.online.OnlineLearner` an ``online`` arm starts from:
    ``lr`` / ``deep`` an untrained net of that kind (a cold start); a trained base name
    (``ctr_lr`` / ``ctr_deep``) the newest training run's torch checkpoint of that model (the
    net the served model was exported from); a path to a ``.pt`` checkpoint that net."""
    from ctrstream.batch.pipeline import BASE_NAMES, latest_run
    from ctrstream.experiments.design import ONLINE_COLD_STARTS
    from ctrstream.models.online import OnlineLearner
    from ctrstream.models.training import load_checkpoint

    if base in ONLINE_COLD_STARTS:
        return OnlineLearner.cold(base)
    kinds = {v: k for k, v in BASE_NAMES.items()}
    if base in kinds:
        try:
            path = latest_run(settings) / kinds[base] / "checkpoint.pt"
        except FileNotFoundError as e:
            raise session.SessionError(f"online arm base {base!r}: {e}") from None
        if not path.exists():
            raise session.SessionError(
                f"online arm base {base!r}: the newest training run has no {path}: train "
                f"it (`ctrstream train`) or start cold ({ONLINE_COLD_STARTS})"
            )
        return OnlineLearner(load_checkpoint(path))
    path = Path(base)
    if path.suffix == ".pt" and path.is_file():
        return OnlineLearner(load_checkpoint(path))
    raise session.SessionError(
        f"online arm base {base!r} is neither a cold start {ONLINE_COLD_STARTS}, a trained "
        f"base name {sorted(kinds)} nor an existing .pt checkpoint"
    )


class Rankers:
    """One ranker per arm of an experiment (models on Triton at their pinned version, the
    prior, the oracle from the world's truth, continuously trained models learning in this
    process) and the ad server's ``decide`` over them. ``online``: the arms' learners, by arm
    name (the loop feeds them the shown impressions and checkpoints them)."""

    def __init__(self, settings: Settings, exp: Any, world: Any, *, max_rows: int = 1024):
        from ctrstream.calibration.client import CalibratorClient
        from ctrstream.serving.adserver import AdServer, Ranker, model_ranker
        from ctrstream.serving.auction import AuctionConfig
        from ctrstream.serving.triton_client import Scorer
        from ctrstream.store.connection import redis_client
        from ctrstream.store.reader import FeatureStore

        self.settings = settings
        self.exp = exp
        self.world = world
        self._closers: list[Any] = []
        cal = CalibratorClient(settings)
        sc = world.scenario
        self.server = AdServer(
            settings,
            store=FeatureStore(redis_client(settings, timeout_s=10.0)),
            auction_cfg=AuctionConfig(reserve_cpc=sc.reserve_cpc, reserve_ecpm=sc.reserve_ecpm),
        )
        self.rankers: dict[str, Any] = {}
        self.shadows: list[Any] = []
        self.online: dict[str, OnlineArm] = {}
        window_ms = int(settings.attribution_window_s * 1000)
        scorers: dict[tuple[str, int], Any] = {}
        for a in exp.arms:
            if a.kind == "model":
                key = (a.model_name, int(a.model_version))
                if key not in scorers:
                    scorers[key] = Scorer(
                        settings,
                        model=a.model_name,
                        model_version=int(a.model_version),
                        max_rows=max_rows,
                    )
                    self._closers.append(scorers[key])
                r = model_ranker(a.name, scorers[key], cal)
            elif a.kind == "online":
                arm = OnlineArm(online_learner(settings, a.model_name), window_ms)
                self.online[a.name] = arm
                r = arm.ranker(a.name)
            elif a.kind == "prior":
                r = Ranker(name=a.name, kind="prior")
            else:
                r = Ranker(name=a.name, kind="oracle", truth=world.true_p)
            if a.shadow:
                self.shadows.append(r)
            else:
                self.rankers[a.name] = r
        self.deciding = [a.name for a in exp.arms if not a.shadow]

    def decide(self, batch: Any, arm_of_request: np.ndarray) -> Any:
        names = np.asarray(self.deciding, dtype=object)[arm_of_request]
        # an online arm learns from the shown impressions' model inputs
        return self.server.decide(
            batch, names, self.rankers, self.shadows, keep_inputs=bool(self.online)
        )

    def close(self) -> None:
        for c in self._closers:
            c.close()


def build_loop(
    settings: Settings,
    name: str,
    world: Any,
    cfg: LoopConfig | None = None,
    *,
    fresh: bool = False,
) -> tuple[ClosedLoop, Rankers]:
    reg = session.registry(settings)
    st = reg.get(name)
    if not st.running:
        raise session.SessionError(
            f"experiment {name} is {st.status}: start a new one (`ctrstream experiment start`)"
        )
    folder = session.state_dir(settings, name)
    if fresh and folder.exists():
        shutil.rmtree(folder)
    rankers = Rankers(settings, st.experiment, world)
    loop = ClosedLoop(
        settings, world, rankers.decide, st.experiment, reg, folder, cfg, online=rankers.online
    )
    loop.resume()
    return loop, rankers


def run_loop(
    settings: Settings,
    name: str,
    *,
    traffic: Any = None,
    scenario: str = "steady",
    start_ms: int | None = None,
    duration_s: float = 3600.0,
    step_s: float = 5.0,
    compression: float | None = None,
    request_rate: float | None = None,
    fresh: bool = False,
    checkpoint_every: int = 20,
    overrides: dict | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> LoopSummary:
    """``ctrstream loop run``: the experiment's closed loop for ``duration_s`` of event time
    from its start (a restarted loop resumes at its checkpoint and ends at the same time);
    ``stop()`` true ends it early at a step's end, checkpointed."""
    world, start = build_world(
        settings,
        traffic=traffic,
        scenario=scenario,
        start_ms=start_ms,
        request_rate=request_rate,
        overrides=overrides,
    )
    cfg = LoopConfig(step_s=step_s, compression=compression, checkpoint_every=checkpoint_every)
    loop, rankers = build_loop(settings, name, world, cfg, fresh=fresh)
    try:
        return loop.run(start, start + int(duration_s * 1000), stop=stop)
    finally:
        rankers.close()


__all__ = ["build_world", "build_loop", "run_loop", "Rankers"]
