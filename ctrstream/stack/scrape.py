"""Reading the jobs' Prometheus endpoints: how the demo and the benchmarks know what each
job has done."""

from __future__ import annotations

import urllib.request


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """Sum of every sample of every metric (by sample name) at a Prometheus endpoint, and
    per label value too (``name{side=pred}``)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
            for k, v in s.labels.items():
                key = f"{s.name}{{{k}={v}}}"
                out[key] = out.get(key, 0.0) + float(s.value)
    return out


def scrape_or_empty(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """:func:`scrape`, or nothing when the endpoint does not answer (not up yet, busy)."""
    try:
        return scrape(port, host)
    except OSError:
        return {}


def scrape_text(port: int, host: str = "127.0.0.1") -> str | None:
    """A Prometheus endpoint's text (None: it does not answer, e.g. not up yet)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def scrape_value(port: int, sample: str, host: str = "127.0.0.1") -> float | None:
    """One unlabelled sample of a Prometheus endpoint, read without the full parser (called
    often); None when the endpoint does not answer or has no such sample."""
    text = scrape_text(port, host)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None
