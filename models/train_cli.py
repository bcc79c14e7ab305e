"""``ctrstream train`` and ``ctrstream publish`` (registered by ``models.cli``).

``ctrstream train`` builds the point-in-time training set (``models.batch_features``) from
the archive under ``settings.data_dir`` - or from a generated scenario
(``--scenario steady --events N``) or a written traffic directory (``--traffic DIR``) -
drops the first ``--warmup-hours`` of rows (feature history only: their events fill the
windows of the later rows), trains the LR baseline and DCN-v2 with a time-based split,
evaluates both against the oracle's true probabilities on the validation rows, exports ONNX (parity-checked) and
writes everything to ``settings.data_dir/models/<run id>/``:

```
<run>/evaluation.json   both models + oracle on the same validation rows
<run>/reliability.png   all curves on one diagram
<run>/<kind>/model.onnx, card.json, reliability.png, checkpoint.pt   (kind = deep | lr)
```

and points ``settings.data_dir/models/LATEST`` at the run.

``ctrstream publish [--model deep|lr|all] [--from RUN_DIR]`` publishes the latest run's
ONNX files as new versions of ``ctr_deep`` / ``ctr_lr`` and switches the running Triton to
them (``models.publish``).
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


def oracle_for(ids: np.ndarray, oracle) -> np.ndarray | None:
    """True probabilities for ``ids`` from an oracle table (impression_id, p_click);
    None when the oracle does not cover every id."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if oracle is None or oracle.num_rows == 0:
        return None
    idx = pc.index_in(pa.array(ids, type=pa.string()),
                      value_set=oracle.column("impression_id").combine_chunks())
    if idx.null_count:
        return None
    return oracle.column("p_click").combine_chunks().take(idx).to_numpy(zero_copy_only=False)


def load_training_data(settings, scenario: str | None = None, events: int | None = None,
                       seed: int = 1, traffic: Path | None = None, oracle_path: Path | None = None,
                       start_ms: int | None = None, end_ms: int | None = None, log=print):
    """(dataset dict, oracle table or None, source description)."""
    import pyarrow.parquet as pq

    from models.batch_features import training_set

    window_ms = int(settings.attribution_window_s * 1000)
    oracle = None
    if scenario or traffic:
        from streaming.generator import generate, load_scenario, read_traffic

        if traffic:
            tr = read_traffic(traffic)
            source = f"traffic {traffic}"
        else:
            overrides = {"seed": seed} | ({"events": events} if events else {})
            tr = generate(load_scenario(scenario, **overrides))
            source = f"scenario {scenario} events={tr.scenario.events} seed={tr.scenario.seed}"
        window_ms = int(tr.scenario.attribution_window_s * 1000)
        oracle = tr.oracle
        log(f"building the training set from {source} ...")
        ds = training_set(tr, start_ms, end_ms, window_ms)
    else:
        source = f"archive {settings.data_dir}"
        log(f"building the training set from {source} ...")
        ds = training_set(settings.data_dir, start_ms, end_ms, window_ms)
    if oracle_path:
        oracle = pq.read_table(oracle_path)
    return ds, oracle, source


def drop_warmup(ds: dict, warmup_ms: int) -> dict:
    """The rows of ``ds`` from ``first event time + warmup_ms`` on. The dropped rows' events
    still count in every window of the kept rows (``training_set`` computed the windows from
    all events): the warm-up is feature history only, so the first trained and evaluated
    rows do not see windows that are empty only because the data set starts there."""
    if warmup_ms <= 0 or len(ds["label"]) == 0:
        return ds
    t = np.asarray(ds["event_time_ms"])
    cut = int(t.min()) + int(warmup_ms)
    if np.all(t[1:] >= t[:-1]):  # training_set's order: the kept rows are views, not copies
        keep = slice(int(np.searchsorted(t, cut, side="left")), None)
    else:
        keep = t >= cut
    return {k: (v[keep] if isinstance(v, np.ndarray) and len(v) == len(t) else v)
            for k, v in ds.items()}


