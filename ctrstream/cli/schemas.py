"""``ctrstream schemas write | check``: the JSON Schemas of the topics' records in ``schemas/``.

The schemas are generated from the msgspec types (``ctrstream.events.json_schemas``), never
edited by hand. ``write`` refuses a change that breaks the compatibility rule (a new
required field, a removed or retyped field, under the same ``schema_version``) unless
``--allow-breaking``; ``check`` fails when the files differ from the types (CI, and
``tests/unit/test_contracts.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def schema_changes(directory: Path) -> tuple[list[str], list[str]]:
    """(files that differ from the types or are missing, compatibility problems of the
    types against the files there)."""
    from ctrstream.events import compatibility_problems, json_schemas

    differ, problems = [], []
    for name, text in json_schemas().items():
        path = directory / name
        if not path.exists():
            differ.append(name)
            continue
        old = path.read_text()
        if old != text:
            differ.append(name)
            try:
                old_doc = json.loads(old)
            except ValueError:
                problems.append(f"{name}: not JSON")
                continue
            problems += [f"{name}: {p}" for p in compatibility_problems(old_doc, json.loads(text))]
    return differ, problems


def write_schemas(directory: Path) -> list[Path]:
    from ctrstream.events import json_schemas

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text in json_schemas().items():
        (directory / name).write_text(text)
        out.append(directory / name)
    return out


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="JSON Schemas of the topics' records (generated from the types).")
    app.add_typer(group, name="schemas")
    default_dir = typer.Option(Path("schemas"), "--dir", help="the schemas folder")

    @group.command("write")
    def write(
        directory: Path = default_dir,
        allow_breaking: bool = typer.Option(
            False, help="write even a change that needs a new schema_version"
        ),
    ):
        """Generate every topic's JSON Schema into the folder."""
        from ctrstream.cli.app import fail, out

        _, problems = schema_changes(directory)
        if problems and not allow_breaking:
            raise fail(
                "the types break the compatibility rule (schemas/README.md): "
                + "; ".join(problems)
                + ". Raise ctrstream.events.SCHEMA_VERSION for the change (consumers "
                "dead-letter records of a version they do not support), or make the new "
                "field optional with a default; --allow-breaking writes it anyway."
            )
        for path in write_schemas(directory):
            out.print(f"wrote {path}")

    @group.command("check")
    def check(directory: Path = default_dir):
        """Fail when the folder's schemas differ from the types."""
        from ctrstream.cli.app import fail, out

        differ, problems = schema_changes(directory)
        if differ:
            raise fail(
                f"{', '.join(differ)} in {directory} differ from the types: run `ctrstream "
                "schemas write`"
                + (f" (compatibility problems: {'; '.join(problems)})" if problems else ""),
                code=1,
            )
        out.print(f"{directory}: every schema matches its type")
