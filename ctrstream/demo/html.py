"""The demo's report: a self-contained ``report.html`` (PNG plots embedded as data URIs and
also written beside it) plus the lambda architecture drawn as SVG with this run's numbers.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from ctrstream.metrics import N_BINS, reliability


def _esc(x) -> str:
    return html.escape(str(x))


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v != v:
            return "–"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def table_html(rows: list[dict], columns: list[str] | None = None, cls: str = "") -> str:
    if not rows:
        return "<p><em>no rows</em></p>"
    columns = columns or list(rows[0].keys())
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_esc(fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def img_html(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (
        f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_esc(alt)}</figcaption></figure>"
    )


# --------------------------------------------------------------------------- plots


def _plt():
    from ctrstream.plots import pyplot

    return pyplot()


def reliability_png(
    path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, bins: int = N_BINS
) -> Path:
    """Reliability diagram: mean predicted vs observed CTR per bin, for each curve (the
    equal-mass bins of ``ctrstream.metrics.reliability``, as the ECE in the tables)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=110)
    hi = 0.0
    for name, (p, y) in curves.items():
        if len(p) == 0:
            continue
        b = reliability(p, y, bins)
        mp, my = np.asarray(b["mean_pred"]), np.asarray(b["observed_ctr"])
        ax.plot(mp, my, "o-", ms=3, label=name)
        hi = max(hi, float(mp.max()), float(my.max()))
    hi = hi * 1.05 or 1.0
    ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="perfect")
    ax.set_xlim(0, hi), ax.set_ylim(0, hi)
    ax.set_xlabel("mean predicted pCTR"), ax.set_ylabel("observed CTR")
    ax.set_title(title), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(path), plt.close(fig)
    return path