def run_training(settings, ds: dict, oracle=None, kinds=("lr", "deep"), out_dir: Path | None = None,
                 seed: int = 0, epochs: int | None = None, neg_downsample: float | None = None,
                 val_fraction: float = 0.1, source: str = "", progress: bool = True,
                 log=print, train_kwargs: dict | None = None, warmup_hours: float = 0.0) -> dict:
    """Train, evaluate, export and write the run directory; returns the run summary.
    ``train_kwargs``: kind -> extra keyword arguments of ``models.training.train``.
    ``warmup_hours``: the first hours of ``ds`` are feature history only (:func:`drop_warmup`)."""
    from models.evaluation import evaluate, reliability_diagram, write_model_card
    from models.export import export_onnx
    from models.training import save_checkpoint, train

    rows_before = len(ds["label"])
    ds = drop_warmup(ds, int(round(warmup_hours * 3_600_000)))
    n = len(ds["label"])
    if n == 0:
        raise ValueError("the training set is empty (no labeled impressions in the window)")
    run_id = time.strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir else models_root(settings) / run_id
    out.mkdir(parents=True, exist_ok=True)
    warmup = dict(hours=warmup_hours, rows_dropped=rows_before - n)
    summary: dict = dict(run_id=out.name, source=source, rows=n, warmup=warmup, models={})
    curves, val_rows, labels, oracle_p = {}, None, None, None
    for kind in kinds:
        kw = dict(seed=seed, epochs=epochs, neg_downsample=neg_downsample, progress=progress,
                  val_fraction=val_fraction) | (train_kwargs or {}).get(kind, {})
        net, info = train(ds, kind, **kw)
        vi = info["val_index"]
        oracle_p = oracle_for(ds["impression_id"][vi], oracle) if "impression_id" in ds else None
        if oracle_p is None and "oracle_p" in ds:
            oracle_p = np.asarray(ds["oracle_p"])[vi]
        ev = evaluate(info["val_probs"], info["val_labels"], oracle_p)
        kdir = out / kind
        exp = export_onnx(net, kdir / "model.onnx")
        save_checkpoint(net, kdir / "checkpoint.pt")
        curves_k = {kind: info["val_probs"]} | ({"oracle": oracle_p} if oracle_p is not None else {})
        reliability_diagram(kdir / "reliability.png", curves_k, info["val_labels"],
                            title=f"{BASE_NAMES[kind]} (validation)")
        card = write_model_card(kdir / "card.json", name=BASE_NAMES[kind], evaluation=ev, info=info,
                                extra=dict(source=source, warmup=warmup, onnx=exp,
                                           run_id=out.name))
        curves[kind] = info["val_probs"]
        val_rows, labels = vi, info["val_labels"]
        summary["models"][kind] = dict(evaluation=ev, train_seconds=info["train_seconds"],
                                       card=str(kdir / "card.json"), onnx=str(kdir / "model.onnx"),
                                       fingerprint=card["feature_fingerprint"])
        log(f"{kind}: NE {ev['model']['ne']:.4f} (oracle {ev['oracle']['ne']:.4f})"
            if ev["oracle"] else f"{kind}: NE {ev['model']['ne']:.4f}")
    if oracle_p is not None:
        curves["oracle"] = oracle_p
    if curves and labels is not None:
        reliability_diagram(out / "reliability.png", curves, labels, title="validation")
    summary["val_rows"] = int(len(val_rows)) if val_rows is not None else 0
    (out / "evaluation.json").write_text(json.dumps(
        {k: {"train_seconds": v["train_seconds"], **v["evaluation"]}
         for k, v in summary["models"].items()}, indent=2, default=float))
    if out.parent == models_root(settings):
        (out.parent / "LATEST").write_text(out.name)
    summary["dir"] = str(out)
    return summary


