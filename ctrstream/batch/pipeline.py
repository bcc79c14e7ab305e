"""The offline training run: point-in-time training set -> LR + DCN-v2 -> evaluation against
the oracle -> ONNX (parity-checked) -> a run directory.

:func:`run_training` takes the training set in memory or as a shard directory
(:func:`training_shards` builds one; ``ctrstream.batch.shards``), which it streams.
It drops the first ``warmup_hours`` of rows (feature history only: their
events fill the windows of the later rows), trains the LR baseline and DCN-v2 with a
time-based split, evaluates both against the oracle's true probabilities on the validation
rows, exports ONNX and writes everything to ``settings.data_dir/models/<run id>/``:

```
<run>/evaluation.json   both models + oracle on the same validation rows
<run>/reliability.png   all curves on one diagram
<run>/<kind>/model.onnx, card.json, reliability.png, checkpoint.pt   (kind = deep | lr)
```

and points ``settings.data_dir/models/LATEST`` at the run. ``ctrstream train`` and
``ctrstream publish`` (:mod:`ctrstream.cli.train`) drive it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

BASE_NAMES = {"deep": "ctr_deep", "lr": "ctr_lr"}


def models_root(settings) -> Path:
    return Path(settings.data_dir) / "models"


def latest_run(settings) -> Path:
    root = models_root(settings)
    ptr = root / "LATEST"
    if not ptr.exists():
        raise FileNotFoundError(f"no trained models under {root}: run `ctrstream train` first")
    return root / ptr.read_text().strip()


def oracle_for(ids, oracle) -> np.ndarray | None:
    """True probabilities for ``ids`` (a numpy or pyarrow array of impression ids) from an
    oracle table (impression_id, p_click); None when the oracle does not cover every id."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if oracle is None or oracle.num_rows == 0:
        return None
    if not isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = pa.array(ids, type=pa.string())
    idx = pc.index_in(ids, value_set=oracle.column("impression_id").combine_chunks())
    if idx.null_count:
        return None
    return oracle.column("p_click").combine_chunks().take(idx).to_numpy(zero_copy_only=False)


def archive_training_data(
    settings,
    start_ms: int | None = None,
    end_ms: int | None = None,
    oracle_path: Path | None = None,
    log=print,
    engine: str | None = None,
):
    """The point-in-time training set of the archive under ``settings.data_dir``:
    (dataset dict, oracle table or None, source description). ``engine``: ``duckdb`` or
    ``spark`` (default: the ``batch_engine`` setting); both give the same rows and values."""
    import pyarrow.parquet as pq

    from ctrstream.batch.spark_engine import resolve_engine

    engine = resolve_engine(engine, settings.batch_engine)
    window_ms = int(settings.attribution_window_s * 1000)
    source = f"archive {settings.data_dir}"
    log(f"building the training set from {source} ({engine}) ...")
    ds = _build(engine, settings.data_dir, start_ms, end_ms, window_ms)
    oracle = pq.read_table(oracle_path) if oracle_path else None
    return ds, oracle, source


def _build(
    engine: str, data_dir: Path | str, start_ms: int | None, end_ms: int | None, window_ms: int
) -> dict:
    """The training set of an archive directory by ``engine``."""
    if engine == "spark":
        from ctrstream.batch import spark_engine

        spark = spark_engine.spark_session()
        return spark_engine.training_set(data_dir, start_ms, end_ms, window_ms, spark=spark)
    from ctrstream.batch.point_in_time import training_set

    return training_set(data_dir, start_ms, end_ms, window_ms)


def traffic_training_data(
    traffic,
    source: str,
    start_ms: int | None = None,
    end_ms: int | None = None,
    log=print,
    engine: str = "duckdb",
):
    """The point-in-time training set of generated or written traffic (an object with
    ``scenario``, ``impressions``, ``clicks`` and ``oracle``, as the simulation makes):
    (dataset dict, the traffic's oracle, source description). With ``engine="spark"`` the
    traffic is first written as a Parquet archive in a temporary directory (Spark reads
    archives), removed afterwards."""
    from ctrstream.batch.point_in_time import training_set

    window_ms = int(traffic.scenario.attribution_window_s * 1000)
    log(f"building the training set from {source} ({engine}) ...")
    if engine != "spark":
        return training_set(traffic, start_ms, end_ms, window_ms), traffic.oracle, source
    import tempfile

    from ctrstream.batch.archive import write_partitioned

    with tempfile.TemporaryDirectory(prefix="ctrstream-archive-") as tmp:
        write_partitioned(tmp, "impressions", traffic.impressions)
        write_partitioned(tmp, "clicks", traffic.clicks)
        ds = _build("spark", tmp, start_ms, end_ms, window_ms)
    return ds, traffic.oracle, source