def bar_png(path: Path, labels: list[str], values: list[float], title: str, ylabel: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    bars = ax.bar(labels, values, color="#4c78a8")
    for b, v in zip(bars, values):
        ax.annotate(
            fmt(v, 3),
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_title(title), ax.set_ylabel(ylabel), ax.grid(axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    fig.tight_layout(), fig.savefig(path), plt.close(fig)
    return path


def series_png(
    path: Path,
    series: dict[str, tuple[list, list]],
    title: str,
    xlabel: str,
    ylabel: str,
    vline: float | None = None,
    vlabel: str = "",
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 3.6), dpi=110)
    for name, (x, y) in series.items():
        ax.plot(x, y, "-", lw=1.4, label=name)
    if vline is not None:
        ax.axvline(vline, color="crimson", ls="--", lw=1, label=vlabel)
    ax.set_title(title), ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(path), plt.close(fig)
    return path


def lag_png(path: Path, phases: dict[str, dict]) -> Path:
    """Consumer lag over wall time, one panel per phase: ``phases`` maps a phase name to
    ``{"replay_end": s or None, "stages": {stage: (seconds, lags)}}``."""
    plt = _plt()
    names = [p for p, ser in phases.items() if ser.get("stages")]
    fig, axes = plt.subplots(
        1, max(len(names), 1), figsize=(4.2 * max(len(names), 1) + 1, 3.6), dpi=110, squeeze=False
    )
    for ax, name in zip(axes[0], names):
        ser = phases[name]
        for stage, (x, y) in ser["stages"].items():
            ax.plot(x, y, "-", lw=1.3, label=stage)
        if ser.get("replay_end") is not None:
            ax.axvline(ser["replay_end"], color="crimson", ls="--", lw=1, label="replay ended")
        ax.set_title(f"{name} phase"), ax.set_xlabel("wall seconds into the phase")
        ax.set_ylabel("lag (records)"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(path), plt.close(fig)
    return path


# --------------------------------------------------------------------------- the diagram

# approximate advance widths of Helvetica/Arial glyphs, in em (for fitting text into boxes)
_NARROW, _WIDE = set("iljtfrI.,:;'|!() -"), set("mwMW@%")


def _text_width(text: str, size: float = 12.0) -> float:
    w = 0.0
    for ch in text:
        w += 0.3 if ch in _NARROW else 0.85 if ch in _WIDE else 0.68 if ch.isupper() else 0.56
    return w * size * 1.2  # headless Chromium falls back to wider fonts (DejaVu/Liberation)


def lambda_svg(n: dict) -> str:
    """The lambda architecture with this run's numbers on it (``n`` maps names to values)."""

    def v(key):
        return fmt(n.get(key))

    fresh = (
        f"p50 {fmt(n['freshness_p50_s'], 2)} s" if n.get("freshness_p50_s") is not None else "n/a"
    )

    boxes = [
        # x, y, w, h, title, lines, colour
        (
            330,
            10,
            240,
            56,
            "Synthetic traffic + replay",
            [
                f"{v('impressions')} impressions, {v('clicks')} clicks",
                f"{v('replay_rate')} events/s into Kafka",
            ],
            "#e8eef7",
        ),
        (
            330,
            100,
            240,
            50,
            "Kafka: impressions, clicks",
            [f"key = impression id, {v('partitions')} partitions"],
            "#fdf1dc",
        ),
        (
            20,
            190,
            300,
            112,
            "SPEED LAYER (Bytewax)",
            [
                f"{v('speed_events')} events in, {v('speed_rate')} ev/s",
                f"{v('dlq')} to dlq, {v('late')} late",
                f"{v('speed_keys')} speed-view hashes in Redis",
                f"{v('labeled')} labeled examples (join)",
                f"max lag {v('speed_lag_max')} records, freshness {fresh}",
            ],
            "#e3f4e6",
        ),
        (
            580,
            190,
            300,
            112,
            "BATCH LAYER (Parquet + DuckDB)",
            [
                f"{v('archived')} records archived",
                f"{v('train_rows')} point-in-time training rows",
                f"batch view {v('batch_version')}",
                f"cut-off {v('batch_cutoff')} (event time, UTC)",
                f"deep NE {v('deep_ne')} (oracle {v('oracle_ne')})",
            ],
            "#f4e6f1",
        ),
        (
            300,
            330,
            300,
            80,
            "SERVING: lambda merge",
            [
                "closed buckets <= cut-off: batch view",
                "later buckets: speed view",
                f"Triton {v('model_name')} v{v('model_version')}",
            ],
            "#eef0f3",
        ),
        (
            20,
            450,
            300,
            80,
            n.get("scorer_title") or "Streaming scorer -> predictions",
            n.get("scorer_lines")
            or [
                f"{v('predictions')} predictions, {v('degraded')} degraded",
                f"{v('score_rate')} rows/s through Triton",
                f"max lag {v('score_lag_max')} records, done +{v('score_trail_s')} s",
            ],
            "#e3f4e6",
        ),
        (
            580,
            450,
            300,
            80,
            "River online calibration",
            [
                f"calibrated on {v('calibration_pairs')} (prediction, label) pairs",
                f"pred/obs {v('ratio_before')} -> {v('ratio_after')}",
            ],
            "#fff6d6",
        ),
        (
            300,
            560,
            300,
            80,
            "RECONCILIATION",
            [
                f"{v('rec_compared')} buckets compared, {v('rec_equal')} equal",
                f"{v('rec_differing')} differ, {v('rec_missing_speed')} missing in speed view",
                f"{v('rec_explained')} explained; batch wins",
            ],
            "#fde2e1",
        ),
    ]
    parts = [
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 900 650" '
        'font-family="Helvetica, Arial, sans-serif" font-size="12" role="img" '
        'aria-label="lambda architecture diagram">',
        '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="7" refY="4" '
        'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>',
    ]
    arrows = [
        (450, 66, 450, 100),
        (400, 150, 170, 190),
        (500, 150, 730, 190),
        (170, 302, 380, 330),
        (730, 302, 520, 330),
        (380, 410, 170, 450),
        (520, 410, 730, 450),
        (320, 490, 580, 490),
        (730, 302, 600, 575),
        (170, 302, 300, 575),
    ]
    for x1, y1, x2, y2 in arrows:
        parts.append(
            f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#555" '
            f'stroke-width="1.4" marker-end="url(#a)"/>'
        )
    for x, y, w, h, title, lines, colour in boxes:
        parts.append(
            f'<g class="box"><rect x="{x}" y="{y}" width="{w}" height="{h}" rx="8" '
            f'fill="{colour}" stroke="#666"/>'
        )
        parts.append(f'<text x="{x + 10}" y="{y + 17}" font-weight="bold">{_esc(title)}</text>')
        for i, line in enumerate(lines):
            # a line that would run past the box is set smaller to fit (never cut or spilled)
            est, fit = _text_width(line), ""
            if est > w - 20:
                size = 12.0 * (w - 20) / est
                fit = (
                    f' font-size="{size:.1f}"'
                    if size >= 8
                    else f' font-size="8" textLength="{w - 20}" lengthAdjust="spacingAndGlyphs"'
                )
            parts.append(f'<text x="{x + 10}" y="{y + 34 + 15 * i}"{fit}>{_esc(line)}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- the page

CSS = """
body{font-family:Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em 1em .5em 0} img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555} .note{background:#f7f7f2;border-left:4px solid #c9b458;
padding:.5em 1em} code,pre{background:#f5f5f5;padding:.1em .3em} pre{padding:.8em;overflow:auto}
"""


def write_report(
    out_dir: Path, sections: list[tuple[str, str, str]], title: str, subtitle: str = ""
) -> Path:
    """``sections`` = [(anchor id, heading, html body)]; writes ``out_dir/report.html``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    toc = "".join(f'<li><a href="#{a}">{_esc(h)}</a></li>' for a, h, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{_esc(h)}</h2>{b}</section>' for a, h, b in sections)
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}"
        f"</title><style>{CSS}</style></head><body><h1>{_esc(title)}</h1>"
        f"<p>{_esc(subtitle)}</p><nav><ol>{toc}</ol></nav>{body}</body></html>"
    )
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def dump_json(path: Path, obj) -> Path:
    path.write_text(
        json.dumps(obj, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )
    return path
