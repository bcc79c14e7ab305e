"""The layer rule (ARCHITECTURE.md, "Layers"): every import points down.

A module may import modules of its own unit and of units in lower layers, never of a unit
in its own layer (siblings stay independent: the speed and batch layers share only the
declarations below them) or above. Imports inside functions count as much as those at the
top of a module: a lazy import is still a dependency. The graph is read from the source
with ``ast``, over every file of the namespace (``package-dir`` in ``pyproject.toml``).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# lowest first; a unit is a module or a package (with everything under it)
LAYERS: list[tuple[str, list[str]]] = [
    (
        "declarations, codec, settings, metric maths",
        [
            "ctrstream.config",
            "ctrstream.features",
            "ctrstream.events",
            "ctrstream.metrics",
            "ctrstream.plots",
        ],
    ),
    (
        "the store (Redis layout and protocol), Kafka",
        ["ctrstream.store", "ctrstream.kafka", "ctrstream.experiments"],
    ),
    (
        "ops (stack, processes), model (nets, export, publish)",
        ["ctrstream.stack", "ctrstream.models"],
    ),
    (
        "speed layer, batch layer, calibration, decay monitoring",
        [
            "ctrstream.streaming",
            "ctrstream.batch",
            "ctrstream.calibration",
            "ctrstream.monitoring",
        ],
    ),
    ("serving, simulation", ["ctrstream.serving", "ctrstream.simulation"]),
    (
        "the closed loop (world and ad server together), the freshness study",
        ["ctrstream.loop", "ctrstream.study", "ctrstream.controller"],
    ),
    ("command line", ["ctrstream.cli"]),
    ("demo, benchmarks", ["ctrstream.demo", "ctrstream.bench"]),
    ("the console script", ["ctrstream.__main__"]),
]
# the package's own __init__ (the version) belongs to no layer and imports nothing
ROOT_PACKAGE = "ctrstream"


def namespace_files() -> dict[str, Path]:
    """Module name -> file, for every module of the namespace."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    mapped_children = {k.split(".", 1)[1] for k in mapping if "." in k}
    out = {}
    for package, folder in mapping.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if package == ROOT_PACKAGE and parts[0] in mapped_children:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def imports_of(module: str, path: Path) -> set[str]:
    """Every module ``module`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            # `from ctrstream import features`: the imported names may be modules too
            out.update(f"{name}.{a.name}" for a in node.names)
    return out


def unit_of(module: str) -> tuple[int, str] | None:
    """(layer index, unit) of a ctrstream module; None for the root package itself."""
    best = None
    for k, (_, units) in enumerate(LAYERS):
        for u in units:
            if (module == u or module.startswith(u + ".")) and (
                best is None or len(u) > len(best[1])
            ):
                best = (k, u)
    return best


def test_every_module_belongs_to_a_layer():
    homeless = [m for m in namespace_files() if m != ROOT_PACKAGE and unit_of(m) is None]
    assert not homeless, f"modules in no layer (add them to LAYERS and ARCHITECTURE.md): {homeless}"


def violations(files: dict[str, Path]) -> list[str]:
    known = set(files)
    bad = []
    for module, path in sorted(files.items()):
        mine = unit_of(module)
        for name in sorted(imports_of(module, path)):
            top = name.split(".")[0]
            if top in {"streaming", "models", "serving", "bench"}:
                bad.append(f"{module} imports {name}: outside the ctrstream namespace")
                continue
            if (
                top != ROOT_PACKAGE
                or name not in known
                and not any(k.startswith(name + ".") for k in known)
            ):
                continue  # third party, or `from pkg import name` where name is no module
            if name == ROOT_PACKAGE:
                continue
            theirs = unit_of(name)
            if mine is None:  # the root package imports nothing of ours
                bad.append(f"{module} imports {name}")
            elif theirs is None or theirs[1] == mine[1]:
                continue
            elif theirs[0] >= mine[0]:
                where = "its own layer" if theirs[0] == mine[0] else "a higher layer"
                bad.append(
                    f"{module} ({LAYERS[mine[0]][0]}) imports {name}, which is in "
                    f"{where} ({LAYERS[theirs[0]][0]})"
                )
    return bad


def test_imports_point_down():
    bad = violations(namespace_files())
    assert not bad, "imports that run up or across the layers:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source, expected",
    [
        (
            "from ctrstream.cli.app import fail\n",
            "ctrstream.store.x (the store (Redis layout and "
            "protocol), Kafka) imports ctrstream.cli.app",
        ),
        ("from ctrstream.kafka.clients import make_producer\n", "in its own layer"),
        ("import streaming.events\n", "outside the ctrstream namespace"),
    ],
)
def test_the_checker_catches_an_import_that_runs_up_or_across(tmp_path, source, expected):
    bad_module = tmp_path / "x.py"
    bad_module.write_text("def f():\n    " + source)  # a lazy import counts too
    files = {**namespace_files(), "ctrstream.store.x": bad_module}
    assert any(expected in v for v in violations(files)), violations(files)
