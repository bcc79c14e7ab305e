"""``ctrstream train`` and ``ctrstream publish`` against a real Triton, and the quality
benchmark that runs what ``ctrstream train`` runs."""

from __future__ import annotations

import json

import pytest


def test_cli_trains_on_a_scenario_and_publishes_to_triton(
    stack_env, settings, tmp_path, monkeypatch
):
    import typer
    from typer.testing import CliRunner

    from ctrstream.cli import train as train_cli
    from ctrstream.config import get_settings
    from ctrstream.models.publish import loaded_versions

    for k, v in stack_env.items():
        if k.startswith("CTRSTREAM_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("CTRSTREAM_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        app = typer.Typer()
        train_cli.register(app)
        runner = CliRunner()
        r = runner.invoke(
            app, ["train", "--scenario", "steady", "--events", "6000", "--epochs", "1"]
        )
        assert r.exit_code == 0, r.output
        run = train_cli.latest_run(get_settings())
        assert (run / "deep" / "model.onnx").exists() and (run / "lr" / "model.onnx").exists()
        ev = json.loads((run / "evaluation.json").read_text())
        assert set(ev) == {"deep", "lr"}
        for kind in ev:  # both evaluated against the generator's oracle on the same rows
            assert ev[kind]["oracle"]["ne"] < 1.0 and ev[kind]["n"] == ev["lr"]["n"] > 0
        r = runner.invoke(app, ["publish", "--model", "lr"])
        assert r.exit_code == 0, r.output
        import tritonclient.grpc as grpcclient

        c = grpcclient.InferenceServerClient(settings.triton.grpc_url)
        from ctrstream.models.publish import versions_on_disk

        newest = versions_on_disk(settings.triton.model_repository / "ctr_lr_py")[-1]
        assert loaded_versions(c, "ctr_lr_py") == [newest]
        assert f"version {newest}" in r.output
        c.close()
    finally:
        get_settings.cache_clear()


def test_quality_benchmark_reports_the_gap_of_both_models_to_the_oracle(settings, tmp_path, capsys):
    """``ctrstream bench quality`` (the NE target's measurement) on a small scenario: its gaps
    are the models' NE relative to the oracle's on the same validation rows, and its verdict
    follows them."""
    from ctrstream.bench.quality import TARGET_GAP, main

    assert main(["--events", "60000", "--seeds", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "quality.json").read_text())
    (row,) = doc["rows"]
    assert row["events"] == 60_000 and row["seed"] == 1 and row["val_rows"] > 0
    assert row["oracle_ne"] < min(row["lr_ne"], row["deep_ne"])
    for kind in ("lr", "deep"):
        assert row[f"{kind}_gap_pct"] == pytest.approx(
            100 * (row[f"{kind}_ne"] / row["oracle_ne"] - 1)
        )
    assert row["target_met"] == (
        row["deep_gap_pct"] <= 100 * TARGET_GAP and row["deep_ne"] < row["lr_ne"]
    )
    assert doc["meta"]["summary"][0]["met (deep <= 3 %, < LR)"] == f"{int(row['target_met'])}/1"
    assert "by data volume" in capsys.readouterr().out
