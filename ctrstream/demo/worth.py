"""The demo's small freshness study: what stale features and a short attribution window cost
in NE against the truth (sweeps 1 and 3 of ``ctrstream study freshness``, quick versions, on
a smaller ``freshness`` scenario), for the report's "What freshness is worth" section.

It runs in the demo's process after the live phase and needs no server: the study serves
stale features with the batch layer's point-in-time machinery (``docs/freshness.md``).
"""

from __future__ import annotations

import time
from html import escape as _esc
from pathlib import Path
from typing import Any

from ctrstream.demo.html import img_html, table_html

SWEEPS = ("staleness", "label_delay")
TITLES = {
    "staleness": "Feature staleness: features served lag behind the request",
    "label_delay": "Label delay: the join's attribution window",
}


def run_small_study(events: int, seed: int, out: Path, kind: str = "deep", log=print) -> dict:
    """Generate the ``freshness`` scenario at ``events`` impressions and run the quick
    versions of the staleness and label-delay sweeps; returns
    ``{"events", "seconds", "sweeps": {name: result}}`` with each sweep's plot under ``out``."""
    import importlib

    from ctrstream.simulation.scenarios import load_scenario
    from ctrstream.study.data import load_study_data

    t0 = time.monotonic()
    data = load_study_data(load_scenario("freshness", events=int(events), seed=int(seed)))
    results: dict[str, Any] = {}
    for name in SWEEPS:
        module = importlib.import_module(f"ctrstream.study.{name}")
        t1 = time.monotonic()
        res = module.run(data, kind=kind, seed=0, quick=True, log=log)
        res["seconds"] = round(time.monotonic() - t1, 1)
        res["plot"] = str(module.plot(res, out / f"freshness-{name.replace('_', '-')}.png"))
        results[name] = res
        log(f"{name}: {res['seconds']:.1f} s; {res.get('headline', {})}")
    return {"events": int(events), "seconds": round(time.monotonic() - t0, 1), "sweeps": results}


def _headline_html(headline: dict) -> str:
    if not headline:
        return ""
    items = "".join(
        f"<li>{_esc(k.replace('_', ' '))}: {_esc(_fmt(v))}</li>" for k, v in headline.items()
    )
    return f"<ul>{items}</ul>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def worth_html(study: dict | None) -> str:
    """The report section's body."""
    if not study:
        return (
            "<p>Not run in this demo (<code>--no-study</code>). <code>ctrstream study "
            "freshness</code> runs the full study; see docs/freshness.md.</p>"
        )
    parts = [
        f"<p>The quick versions of two of the freshness study's sweeps, on the "
        f"<code>freshness</code> scenario at {study['events']:,} impressions (three days, "
        f"the first is history; ads drift), {study['seconds']:.0f} s in all. Every NE is "
        "measured against whether the impression was clicked at all, next to the oracle's NE "
        "on the same rows. The full study (four sweeps at 2M impressions, the live check "
        "against the speed layer) is <code>ctrstream study freshness</code>; "
        "docs/freshness.md explains each curve.</p>"
    ]
    for name, res in study["sweeps"].items():
        parts.append(f"<h3>{_esc(TITLES.get(name, name))}</h3>")
        parts.append(_headline_html(res.get("headline", {})))
        parts.append(table_html(res["rows"]))
        if res.get("plot"):
            parts.append(img_html(Path(res["plot"]), TITLES.get(name, name)))
    return "".join(parts)