def drop_warmup(ds: dict, warmup_ms: int) -> dict:
    """The rows of ``ds`` from ``first event time + warmup_ms`` on. The dropped rows' events
    still count in every window of the kept rows (``training_set`` computed the windows from
    all events): the warm-up is feature history only, so the first trained and evaluated
    rows do not see windows that are empty only because the data set starts there."""
    if warmup_ms <= 0 or len(ds["label"]) == 0:
        return ds
    t = np.asarray(ds["event_time_ms"])
    cut = int(t.min()) + int(warmup_ms)
    keep: slice | np.ndarray
    if np.all(t[1:] >= t[:-1]):  # training_set's order: the kept rows are views, not copies
        keep = slice(int(np.searchsorted(t, cut, side="left")), None)
    else:
        keep = t >= cut
    return {
        k: (v[keep] if isinstance(v, np.ndarray) and len(v) == len(t) else v) for k, v in ds.items()
    }


def training_shards(
    settings,
    out_dir: Path,
    traffic=None,
    start_ms: int | None = None,
    end_ms: int | None = None,
    log=print,
    engine: str | None = None,
) -> dict:
    """Build the point-in-time training set as a shard directory (``ctrstream.batch.shards``)
    in ``out_dir`` (new or empty); returns its manifest.

    From the archive under ``settings.data_dir`` (``traffic`` None) with the chunked build
    (``point_in_time_chunked``: memory bounded by one chunk); from ``traffic`` (an object
    with ``scenario``, ``impressions`` and ``clicks``: generated or read, already in memory)
    with the in-memory build, written as shards. ``engine``: ``duckdb`` or ``spark``
    (default: the ``batch_engine`` setting); Spark writes the shards itself
    (``spark_engine.write_training_shards``: a traffic is first written as an archive in a
    temporary directory), one partition at a time through this process."""
    from ctrstream.batch.point_in_time import training_set
    from ctrstream.batch.point_in_time_chunked import training_set_chunked
    from ctrstream.batch.shards import write_training_set
    from ctrstream.batch.spark_engine import resolve_engine

    engine = resolve_engine(engine, settings.batch_engine)
    if engine == "spark":
        return _spark_shards(settings, out_dir, traffic, start_ms, end_ms, log)
    if traffic is None:
        window_ms = int(settings.attribution_window_s * 1000)
        log(f"building the training set from archive {settings.data_dir} in chunks ...")
        return training_set_chunked(
            settings.data_dir,
            out_dir,
            start_ms=start_ms,
            end_ms=end_ms,
            attribution_window_ms=window_ms,
        )
    window_ms = int(traffic.scenario.attribution_window_s * 1000)
    log(f"building the training set into {out_dir} ...")
    ds = training_set(traffic, start_ms, end_ms, window_ms)
    del ds["counts"]  # not stored: dense is what training reads
    return write_training_set(
        ds, out_dir, attribution_window_ms=window_ms, start_ms=start_ms, end_ms=end_ms
    )


def _spark_shards(
    settings, out_dir: Path, traffic, start_ms: int | None, end_ms: int | None, log
) -> dict:
    """:func:`training_shards` by the Spark engine."""
    import tempfile

    from ctrstream.batch import spark_engine
    from ctrstream.batch.archive import write_partitioned

    if traffic is None:
        window_ms = int(settings.attribution_window_s * 1000)
        log(f"building the training set from archive {settings.data_dir} (spark) ...")
        return spark_engine.write_training_shards(
            settings.data_dir, out_dir, start_ms, end_ms, window_ms
        )
    window_ms = int(traffic.scenario.attribution_window_s * 1000)
    log(f"building the training set into {out_dir} (spark) ...")
    with tempfile.TemporaryDirectory(prefix="ctrstream-archive-") as tmp:
        write_partitioned(tmp, "impressions", traffic.impressions)
        write_partitioned(tmp, "clicks", traffic.clicks)
        return spark_engine.write_training_shards(tmp, out_dir, start_ms, end_ms, window_ms)


