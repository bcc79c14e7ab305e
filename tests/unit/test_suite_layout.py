"""The suite's own layout: pytest imports every test module by its basename (the test folders
are not packages), so two test modules of one name in different folders stop the whole run at
collection. This checks it in seconds, before the integration suite is reached."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_has_a_basename_of_its_own():
    where: dict[str, list[str]] = defaultdict(list)
    for f in TESTS.rglob("test_*.py"):
        where[f.name].append(str(f.relative_to(TESTS)))
    twice = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert len(where) > 50  # the suite was found
    assert not twice, f"rename one of each (pytest collects them as one module): {twice}"
