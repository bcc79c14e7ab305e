"""``ctrstream train`` and ``ctrstream publish``.

``ctrstream train`` builds the point-in-time training set from the archive under
``settings.data_dir`` - or from a generated scenario (``--scenario steady --events N``) or
a written traffic directory (``--traffic DIR``) - and runs
:func:`ctrstream.batch.pipeline.run_training` on it. By default the set is written as
Parquet shards (``ctrstream.batch.shards``: the archive's with the chunked build, or by
Spark with ``--engine spark``, one partition at a time) and training streams them, so memory does not grow with the data; ``--in-memory`` builds and
trains on the whole set in memory (faster for small sets). ``--shards DIR`` keeps the
shards (a new or empty directory), otherwise they live in a temporary directory under the
data directory for the run.

``ctrstream publish [--model deep|lr|all] [--from RUN_DIR]`` publishes the latest run's
ONNX files as new versions of ``ctr_deep`` / ``ctr_lr`` and switches the running Triton to
them (``ctrstream.models.publish``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from ctrstream.batch.pipeline import (
    BASE_NAMES,
    archive_training_data,
    latest_run,
    run_training,
    traffic_training_data,
    training_shards,
)


def _traffic(scenario: str | None, events: int | None, seed: int, traffic: Path | None):
    """The traffic ``ctrstream train`` reads (a written directory) or generates (a
    scenario), and its description."""
    from ctrstream.simulation.generator import generate, load_scenario, read_traffic

    if traffic:
        return read_traffic(traffic), f"traffic {traffic}"
    assert scenario is not None
    overrides = {"seed": seed} | ({"events": events} if events else {})
    tr = generate(load_scenario(scenario, **overrides))
    return tr, f"scenario {scenario} events={tr.scenario.events} seed={tr.scenario.seed}"


def load_training_data(
    settings,
    scenario: str | None = None,
    events: int | None = None,
    seed: int = 1,
    traffic: Path | None = None,
    oracle_path: Path | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
    log=print,
    engine: str | None = None,
):
    """What ``ctrstream train`` trains on: (dataset dict, oracle table or None, source).
    ``engine``: the batch engine that builds it (duckdb | spark; default: the setting)."""
    from ctrstream.batch.spark_engine import resolve_engine

    engine = resolve_engine(engine, settings.batch_engine)

    if not traffic and not scenario:
        return archive_training_data(settings, start_ms, end_ms, oracle_path, log, engine)
    tr, source = _traffic(scenario, events, seed, traffic)
    ds, oracle, source = traffic_training_data(tr, source, start_ms, end_ms, log, engine)
    if oracle_path:
        import pyarrow.parquet as pq

        oracle = pq.read_table(oracle_path)
    return ds, oracle, source


def build_training_shards(
    settings,
    out_dir: Path,
    scenario: str | None = None,
    events: int | None = None,
    seed: int = 1,
    traffic: Path | None = None,
    oracle_path: Path | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
    log=print,
    engine: str | None = None,
) -> tuple[Any, str]:
    """:func:`load_training_data` written as shards into ``out_dir``: (oracle table or
    None, source description). ``engine``: the batch engine that builds it (duckdb |
    spark; default: the setting)."""
    import pyarrow.parquet as pq

    oracle = pq.read_table(oracle_path) if oracle_path else None
    if not traffic and not scenario:
        training_shards(settings, out_dir, None, start_ms, end_ms, log=log, engine=engine)
        return oracle, f"archive {settings.data_dir}"
    tr, source = _traffic(scenario, events, seed, traffic)
    training_shards(settings, out_dir, tr, start_ms, end_ms, log=log, engine=engine)
    return (oracle if oracle_path else tr.oracle), source


@contextmanager
def shard_directory(settings, keep: Path | None) -> Iterator[Path]:
    """``keep`` (kept after the run), or a temporary directory under the data directory
    (where the archive's disk is), removed after the run."""
    if keep is not None:
        yield Path(keep)
        return
    root = Path(settings.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="training-set-", dir=root) as tmp:
        yield Path(tmp) / "shards"


def print_summary(summary: dict, console) -> None:
    from rich.table import Table

    from ctrstream.models.evaluation import TABLE_HEADER, format_table

    t = Table(
        *TABLE_HEADER,
        "train s",
        title=f"validation ({summary.get('val_rows', 0):,} rows, {summary.get('source', '')})",
    )
    oracle = None
    for kind, m in summary["models"].items():
        ev = m["evaluation"]
        t.add_row(*format_table({BASE_NAMES[kind]: ev["model"]})[0], f"{m['train_seconds']:.1f}")
        oracle = ev["oracle"] or oracle
    if oracle:
        t.add_row(*format_table({"oracle (true p)": oracle})[0], "-")
    console.print(t)


def register(app) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    out = Console()

    @app.command("train")
    def train_cmd(
        model: str = typer.Option("all", help="deep | lr | all"),
        scenario: str = typer.Option(
            None, help="train on a generated scenario instead of the archive"
        ),
        events: int = typer.Option(None, help="impressions of the generated scenario"),
        scenario_seed: int = typer.Option(1, help="seed of the generated scenario"),
        traffic: Path = typer.Option(None, help="a traffic directory (`ctrstream generate --out`)"),
        oracle: Path = typer.Option(
            None, help="oracle Parquet (impression_id, p_click) for the archive"
        ),
        start_ms: int = typer.Option(None, help="first impression event time (archive)"),
        end_ms: int = typer.Option(None, help="end of impression event times, exclusive"),
        seed: int = typer.Option(0, help="training seed"),
        epochs: int = typer.Option(None, help="epochs (default per model)"),
        neg_downsample: float = typer.Option(None, help="keep negatives with this probability"),
        val_fraction: float = typer.Option(0.1, help="last fraction of event time for validation"),
        warmup_hours: float = typer.Option(
            1.0,
            help="the first hours of labeled impressions are feature history only "
            "(their events fill the windows; they are neither trained on nor evaluated)",
        ),
        out_dir: Path = typer.Option(
            None, "--out", help="run directory (default data_dir/models/<run id>)"
        ),
        in_memory: bool = typer.Option(
            False,
            "--in-memory",
            help="build and train on the whole training set in memory instead of streaming "
            "Parquet shards (faster for small sets; memory grows with the data)",
        ),
        shards: Path = typer.Option(
            None,
            "--shards",
            help="keep the training set's shards in this new or empty directory "
            "(default: a temporary directory under the data directory)",
        ),
        engine: str = typer.Option(
            None,
            help="batch engine of the training set: duckdb (this machine) or spark (PySpark, "
            "the spark extra; docs/batch-engines.md); default: CTRSTREAM_BATCH_ENGINE, duckdb",
        ),
    ):
        """Train the LR baseline and DCN-v2, evaluate against the oracle, export ONNX."""
        from ctrstream.batch.spark_engine import SparkUnavailable, resolve_engine
        from ctrstream.config import get_settings

        settings = get_settings()
        kinds = ("lr", "deep") if model == "all" else (model,)
        if any(k not in BASE_NAMES for k in kinds):
            console.print(f"[bold red]error:[/] --model must be deep, lr or all, not {model!r}")
            raise typer.Exit(2)
        if in_memory and shards is not None:
            console.print("[bold red]error:[/] --shards streams the set: drop --in-memory")
            raise typer.Exit(2)
        try:
            engine_name = resolve_engine(engine, settings.batch_engine)
        except ValueError as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None
        data = (
            scenario,
            events,
            scenario_seed,
            traffic,
            oracle,
            start_ms,
            end_ms,
        )
        run_args: dict[str, Any] = dict(
            kinds=kinds,
            out_dir=out_dir,
            seed=seed,
            epochs=epochs,
            neg_downsample=neg_downsample,
            val_fraction=val_fraction,
            log=console.print,
            warmup_hours=warmup_hours,
        )
        try:
            if in_memory:
                ds, orc, source = load_training_data(
                    settings, *data, log=console.print, engine=engine_name
                )
                summary = run_training(settings, ds, orc, source=source, **run_args)
            else:
                with shard_directory(settings, shards) as shard_dir:
                    orc, source = build_training_shards(
                        settings, shard_dir, *data, log=console.print, engine=engine_name
                    )
                    summary = run_training(settings, shard_dir, orc, source=source, **run_args)
        except (FileNotFoundError, ValueError, SparkUnavailable) as e:
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
        from ctrstream.models.publish import PublishError, publish

        settings = get_settings()
        kinds = ("lr", "deep") if model == "all" else (model,)
        try:
            run = Path(from_dir) if from_dir else latest_run(settings)
            for kind in kinds:
                onnx_path = run / kind / "model.onnx"
                card_path = run / kind / "card.json"
                card = json.loads(card_path.read_text()) if card_path.exists() else None
                res = publish(
                    settings, onnx_path, BASE_NAMES[kind], card, load=load, log=console.print
                )
                out.print(
                    f"{BASE_NAMES[kind]}: version {res['version']} -> {res['model_name']}"
                    f"{' (loaded, previous ' + str(res['previous']) + ')' if load else ''}"
                )
        except (FileNotFoundError, PublishError) as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None