def run_training(
    settings,
    ds: dict | str | Path,
    oracle=None,
    kinds=("lr", "deep"),
    out_dir: Path | None = None,
    seed: int = 0,
    epochs: int | None = None,
    neg_downsample: float | None = None,
    val_fraction: float = 0.1,
    source: str = "",
    progress: bool = True,
    log=print,
    train_kwargs: dict | None = None,
    warmup_hours: float = 0.0,
) -> dict:
    """Train, evaluate, export and write the run directory; returns the run summary.

    ``ds``: an in-memory training set (``point_in_time.training_set``'s dict; trained with
    ``ctrstream.models.training.train``) or a shard directory (``ctrstream.batch.shards``;
    streamed with ``train_streamed``: memory does not grow with its rows).
    ``train_kwargs``: kind -> extra keyword arguments of the training function.
    ``warmup_hours``: the first hours of ``ds`` are feature history only (:func:`drop_warmup`;
    for shards, the rows before the first time + warm-up are skipped)."""
    from ctrstream.models.evaluation import evaluate, reliability_diagram, write_model_card
    from ctrstream.models.export import export_onnx
    from ctrstream.models.training import save_checkpoint, train, train_streamed

    warmup_ms = int(round(warmup_hours * 3_600_000))
    stream = None
    if isinstance(ds, dict):
        rows_before = len(ds["label"])
        ds = drop_warmup(ds, warmup_ms)
        n = len(ds["label"])
    else:
        from ctrstream.batch.shards import open_shards

        stream = open_shards(ds)
        rows_before = n = stream.rows
    if n == 0:
        raise ValueError("the training set is empty (no labeled impressions in the window)")
    run_id = time.strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir else models_root(settings) / run_id
    out.mkdir(parents=True, exist_ok=True)
    warmup = dict(hours=warmup_hours, rows_dropped=rows_before - n)
    summary: dict = dict(run_id=out.name, source=source, rows=n, warmup=warmup, models={})
    curves, labels, oracle_p = {}, None, None
    for kind in kinds:
        kw = dict(
            seed=seed,
            epochs=epochs,
            neg_downsample=neg_downsample,
            progress=progress,
            val_fraction=val_fraction,
        ) | (train_kwargs or {}).get(kind, {})
        if stream is not None:
            net, info = train_streamed(stream, kind, start_ms=stream.t_min + warmup_ms, **kw)
            n = info["train_rows"] + info["val_rows"]
            warmup["rows_dropped"] = rows_before - n
            summary["rows"] = n
            ids = info.pop("val_ids")
        else:
            assert isinstance(ds, dict)
            net, info = train(ds, kind, **kw)
            ids = ds["impression_id"][info["val_index"]] if "impression_id" in ds else None
        oracle_p = oracle_for(ids, oracle) if ids is not None else None
        if oracle_p is None and isinstance(ds, dict) and "oracle_p" in ds:
            oracle_p = np.asarray(ds["oracle_p"])[info["val_index"]]
        ev = evaluate(info["val_probs"], info["val_labels"], oracle_p)
        kdir = out / kind
        exp = export_onnx(net, kdir / "model.onnx")
        save_checkpoint(net, kdir / "checkpoint.pt")
        curves_k = {kind: info["val_probs"]} | (
            {"oracle": oracle_p} if oracle_p is not None else {}
        )
        reliability_diagram(
            kdir / "reliability.png",
            curves_k,
            info["val_labels"],
            title=f"{BASE_NAMES[kind]} (validation)",
        )
        card = write_model_card(
            kdir / "card.json",
            name=BASE_NAMES[kind],
            evaluation=ev,
            info=info,
            extra=dict(source=source, warmup=warmup, onnx=exp, run_id=out.name),
        )
        curves[kind] = info["val_probs"]
        labels = info["val_labels"]
        summary["models"][kind] = dict(
            evaluation=ev,
            train_seconds=info["train_seconds"],
            card=str(kdir / "card.json"),
            onnx=str(kdir / "model.onnx"),
            fingerprint=card["feature_fingerprint"],
        )
        log(
            f"{kind}: NE {ev['model']['ne']:.4f} (oracle {ev['oracle']['ne']:.4f})"
            if ev["oracle"]
            else f"{kind}: NE {ev['model']['ne']:.4f}"
        )
    if oracle_p is not None:
        curves["oracle"] = oracle_p
    if curves and labels is not None:
        reliability_diagram(out / "reliability.png", curves, labels, title="validation")
    summary["val_rows"] = int(len(labels)) if labels is not None else 0
    (out / "evaluation.json").write_text(
        json.dumps(
            {
                k: {"train_seconds": v["train_seconds"], **v["evaluation"]}
                for k, v in summary["models"].items()
            },
            indent=2,
            default=float,
        )
    )
    if out.parent == models_root(settings):
        (out.parent / "LATEST").write_text(out.name)
    summary["dir"] = str(out)
    return summary
