"""The controller's side effects against a stack: the batch layer, training, Triton, the
experiments' file store, calibration. Each is idempotent or checks what is done first, so a
controller that redoes a step after a crash does not do it twice (``docs/controller.md``).

The exploration slice and the closed loop's truth come from the loop's decision logs
(``<run_dir>/experiments/*/loop/impressions/impressions-*.parquet``, and the same under
``experiments/.archive/``: ``impression_id``, ``explored``, ``p_true``), read as files: the
controller does not import the loop.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ctrstream.config import Settings
from ctrstream.controller.decay import read_decay_state
from ctrstream.controller.gate import GateRule, offline_gate
from ctrstream.experiments.registry import Registry

log = logging.getLogger("ctrstream.controller")

TAG_FIELD = "controller_tag"  # in a published version's card.json: the cycle step that published it


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def decision_log_slice(run_dir: Path) -> dict[str, tuple[bool, float, float]]:
    """impression id -> (explored, true p, propensity) over every experiment's decision log
    (the propensity: the chance the ad server gave that ad that slot, given the branch)."""
    import pyarrow.parquet as pq

    out: dict[str, tuple[bool, float, float]] = {}
    root = Path(run_dir) / "experiments"
    # the registry archives a stopped experiment's folder when one of its name starts again
    # (the following loop's default restarts on a promotion): its decision log still holds
    # the impressions it served, which a later training window covers
    parts = [
        *root.glob(".archive/*/loop/impressions/impressions-*.parquet"),
        *root.glob("*/loop/impressions/impressions-*.parquet"),
    ]
    for p in sorted(parts):
        t = pq.read_table(p, columns=["impression_id", "explored", "p_true", "propensity"])
        for i, e, pt, pr in zip(
            t.column("impression_id").to_pylist(),
            t.column("explored").to_pylist(),
            t.column("p_true").to_pylist(),
            t.column("propensity").to_pylist(),
            strict=True,
        ):
            out[str(i)] = (bool(e), float(pt), float(pr))
    return out


class StackOperations:
    """:class:`ctrstream.controller.cycle.Operations` against the stack of ``settings``."""

    def __init__(
        self,
        settings: Settings,
        *,
        kind: str = "lr",
        oracle_path: Path | None = None,
        epochs: int | None = None,
        warmup_hours: float = 1.0,
        val_fraction: float = 0.2,
        read_dlq: bool = True,
        seed: int = 0,
    ) -> None:
        self.settings = settings
        self.registry = Registry.of(settings)
        self.allowed_lateness_ms = int(settings.allowed_lateness_s * 1000)
        # an impression's label is complete once its attribution window closed: the training
        # set holds only rows that old (the alarm's cycle waits for enough of them)
        self.label_window_ms = int(settings.attribution_window_s * 1000)
        self.kind = kind
        self.oracle_path = oracle_path
        self.epochs = epochs
        self.warmup_hours = warmup_hours
        self.warmup_ms = int(round(warmup_hours * 3_600_000))
        self.val_fraction = val_fraction
        self.read_dlq = read_dlq
        self.seed = seed
        self._redis: Any = None

    def _r(self) -> Any:
        if self._redis is None:
            from ctrstream.store.connection import redis_client

            self._redis = redis_client(self.settings, timeout_s=120.0)
        return self._redis

    # ---------------------------------------------------------------- clock, decay, archive

    def event_time_ms(self) -> int | None:
        from ctrstream.batch.archive import max_event_time

        return max_event_time(self.settings.data_dir)

    def decay_state(self) -> dict | None:
        return read_decay_state(self._r())

    def archive_complete_for(self, cutoff_ms: int) -> tuple[bool, str]:
        t = self.event_time_ms()
        need = cutoff_ms + self.allowed_lateness_ms
        if t is None or t < need:
            return False, f"archive at {t}, needs {need} (cut-off + allowed lateness)"
        return True, f"archive at event time {t} covers cut-off {cutoff_ms} + lateness"

    # ---------------------------------------------------------------- batch layer

    def switch_view(self, cutoff_ms: int) -> dict:
        """The batch view at ``cutoff_ms``, served: found when the pointer already names a
        complete version of that cut-off, built and switched otherwise."""
        from ctrstream.batch.views import publish_batch_view
        from ctrstream.store import batch_view as BV

        r = self._r()
        v = BV.served_version(r)
        if v is not None and BV.read_meta(r, v).get("cutoff_ms") == str(int(cutoff_ms)):
            return {"version": v, "cutoff_ms": int(cutoff_ms), "already": True}
        res = publish_batch_view(self.settings, cutoff_ms=int(cutoff_ms), r=r)
        return {k: res[k] for k in ("version", "cutoff_ms", "keys_written", "seconds")}

    def reconcile(self) -> dict:
        """Reconcile the served batch view with the speed view (batch wins; redoing it
        writes the same values)."""
        from ctrstream.batch.reconcile import reconcile

        rep = reconcile(self.settings, read_dlq=self.read_dlq, redis_client=self._r())
        d = rep.to_dict(max_differences=0)
        keep = ("version", "cutoff_ms", "cells_compared", "cells_differing", "explained")
        return {k: d[k] for k in keep} | {"applied_cells": d["applied_cells"]}

    # ---------------------------------------------------------------- training and the gate

    def train(self, folder: Path, start_ms: int, end_ms: int) -> dict:
        """Train the challenger on the point-in-time training set of ``[start_ms, end_ms)``
        into ``folder``; a folder with ``trained.json`` is a finished run, returned as is.
        The validation rows (inputs, labels, ids, the truth and the exploration flags when
        known) are kept in ``val.npz`` for the gate."""
        from ctrstream.batch.pipeline import (
            archive_training_data,
            drop_warmup,
            oracle_for,
            run_training,
        )
        from ctrstream.models.training import time_split

        folder = Path(folder)
        done = folder / "trained.json"
        if done.exists():
            out: dict = json.loads(done.read_text())
            return out
        folder.mkdir(parents=True, exist_ok=True)
        ds, oracle, source = archive_training_data(
            self.settings, start_ms, end_ms, self.oracle_path, log=log.info
        )
        summary = run_training(
            self.settings,
            ds,
            oracle,
            kinds=(self.kind,),
            out_dir=folder / "run",
            seed=self.seed,
            epochs=self.epochs,
            val_fraction=self.val_fraction,
            source=source,
            progress=False,
            log=log.info,
            warmup_hours=self.warmup_hours,
        )
        ds = drop_warmup(ds, int(round(self.warmup_hours * 3_600_000)))
        _, val, _ = time_split(np.asarray(ds["event_time_ms"]), self.val_fraction)
        ids = np.asarray(
            ds["impression_id"].to_numpy(zero_copy_only=False)
            if hasattr(ds["impression_id"], "to_numpy")
            else ds["impression_id"]
        )[val].astype(str)
        truth = oracle_for(ids, oracle)
        logs = decision_log_slice(self.settings.run_dir)
        explored = np.array([logs.get(i, (False, 0.0, 1.0))[0] for i in ids], dtype=bool)
        propensity = np.array([logs.get(i, (False, 0.0, 1.0))[2] for i in ids])
        if truth is None and logs and all(i in logs for i in ids):
            truth = np.array([logs[i][1] for i in ids])
        np.savez(
            folder / "val.npz",
            sparse=np.asarray(ds["sparse"])[val],
            dense=np.asarray(ds["dense"])[val],
            label=np.asarray(ds["label"])[val],
            impression_id=ids,
            oracle=truth if truth is not None else np.full(len(ids), np.nan),
            explored=explored,
            propensity=propensity,
        )
        m = summary["models"][self.kind]
        res = {
            "onnx": m["onnx"],
            "card": m["card"],
            "val": str(folder / "val.npz"),
            "rows": summary["rows"],
            "val_rows": int(len(ids)),
            "explored_rows": int(explored.sum()),
            "evaluation": {k: m["evaluation"][k] for k in ("model", "oracle", "ne_gap")},
            "window_ms": [int(start_ms), int(end_ms)],
        }
        _write_json(done, res)
        return res

    def champion(self, base: str) -> dict | None:
        from ctrstream.models.publish import read_served, served_model_name

        served = served_model_name(self.settings, base)
        rec = read_served(self.settings)["models"].get(served)
        if not rec or not rec.get("versions"):
            return None
        v = max(int(x) for x in rec["versions"])
        onnx = Path(self.settings.triton.model_repository) / served / str(v) / "model.onnx"
        return {"model": base, "version": v, "onnx": str(onnx)}

    def gate(self, trained: dict, champion: dict | None, rule: GateRule) -> dict:
        from ctrstream import features
        from ctrstream.models.onnx_runtime import ort_predict, ort_session

        z = np.load(trained["val"])
        x = {features.INPUT_SPARSE: z["sparse"], features.INPUT_DENSE: z["dense"]}

        def score(path: str) -> np.ndarray:
            return np.asarray(ort_predict(ort_session(path), x), dtype=np.float64).reshape(-1)

        truth = z["oracle"]
        res = offline_gate(
            z["label"],
            score(trained["onnx"]),
            None if champion is None else score(champion["onnx"]),
            None if np.isnan(truth).any() else truth,
            z["explored"] if z["explored"].any() else None,
            rule,
            z["propensity"] if "propensity" in z.files else None,
        )
        return res.to_dict()

    # ---------------------------------------------------------------- Triton

    def _tagged(self, base: str, tag: str) -> int | None:
        """The served version of ``base`` whose card carries ``tag`` (None: none)."""
        from ctrstream.models.publish import read_served, served_model_name

        served = served_model_name(self.settings, base)
        rec = read_served(self.settings)["models"].get(served) or {}
        for v in rec.get("versions", []):
            card = Path(self.settings.triton.model_repository) / served / str(v) / "card.json"
            try:
                if json.loads(card.read_text()).get(TAG_FIELD) == tag:
                    return int(v)
            except (FileNotFoundError, ValueError):
                continue
        return None

    def publish(self, onnx: str, base: str, tag: str) -> dict:
        from ctrstream.models.publish import publish

        found = self._tagged(base, tag)
        if found is not None:
            return {"version": found, "already": True}
        card_path = Path(onnx).with_name("card.json")
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        res = publish(self.settings, onnx, base, card | {TAG_FIELD: tag}, log=log.info)
        return {"version": int(res["version"]), "already": False, "previous": res["previous"]}

    def pin(self, base: str, versions: list[int], owner: str) -> None:
        from ctrstream.models.publish import pin_versions

        pin_versions(self.settings, base, versions, owner)

    def unpin(self, owner: str) -> None:
        from ctrstream.models.publish import unpin

        unpin(self.settings, owner)

    def follow_calibrator(
        self, from_model: str, from_version: int, to_model: str, to_version: int
    ) -> bool:
        """Serve the challenger's learned calibration for the promoted version until the
        calibrate job checkpoints that version's own learner."""
        from ctrstream.calibration.ids import calibrator_of
        from ctrstream.store.calibration import CalibrationStore

        store = CalibrationStore(self._r())
        params = store.params(calibrator_of(from_model, str(from_version)))
        if not params:
            return False
        store.publish_params(calibrator_of(to_model, str(to_version)), params)
        return True

    def degrade(self, onnx: str, folder: Path, factor: float) -> str:
        """The test hook's over-predicting copy of ``onnx`` (``ctrstream.controller.hooks``):
        ``folder/model.onnx``, with the trained card beside it saying what it is."""
        from ctrstream.controller.hooks import DEGRADE_ENV, overpredicting_onnx

        folder = Path(folder)
        dst = overpredicting_onnx(onnx, folder / "model.onnx", factor)
        card_path = Path(onnx).with_name("card.json")
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        card["degraded"] = f"test hook {DEGRADE_ENV}: probability x{factor:g}, capped below 1"
        _write_json(folder / "card.json", card)
        return str(dst)


__all__ = ["StackOperations", "decision_log_slice", "TAG_FIELD"]
