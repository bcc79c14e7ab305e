"""The README's configuration examples work as written: every ``CTRSTREAM_*=...`` command in
its code blocks goes through the settings loader and ``ctrstream config show`` with each
override in effect, and every ``CTRSTREAM_*`` name it mentions is a setting (or a variable
that ``docker-compose.yml`` reads)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ctrstream.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PREFIX = "CTRSTREAM_"


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)


def _examples() -> list[tuple[dict[str, str], list[str]]]:
    """(environment overrides, command) of every code line that sets ``CTRSTREAM_*``."""
    out = []
    for block in _code_blocks(README.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            if PREFIX not in line:  # output blocks need not be shell (a quote in prose)
                continue
            words = shlex.split(line, comments=True)
            env: dict[str, str] = {}
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                k, v = words.pop(0).split("=", 1)
                env[k] = v
            if any(k.startswith(PREFIX) for k in env):
                out.append((env, words))
    return out


EXAMPLES = _examples()


def _path(name: str) -> list[str]:
    """``CTRSTREAM_TOPICS__IMPRESSIONS__PARTITIONS`` -> ``["topics", "impressions",
    "partitions"]``."""
    return name[len(PREFIX) :].lower().split("__")


def _lookup(dump: dict[str, Any], path: list[str]) -> Any:
    node: Any = dump
    for key in path:
        assert isinstance(node, dict) and key in node, f"no setting {'.'.join(path)}"
        node = node[key]
    return node


def _expected(value: str, current: Any) -> Any:
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, str) and os.sep in current and not value.startswith("/"):
        return str(Path(value).absolute())  # folders are made absolute
    return value


def test_the_readme_has_configuration_examples():
    assert EXAMPLES, "README.md has no `CTRSTREAM_*=... ctrstream ...` example"
    assert any(cmd[:3] == ["ctrstream", "config", "show"] for _, cmd in EXAMPLES)


@pytest.mark.parametrize(
    "env, command", EXAMPLES, ids=lambda x: " ".join(x) if isinstance(x, list) else None
)
def test_a_readme_example_loads_with_every_override_in_effect(monkeypatch, env, command):
    for k in list(os.environ):
        if k.startswith(PREFIX):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    dump = Settings().dump()
    for k, v in env.items():
        if k.startswith(PREFIX):
            got = _lookup(dump, _path(k))
            assert got == _expected(v, got), f"{k}={v} gave {got!r}"


@pytest.mark.parametrize(
    "env, command",
    [e for e in EXAMPLES if e[1][:3] == ["ctrstream", "config", "show"]],
    ids=lambda x: " ".join(x) if isinstance(x, list) else None,
)
def test_a_readme_config_show_runs_as_written(env, command):
    base = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    proc = subprocess.run(
        [sys.executable, "-m", "ctrstream", *command[1:]],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    dump = json.loads(proc.stdout)
    for k, v in env.items():
        if k.startswith(PREFIX):
            got = _lookup(dump, _path(k))
            assert got == _expected(v, got), f"{k}={v} shows {got!r}"


def _compose_variables() -> set[str]:
    text = (ROOT / "docker-compose.yml").read_text()
    return set(re.findall(r"\$\{(" + PREFIX + r"[A-Z0-9_]+)", text))


def test_every_setting_the_readme_names_exists():
    names = set(re.findall(PREFIX + r"[A-Z0-9_]*[A-Z0-9]", README.read_text()))
    dump = Settings().dump()
    compose = _compose_variables()
    unknown = []
    for name in sorted(names - compose):
        node: Any = dump
        for key in _path(name):
            if not isinstance(node, dict) or key not in node:
                unknown.append(name)
                break
            node = node[key]
    assert not unknown, f"README.md names settings that do not exist: {unknown}"
