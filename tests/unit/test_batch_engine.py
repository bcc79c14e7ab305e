"""The batch engine's choice (``--engine``, the ``batch_engine`` setting) and the Spark
engine's Arrow helpers: no Spark session needed (the engine's equality with DuckDB is
``tests/integration/test_spark_engine.py``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ctrstream.batch import spark_engine as S


def test_engine_choice(monkeypatch):
    """--engine wins over the setting; the setting is CTRSTREAM_BATCH_ENGINE."""
    from ctrstream.config import Settings

    monkeypatch.delenv("CTRSTREAM_BATCH_ENGINE", raising=False)
    assert Settings().batch_engine == "duckdb"
    assert S.resolve_engine(None, Settings().batch_engine) == "duckdb"
    monkeypatch.setenv("CTRSTREAM_BATCH_ENGINE", "spark")
    assert S.resolve_engine(None, Settings().batch_engine) == "spark"
    assert S.resolve_engine("DuckDB", "spark") == "duckdb"
    with pytest.raises(ValueError, match="choose one of duckdb, spark"):
        S.resolve_engine("polars")


def test_arrow_lists_roundtrip():
    """The list columns the executors build hold rows of the declared widths."""
    flat = np.arange(6, dtype=np.int64)
    arr = S._lists(flat, 2, pa.int64())
    assert arr.to_pylist() == [[0, 1, 2], [3, 4, 5]]


def test_train_rejects_an_unknown_engine(monkeypatch, tmp_path):
    """`ctrstream train --engine` names the choices before any data is built."""
    from typer.testing import CliRunner

    from ctrstream.cli.app import build_app

    monkeypatch.setenv("CTRSTREAM_DATA_DIR", str(tmp_path))
    res = CliRunner().invoke(build_app(), ["train", "--engine", "polars"])
    assert res.exit_code == 2
    assert "unknown batch engine 'polars'" in res.output
    assert "duckdb, spark" in res.output


def test_spark_missing_says_how_to_install(monkeypatch):
    """Without pyspark the engine says which extra to install (and the other engine)."""
    import sys

    monkeypatch.setitem(sys.modules, "pyspark.sql", None)  # import pyspark.sql fails
    with pytest.raises(S.SparkUnavailable, match=r"pip install -e '\.\[spark\]'"):
        S.spark_session()


def test_point_in_time_counts_of_some_entities():
    """The Spark engine's per-partition count: ``entities=`` counts those entities exactly
    as the full count does and leaves the others zero."""
    from batch_traffic import make_traffic

    from ctrstream import features as F
    from ctrstream.batch.point_in_time import point_in_time_counts

    imps, clks = make_traffic(n_imps=300, seed=5)
    full = point_in_time_counts(imps, clks, imps)
    assert full.sum() > 0
    some = point_in_time_counts(imps, clks, imps, entities=(1, len(F.ENTITIES) - 1))
    np.testing.assert_array_equal(some[:, [1, -1]], full[:, [1, -1]])
    others = [k for k in range(len(F.ENTITIES)) if k not in (1, len(F.ENTITIES) - 1)]
    assert not some[:, others].any()
