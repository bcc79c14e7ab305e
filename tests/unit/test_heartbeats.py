"""Watermark heartbeats are signed control records: only the holder of the stack's control
secret can write one that a consumer accepts (``ctrstream.kafka.heartbeats``)."""

from __future__ import annotations

import stat

import msgspec
import pytest

from ctrstream.config import Settings
from ctrstream.kafka import heartbeats as HB


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(run_dir=tmp_path / "run")


@pytest.fixture
def secret(settings) -> bytes:
    HB.create_control_secret(settings)
    return HB.load_control_secret(settings)


def test_the_secret_is_created_once_owner_only_and_required(settings):
    with pytest.raises(HB.ControlSecretError, match="ctrstream stack up"):
        HB.load_control_secret(settings)
    path = HB.create_control_secret(settings)
    assert path == settings.control_secret_path == settings.run_dir / "control.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = HB.load_control_secret(settings)
    assert len(key) == HB.SECRET_BYTES
    HB.create_control_secret(settings)  # idempotent: the stack restarts with the same key
    assert HB.load_control_secret(settings) == key
    path.chmod(0o644)
    with pytest.raises(HB.ControlSecretError, match="chmod 600"):
        HB.load_control_secret(settings)
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(HB.ControlSecretError, match="32 bytes"):
        HB.load_control_secret(settings)


def test_the_secret_path_can_be_set(tmp_path):
    s = Settings(run_dir=tmp_path / "run", control_secret_file=tmp_path / "elsewhere" / "k")
    assert HB.create_control_secret(s) == tmp_path / "elsewhere" / "k"


def test_a_signed_heartbeat_is_accepted_in_its_own_partition(secret):
    key, value, headers = HB.heartbeat_record(secret, "impressions", 2, 1_700_000_000_000)
    assert value is not None and b"schema_version" not in value  # no tombstone, no event
    assert HB.is_control(key, headers)
    v = HB.verify(secret, "impressions", 2, value, headers)
    assert (v.outcome, v.time) == ("accepted", 1_700_000_000_000)


def test_unsigned_heartbeats_are_rejected(secret):
    # the null-value form older producers wrote, and the overflow that crashed the job
    for key in (b"__ctrstream_watermark__:1700000000000", b"__ctrstream_watermark__:" + b"9" * 20):
        assert HB.is_control(key, None)
        v = HB.verify(secret, "impressions", 0, None, None)
        assert (v.outcome, v.time) == ("unsigned", None)
    _, value, headers = HB.heartbeat_record(secret, "impressions", 0, 1_700_000_000_000)
    no_sig = [h for h in headers if h[0] != HB.HMAC_HEADER]
    assert HB.verify(secret, "impressions", 0, value, no_sig).outcome == "unsigned"


def test_forged_and_copied_heartbeats_fail_the_signature(secret):
    t = 1_700_000_000_000
    _, value, headers = HB.heartbeat_record(secret, "impressions", 1, t)
    other = bytes(32)
    _, fvalue, fheaders = HB.heartbeat_record(other, "impressions", 1, t)
    assert HB.verify(secret, "impressions", 1, fvalue, fheaders).outcome == "forged"
    edited = value.replace(str(t).encode(), str(t + 10**9).encode())
    assert HB.verify(secret, "impressions", 1, edited, headers).outcome == "forged"
    # a genuine heartbeat copied into another partition or topic
    assert HB.verify(secret, "impressions", 2, value, headers).outcome == "forged"
    assert HB.verify(secret, "clicks", 1, value, headers).outcome == "forged"
    assert HB.verify(secret, "impressions", 1, None, headers).outcome == "forged"
    bad_hex = [(HB.CONTROL_HEADER, b"watermark"), (HB.HMAC_HEADER, b"\xff" * 64)]
    assert HB.verify(secret, "impressions", 1, value, bad_hex).outcome == "forged"


def _signed(secret: bytes, topic: str, partition: int, value: bytes) -> list[tuple[str, bytes]]:
    return [
        (HB.CONTROL_HEADER, b"watermark"),
        (HB.HMAC_HEADER, HB.signature(secret, topic, partition, value).encode()),
    ]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"control":"watermark","topic":"impressions","partition":0,"nonce":"a"}',
        b'{"control":"watermark","topic":"impressions","partition":0,'
        b'"event_time_ms":99999999999999999999,"nonce":"a"}',
        b'{"control":"watermark","topic":"impressions","partition":0,'
        b'"event_time_ms":9007199254740993,"nonce":"a"}',
        b'{"control":"watermark","topic":"impressions","partition":0,'
        b'"event_time_ms":-5,"nonce":"a"}',
        b'{"control":"watermark","topic":"clicks","partition":0,"event_time_ms":5,"nonce":"a"}',
        b'{"control":"other","topic":"impressions","partition":0,"event_time_ms":5,"nonce":"a"}',
    ],
)
def test_malformed_signed_values_are_rejected_without_overflow(secret, body):
    v = HB.verify(secret, "impressions", 0, body, _signed(secret, "impressions", 0, body))
    assert (v.outcome, v.time) == ("malformed", None)
    assert v.reason.startswith("malformed control record")


def test_heartbeat_times_are_bounded_when_written(secret):
    for t in (0, -1, HB.MAX_EVENT_TIME_MS + 1):
        with pytest.raises(ValueError, match="outside"):
            HB.heartbeat_record(secret, "impressions", 0, t)
    _, value, _ = HB.heartbeat_record(secret, "impressions", 0, 5, nonce="n1")
    assert msgspec.json.decode(value) == {
        "control": "watermark",
        "topic": "impressions",
        "partition": 0,
        "event_time_ms": 5,
        "nonce": "n1",
    }


def test_events_are_not_control_records():
    assert not HB.is_control(b"imp-1", None)
    assert not HB.is_control(None, [("other", b"x")])
    assert HB.is_control(b"imp-1", [(HB.CONTROL_HEADER, b"watermark")])


def test_speed_commands_say_what_to_do_without_a_secret(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ctrstream.cli.app import build_app
    from ctrstream.config import get_settings

    monkeypatch.setenv("CTRSTREAM_RUN_DIR", str(tmp_path / "run"))
    get_settings.cache_clear()
    try:
        for argv in (["speed", "heartbeat", "--at-ms", "5"], ["speed", "features"]):
            res = CliRunner().invoke(build_app(), argv)
            assert res.exit_code == 2, res.output
            text = " ".join(res.output.split())  # the console wraps long lines
            assert "no control secret" in text and "ctrstream stack up" in text
    finally:
        get_settings.cache_clear()
