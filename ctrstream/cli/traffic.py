"""``ctrstream generate`` and ``ctrstream replay``: synthetic traffic and replay into Kafka."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
out = Console()

_SET_HELP = (
    "override any scenario field, KEY=VALUE (VALUE parsed as JSON when it can be), "
    "repeatable: --set base_ctr=0.03 --set n_users=50000"
)


def _overrides(settings, events, seed, hours, base_ctr, sets) -> dict:
    ov = {
        "attribution_window_s": settings.attribution_window_s,
        "allowed_lateness_s": settings.allowed_lateness_s,
    }
    for name, val in (("events", events), ("seed", seed), ("hours", hours), ("base_ctr", base_ctr)):
        if val is not None:
            ov[name] = val
    for item in sets or []:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            ov[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            ov[k.strip()] = v
    return ov


def _scenario(settings, scenario, events, seed, hours, base_ctr, sets):
    from ctrstream.simulation.scenarios import load_scenario

    try:
        return load_scenario(scenario, **_overrides(settings, events, seed, hours, base_ctr, sets))
    except (ValueError, TypeError) as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None


def _traffic_table(tr) -> Table:
    m = tr.meta
    t = Table("", "value", title=f"traffic: scenario {tr.scenario.name!r}, seed {tr.scenario.seed}")
    n, c = tr.impressions.num_rows, tr.clicks.num_rows
    t.add_row("impressions", f"{n:,}")
    t.add_row("clicks", f"{c:,}")
    t.add_row("realized CTR", f"{c / max(n, 1):.4%}")
    if "mean_p_click" in m:
        t.add_row("mean true p_click (oracle)", f"{m['mean_p_click']:.4%}")
    if "late_clicks" in m:
        t.add_row(
            f"clicks after the {tr.scenario.attribution_window_s:.0f} s window",
            f"{m['late_clicks']:,}",
        )
    if m.get("drift_campaign") is not None:
        t.add_row(
            "drift",
            f"campaign {m['drift_campaign']} {tr.scenario.drift_logit:+.2f} logit "
            f"from {m['drift_time_ms']} ms",
        )
    inj = tr.injected
    if inj["records"] != n + c:
        t.add_row(
            "duplicates / out-of-order / late",
            f"{inj['duplicates']:,} / {inj['out_of_order']:,} / {inj['late']:,}",
        )
        t.add_row("malformed", ", ".join(f"{k} {v:,}" for k, v in inj["malformed"].items()))
    t.add_row("records to replay", f"{inj['records']:,}")
    return t


def _summary_table(s) -> Table:
    t = Table("", "value", title="replay summary")
    t.add_row("sent (acknowledged)", f"{s.sent:,}")
    t.add_row("failed", f"[red]{s.failed:,}[/]" if s.failed else "0")
    for reason, k in s.errors.items():
        t.add_row(f"  {reason}", f"{k:,}")
    for kind, k in s.by_topic.items():
        t.add_row(f"  produced to {kind}", f"{k:,}")
    t.add_row("seconds", f"{s.seconds:,.2f}")
    t.add_row("rate", f"{s.rate:,.0f} records/s")
    t.add_row("bytes (keys + values)", f"{s.bytes:,}")
    if s.interrupted:
        t.add_row("interrupted", "yes (Ctrl-C), queued records flushed")
    return t


def _replay(settings, tr, rate, time_compression, progress) -> int:
    from confluent_kafka import KafkaException

    from ctrstream.simulation.replay import replay

    try:
        s = replay(settings, tr, rate=rate, time_compression=time_compression, progress=progress)
    except KafkaException as e:
        console.print(
            f"[bold red]error:[/] Kafka at {settings.kafka.bootstrap_servers} is not "
            f"usable ({e}). Is the stack up? Try `ctrstream stack status`."
        )
        return 2
    out.print(_summary_table(s))
    return 1 if s.failed else (130 if s.interrupted else 0)


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(
        scenario: str = typer.Option(
            "steady", "--scenario", "-s", help="steady, drift, dirty, or a scenario .json file"
        ),
        events: int = typer.Option(None, "--events", "-n", help="impressions to generate [100000]"),
        seed: int = typer.Option(
            None, "--seed", help="random seed (same seed: identical output) [0]"
        ),
        hours: float = typer.Option(None, "--hours", help="event-time span in hours [6]"),
        base_ctr: float = typer.Option(None, "--base-ctr", help="mean true CTR [0.02]"),
        sets: list[str] = typer.Option(None, "--set", help=_SET_HELP),
        out_dir: Path = typer.Option(
            None, "--out", "-o", help="write impressions/clicks/oracle Parquet + scenario.json here"
        ),
        jsonl: bool = typer.Option(False, "--jsonl", help="also write the clean events as JSONL"),
        to_kafka: bool = typer.Option(
            False,
            "--to-kafka",
            help="also replay the records into the Kafka topics (as fast as possible)",
        ),
        progress: bool = typer.Option(True, help="show a progress bar while producing"),
    ):
        """Generate synthetic ad traffic with a hidden ground-truth click model.

        Writes the clean events (Parquet, optionally JSONL), the oracle (each impression's true
        click probability) and the scenario; with --to-kafka also sends the replay stream
        (dirty injections included) to the impressions and clicks topics.
        """
        from ctrstream.config import get_settings
        from ctrstream.simulation.generator import generate, write_traffic

        if out_dir is None and not to_kafka:
            console.print("[bold red]error:[/] nothing to do: give --out DIR and/or --to-kafka")
            raise typer.Exit(2)
        settings = get_settings()
        sc = _scenario(settings, scenario, events, seed, hours, base_ctr, sets)
        with console.status(f"generating {sc.events:,} impressions ({sc.name}, seed {sc.seed})"):
            tr = generate(sc)
        out.print(_traffic_table(tr))
        if out_dir is not None:
            write_traffic(tr, out_dir, jsonl=jsonl)
            out.print(
                f"wrote {out_dir}/ (impressions, clicks, oracle"
                f"{', malformed' if tr.malformed.num_rows else ''}, scenario.json)"
            )
        if to_kafka:
            raise typer.Exit(_replay(settings, tr, None, None, progress))

    @app.command("replay")
    def replay_cmd(
        from_dir: Path = typer.Option(
            None,
            "--from",
            help="replay recorded traffic (a `ctrstream generate --out` "
            "directory) instead of generating",
        ),
        scenario: str = typer.Option(
            "steady",
            "--scenario",
            "-s",
            help="generate this scenario: steady, drift, dirty or a .json",
        ),
        events: int = typer.Option(None, "--events", "-n", help="impressions to generate [100000]"),
        seed: int = typer.Option(None, "--seed", help="random seed [0]"),
        hours: float = typer.Option(None, "--hours", help="event-time span in hours [6]"),
        base_ctr: float = typer.Option(None, "--base-ctr", help="mean true CTR [0.02]"),
        sets: list[str] = typer.Option(None, "--set", help=_SET_HELP),
        rate: float = typer.Option(
            None, "--rate", "-r", help="target records/s (default: as fast as possible)"
        ),
        time_compression: float = typer.Option(
            None,
            "--time-compression",
            "-x",
            help="event time runs N times faster than wall time (60: an hour of traffic per "
            "minute); with --rate the slower of the two wins",
        ),
        progress: bool = typer.Option(True, help="show a progress bar with the live rate"),
    ):
        """Replay generated or recorded traffic into the impressions and clicks topics.

        Keys are impression ids, record timestamps are event times, the producer is
        idempotent (acks=all). Ctrl-C stops after flushing. Exit code 1 when any record failed
        delivery (the summary says why).
        """
        from ctrstream.config import get_settings
        from ctrstream.simulation.generator import generate, read_traffic

        settings = get_settings()
        if from_dir is not None:
            if any(v is not None for v in (events, seed, hours, base_ctr)) or sets:
                console.print(
                    "[bold red]error:[/] --from replays recorded traffic as it is; "
                    "drop --events/--seed/--hours/--base-ctr/--set"
                )
                raise typer.Exit(2)
            try:
                tr = read_traffic(from_dir)
            except FileNotFoundError as e:
                console.print(f"[bold red]error:[/] {e}")
                raise typer.Exit(2) from None
        else:
            sc = _scenario(settings, scenario, events, seed, hours, base_ctr, sets)
            with console.status(
                f"generating {sc.events:,} impressions ({sc.name}, seed {sc.seed})"
            ):
                tr = generate(sc)
        out.print(_traffic_table(tr))
        raise typer.Exit(_replay(settings, tr, rate, time_compression, progress))