def print_summary(summary: dict, console) -> None:
    from rich.table import Table

    from models.evaluation import TABLE_HEADER, format_table

    t = Table(*TABLE_HEADER, "train s", title=f"validation ({summary.get('val_rows', 0):,} rows, "
                                             f"{summary.get('source', '')})")
    oracle = None
    for kind, m in summary["models"].items():
        ev = m["evaluation"]
        t.add_row(*format_table({BASE_NAMES[kind]: ev["model"]})[0], f"{m['train_seconds']:.1f}")
        oracle = ev["oracle"] or oracle
    if oracle:
        t.add_row(*format_table({"oracle (true p)": oracle})[0], "-")
    console.print(t)


def register(app) -> None:
    import typer
    from rich.console import Console

    console = Console(stderr=True)
    out = Console()

    @app.command("train")
    def train_cmd(
        model: str = typer.Option("all", help="deep | lr | all"),
        scenario: str = typer.Option(None, help="train on a generated scenario instead of the archive"),
        events: int = typer.Option(None, help="impressions of the generated scenario"),
        scenario_seed: int = typer.Option(1, help="seed of the generated scenario"),
        traffic: Path = typer.Option(None, help="a traffic directory (`ctrstream generate --out`)"),
        oracle: Path = typer.Option(None, help="oracle Parquet (impression_id, p_click) for the archive"),
        start_ms: int = typer.Option(None, help="first impression event time (archive)"),
        end_ms: int = typer.Option(None, help="end of impression event times, exclusive"),
        seed: int = typer.Option(0, help="training seed"),
        epochs: int = typer.Option(None, help="epochs (default per model)"),
        neg_downsample: float = typer.Option(None, help="keep negatives with this probability"),
        val_fraction: float = typer.Option(0.1, help="last fraction of event time for validation"),
        warmup_hours: float = typer.Option(
            1.0, help="the first hours of labeled impressions are feature history only "
                      "(their events fill the windows; they are neither trained on nor evaluated)"),
        out_dir: Path = typer.Option(None, "--out", help="run directory (default data_dir/models/<run id>)"),
    ):
        """Train the LR baseline and DCN-v2, evaluate against the oracle, export ONNX."""
        from ctrstream.config import get_settings

        settings = get_settings()
        kinds = ("lr", "deep") if model == "all" else (model,)
        if any(k not in BASE_NAMES for k in kinds):
            console.print(f"[bold red]error:[/] --model must be deep, lr or all, not {model!r}")
            raise typer.Exit(2)
        try:
            ds, orc, source = load_training_data(settings, scenario, events, scenario_seed, traffic,
                                                 oracle, start_ms, end_ms, log=console.print)
            summary = run_training(settings, ds, orc, kinds, out_dir, seed, epochs, neg_downsample,
                                   val_fraction, source, log=console.print,
                                   warmup_hours=warmup_hours)
        except (FileNotFoundError, ValueError) as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None
        print_summary(summary, out)
        out.print(f"run directory: {summary['dir']}")

    @app.command("publish")
    def publish_cmd(
        model: str = typer.Option("all", help="deep | lr | all"),
        from_dir: Path = typer.Option(None, "--from", help="run directory (default: the latest)"),
        load: bool = typer.Option(True, help="load into the running Triton and switch versions"),
    ):
        """Publish trained models into the Triton repository and switch Triton to them."""
        from ctrstream.config import get_settings
        from models.publish import PublishError, publish

        settings = get_settings()
        kinds = ("lr", "deep") if model == "all" else (model,)
        try:
            run = Path(from_dir) if from_dir else latest_run(settings)
            for kind in kinds:
                onnx_path = run / kind / "model.onnx"
                card_path = run / kind / "card.json"
                card = json.loads(card_path.read_text()) if card_path.exists() else None
                res = publish(settings, onnx_path, BASE_NAMES[kind], card, load=load,
                              log=console.print)
                out.print(f"{BASE_NAMES[kind]}: version {res['version']} -> {res['model_name']}"
                          f"{' (loaded, previous ' + str(res['previous']) + ')' if load else ''}")
        except (FileNotFoundError, PublishError) as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None
