"""Matplotlib for the PNGs ctrstream writes (reliability diagrams, the demo's report,
benchmark plots): the optional ``plots`` extra, headless."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` with the file-only Agg backend; a clear error without it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "writing plots needs matplotlib, which is not installed: install the project's "
            "plots extra (pip install 'ctrstream[plots]'; the train and dev extras include it)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path | str, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` and free it (pyplot keeps every open figure)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)
