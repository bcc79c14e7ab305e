"""mypy over the ctrstream namespace, whose subpackages live in the design card's folders.

``pyproject.toml`` maps ``ctrstream.streaming`` to ``streaming/`` (and ``models/``,
``serving/``, ``bench/`` likewise) with setuptools' ``package-dir``. mypy's command line
names a module by its path, so it would call ``streaming/events.py`` ``streaming.events``;
this script hands mypy every file with its namespace name instead (``BuildSource``), reads
mypy's settings from ``pyproject.toml`` as the command line does, and prints the errors
with the real file paths. Exit status: mypy's (0: clean).

    python .ci/typecheck.py            # what CI runs (`make lint`)
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from mypy import build
from mypy.find_sources import BuildSource
from mypy.main import process_options

ROOT = Path(__file__).resolve().parent.parent


def sources() -> list[BuildSource]:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    out = []
    for package, folder in sorted(mapping.items()):
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts]
            # a folder mapped on its own (ctrstream.streaming) is not walked again by its parent
            if package == "ctrstream" and parts[0] in {
                k.split(".")[1] for k in mapping if "." in k
            }:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            module = ".".join([package, *parts])
            out.append(BuildSource(str(path), module, None, base_dir=str(ROOT)))
    return out


def main() -> int:
    # mypy's own option parsing, so [tool.mypy] in pyproject.toml applies as on the command
    # line; the one source it is given is replaced by the namespace's files
    _, options = process_options(["--config-file", str(ROOT / "pyproject.toml"), "-c", "pass"])
    try:
        result = build.build(sources(), options)
        messages = result.errors
    except build.CompileError as e:
        messages = e.messages
    for line in messages:
        print(line)
    errors = sum(": error:" in m for m in messages)
    print(f"typecheck: {errors} error(s) in {len(sources())} modules", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
