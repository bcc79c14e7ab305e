"""Triton's start-up arguments (no server): the control key, its flags, the served record.
The server's side: tests/integration/test_triton_recovery.py."""

from __future__ import annotations

import json
import stat

import pytest
from pydantic import SecretStr

from ctrstream.config import Settings, TritonSettings, triton_control_headers
from ctrstream.stack.services import (
    StackError,
    ensure_triton_control_key,
    served_models,
    triton_control_flags,
)


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    monkeypatch.delenv("CTRSTREAM_TRITON__CONTROL_KEY", raising=False)
    return Settings(
        run_dir=tmp_path / "run",
        triton=TritonSettings(model_repository=tmp_path / "repo"),
    )


def test_the_key_is_generated_once_owner_only(settings):
    key = ensure_triton_control_key(settings)
    path = settings.run_dir / "triton-control.key"
    assert len(key) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_triton_control_key(settings) == key  # the next start keeps it
    assert triton_control_headers(settings, "http") == {"ctrstream-control-key": key}
    assert triton_control_headers(settings, "grpc") == {
        "triton-grpc-protocol-ctrstream-control-key": key
    }


def test_a_configured_key_wins_and_no_file_is_written(settings):
    s = settings.model_copy(
        update={"triton": settings.triton.model_copy(update={"control_key": SecretStr("k-1")})}
    )
    assert ensure_triton_control_key(s) == "k-1"
    assert not (settings.run_dir / "triton-control.key").exists()
    assert triton_control_flags("k-1") == [
        "--http-restricted-api=model-repository:ctrstream-control-key=k-1",
        "--grpc-restricted-protocol=model-repository:ctrstream-control-key=k-1",
    ]
    with pytest.raises(StackError, match="CONTROL_KEY"):
        triton_control_flags("a key;rm -rf")


def test_served_models_are_the_recorded_ones_present_in_the_repository(settings):
    repo = settings.triton.model_repository
    assert served_models(settings) == []  # no record: nothing to load
    for name in ("ctr_deep_py", "ctr_lr_py"):
        (repo / name).mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text("")
    record = {
        "models": {
            "ctr_deep_py": {"versions": [3]},
            "ctr_lr_py": {"versions": [2]},
            "gone_py": {"versions": [1]},  # its folder was removed
            "../etc": {"versions": [1]},  # never a path
        }
    }
    settings.triton.served_record.write_text(json.dumps(record))
    assert served_models(settings) == ["ctr_deep_py", "ctr_lr_py"]
    settings.triton.served_record.write_text("{not json")
    assert served_models(settings) == []  # an unreadable record loads nothing


def test_the_served_record_keeps_pins_and_refuses_a_malformed_one(settings):
    from ctrstream.models.publish import (
        PublishError,
        pinned_versions,
        read_served,
        record_served,
        unpin,
    )

    assert read_served(settings) == {"models": {}, "pins": {}}
    record = {"models": {"m_py": {"versions": [1, 3]}}, "pins": {"m_py": {"exp-a": [1]}}}
    settings.triton.served_record.parent.mkdir(parents=True, exist_ok=True)
    settings.triton.served_record.write_text(json.dumps(record))
    record_served(settings, "m_py", "m", [1, 4])  # a publish keeps the pins as they are
    assert pinned_versions(settings, "m_py") == {"exp-a": [1]}
    assert read_served(settings)["models"]["m_py"]["versions"] == [1, 4]
    assert unpin(settings, "exp-a") == {"m_py": [1]}
    assert read_served(settings)["pins"] == {}
    for bad in ("{not json", '{"models": {}, "pins": {"m_py": {"exp": "1"}}}', "[]"):
        settings.triton.served_record.write_text(bad)
        with pytest.raises(PublishError, match="not a served record"):
            read_served(settings)
