"""What freshness is worth: the served model's quality against the truth as features, models,
labels and predictions age (``ctrstream study freshness``; docs/freshness.md).

One scenario with recency effects and drift (``freshness``: three days, the first is history)
is generated once, with its true click probabilities; then each sweep of ``ctrstream.study``
measures NE and AUC next to the oracle's on the same rows:

* ``staleness``       - features served ``lag`` behind (0 .. 1 h, and the batch view alone),
                        trained fresh and served stale, or trained and served at one lag;
* ``model_age``       - a model evaluated hours to days after its training data ends, against
                        retraining at each cadence and continuous (online) training;
* ``label_delay``     - the join's attribution window: clicks lost, the training CTR's bias,
                        NE raw and after online calibration;
* ``batch_inference`` - predictions precomputed every N hours into Redis against online
                        scoring: quality lost, coverage, compute and read latency;
* ``live``            - one point of the staleness curve checked against the real speed layer
                        (Kafka -> Bytewax -> Redis) at its measured freshness.

``batch_inference`` needs a Redis and ``live`` a Kafka + Redis stack: by default the study
starts its own on free loopback ports and stops them by PID (``--no-isolated`` uses the
running ``ctrstream stack up`` instead: both sweeps write to it - the live check flushes its
own Redis database, batch inference switches the batch-view pointer of its Redis - so never
point them at a stack that serves anything).

Results: a table per sweep on stdout, ``bench/results/freshness.json`` (every sweep's rows,
parameters, headline numbers, timings, peak RSS) and ``freshness-<sweep>.png``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ctrstream.bench.common import print_table, results_dir, rss_kb, write_results

SWEEPS = ("staleness", "model_age", "label_delay", "batch_inference", "live")
NEEDS_REDIS = {"batch_inference"}
NEEDS_STACK = {"live"}


def _peak_rss_gb() -> float:
    return rss_kb(os.getpid()) / 1e6


def _sweeps(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SWEEPS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown sweep(s) {unknown or text!r}: choose from {', '.join(SWEEPS)}"
        )
    return names


def run_sweeps(
    data: Any,
    sweeps: list[str],
    *,
    kind: str = "deep",
    seed: int = 0,
    quick: bool = False,
    settings: Any = None,
    log=print,
    plot_dir: Path | None = None,
    plot_prefix: str = "freshness",
) -> dict[str, dict]:
    """Run ``sweeps`` on ``data`` (``ctrstream.study.data.StudyData``); returns each sweep's
    result (the sweep contract's dict) with its ``seconds`` and, when ``plot_dir`` is given,
    the path of its ``plot``. ``settings``: a running stack (Redis for ``batch_inference``,
    Kafka + Redis for ``live``)."""
    out: dict[str, dict] = {}
    for name in sweeps:
        module = importlib.import_module(f"ctrstream.study.{name}")
        extra: dict[str, Any] = {}
        if name in NEEDS_REDIS | NEEDS_STACK:
            if settings is None:
                raise RuntimeError(
                    f"the {name} sweep needs a running stack: drop --no-isolated (the study "
                    "then starts its own), or start one with `ctrstream stack up`"
                )
            # batch inference takes the Redis to precompute into; the live check the stack
            extra["redis" if name in NEEDS_REDIS else "settings"] = settings
        log(f"--- {name} ...")
        t0 = time.perf_counter()
        res = module.run(data, kind=kind, seed=seed, quick=quick, log=log, **extra)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        if plot_dir is not None and hasattr(module, "plot"):
            path = Path(plot_dir) / f"{plot_prefix}-{name.replace('_', '-')}.png"
            res["plot"] = str(module.plot(res, path))
        out[name] = res
        log(f"--- {name}: {res['seconds']:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ctrstream study freshness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--scenario", default="freshness", help="scenario preset or JSON file")
    ap.add_argument("--events", type=int, default=None, help="impressions (default: the preset's)")
    ap.add_argument("--scenario-seed", type=int, default=0)
    ap.add_argument("--kind", default="deep", choices=("deep", "lr"), help="the served model")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument(
        "--sweeps",
        type=_sweeps,
        default=list(SWEEPS),
        help=f"comma-separated, from {', '.join(SWEEPS)} (default: all)",
    )
    ap.add_argument("--quick", action="store_true", help="the small versions (the demo's)")
    ap.add_argument(
        "--no-isolated",
        dest="isolated",
        action="store_false",
        help="use the running stack (`ctrstream stack up`) instead of starting one",
    )
    ap.add_argument("--name", default="freshness", help="results file name (NAME.json)")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    if args.events is not None and args.events < 10_000:
        ap.error("--events must be at least 10,000 impressions")

    from ctrstream.simulation.scenarios import load_scenario
    from ctrstream.study.data import load_study_data

    out_dir = Path(args.out) if args.out else results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = {"seed": args.scenario_seed}
    if args.events is not None:
        overrides["events"] = args.events
    try:
        scenario = load_scenario(args.scenario, **overrides)
    except ValueError as e:
        ap.error(str(e))
    t_start = time.perf_counter()
    print(f"generating {scenario.events:,} impressions over {scenario.hours:g} h ...", flush=True)
    data = load_study_data(scenario)
    load_s = time.perf_counter() - t_start

    with ExitStack() as stack:
        settings = None
        if set(args.sweeps) & (NEEDS_REDIS | NEEDS_STACK):
            if args.isolated:  # Kafka + Redis on free loopback ports, stopped by PID
                from ctrstream.study.live import isolated_stack

                settings = stack.enter_context(isolated_stack(log=print))
            else:
                from ctrstream.config import get_settings

                settings = get_settings()
        results = run_sweeps(
            data,
            args.sweeps,
            kind=args.kind,
            seed=args.seed,
            quick=args.quick,
            settings=settings,
            log=lambda *a: print(*a, flush=True),
            plot_dir=out_dir,
            plot_prefix=args.name,
        )

    rows: list[dict] = []
    for name, res in results.items():
        print_table(f"freshness: {name}", res["rows"])
        if res.get("headline"):
            print(f"{name} headline: {res['headline']}")
        rows += [{"sweep": name, **r} for r in res["rows"]]
    meta = dict(
        scenario=scenario.to_dict(),
        kind=args.kind,
        seed=args.seed,
        quick=args.quick,
        rows=data.n,
        load_seconds=round(load_s, 1),
        total_seconds=round(time.perf_counter() - t_start, 1),
        peak_rss_gb=round(_peak_rss_gb(), 2),
        sweeps={
            name: {k: v for k, v in res.items() if k != "rows"} for name, res in results.items()
        },
    )
    path = write_results(args.name, rows, meta, out_dir)
    print(f"wrote {path} ({meta['total_seconds']:.0f} s, peak RSS {meta['peak_rss_gb']:.1f} GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
