"""The store's calibration persistence without a server: states are data (MessagePack of
msgspec structs), a foreign value is refused with the key and the way out and never run."""

from __future__ import annotations

import json
import math
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import msgspec
import numpy as np
import pytest

from ctrstream.calibration.calibrator import VersionCalibrator
from ctrstream.calibration.job import JOB_CODEC, LEARNER_CODEC, JoinState
from ctrstream.calibration.state import STATE_FORMAT
from ctrstream.store import layout as L
from ctrstream.store.calibration import (
    CalibrationStateError,
    CalibrationStore,
    dumps,
    encode_state,
)


class _FakeRedis:
    """The two reads :meth:`CalibrationStore.resume` does."""

    def __init__(self, strings: dict[str, bytes], versions: set[bytes]):
        self.strings = strings
        self.versions = versions

    def get(self, key: str) -> bytes | None:
        return self.strings.get(key)

    def smembers(self, key: str) -> set[bytes]:
        assert key == L.CAL_VERSIONS_KEY
        return self.versions


def _resume(strings: dict[str, bytes], versions: set[bytes], job: str = "j"):
    return CalibrationStore(_FakeRedis(strings, versions)).resume(job, JOB_CODEC, LEARNER_CODEC)


def _learned(mv: str = "m1", n: int = 3000) -> VersionCalibrator:
    vc = VersionCalibrator(mv)
    rng = np.random.default_rng(4)
    p = 1 / (1 + np.exp(-rng.normal(-3, 0.8, n)))
    vc.learn_many(p, (rng.random(n) < p).astype(float))
    return vc


def test_resume_loads_the_job_and_every_version():
    vc = _learned()
    job = JoinState(
        preds=OrderedDict([("i2", ("m1", 0.25, 7)), ("i1", ("m1", 0.5, 3))]),
        labels=OrderedDict([("i3", (1, 9, 2, "tablet"))]),
        done=OrderedDict.fromkeys(["i0"]),
        pred_watermark=7,
        label_watermark=9,
        offsets={("predictions", 0): 5, ("labeled", 3): 11},
    )
    found = _resume(
        {
            L.cal_job_key("j"): encode_state(job.to_state()),
            L.cal_state_key("m1"): encode_state(vc.to_state()),
        },
        {b"m1", b"m2"},
    )
    assert found.job_state == job  # order kept: expiry evicts the oldest first
    assert list(found.job_state.preds) == ["i2", "i1"]
    assert list(found.versions) == ["m1"]  # m2 has no state: nothing to resume
    assert found.versions["m1"].params() == vc.params()
    assert found.versions["m1"].metrics() == vc.metrics()
    assert _resume({}, set(), "new").job_state is None


def _state_dict(vc: VersionCalibrator) -> dict:
    return msgspec.to_builtins(vc.to_state())


def _with(d: dict, **changes) -> bytes:
    return msgspec.msgpack.encode({**d, **changes})


def _bad_adwin(d: dict) -> bytes:
    adwin = dict(d["adwin"], width=d["adwin"]["width"] + 1)
    return _with(d, adwin=adwin)


@pytest.mark.parametrize(
    "make_blob, why",
    [
        (lambda d: b"not a state", "not a ctrstream state"),
        (lambda d: pickle.dumps(VersionCalibrator("m1")), "not a ctrstream state"),
        (lambda d: json.dumps(d).encode(), "not a ctrstream state"),
        (lambda d: _with(d, state_format=STATE_FORMAT - 1), "written by another version"),
        (lambda d: _with(d, kind="ctrstream.calibration.job"), "not 'ctrstream.calibration"),
        (lambda d: _with(d, n_seen="many"), "Expected `int`, got `str` - at `$.n_seen`"),
        (lambda d: _with(d, iso_n=[1.0]), "1 and 48 isotonic sums for 48 bins"),
        (lambda d: _with(d, rolling={**d["rolling"], "y": []}), "rolling windows of lengths"),
        (lambda d: _with(d, evil=1), "unknown field `evil`"),
        (_bad_adwin, "ADWIN's window of width"),
    ],
)
def test_a_state_that_cannot_be_loaded_says_which_key_and_what_to_do(make_blob, why):
    blob = make_blob(_state_dict(_learned()))
    with pytest.raises(CalibrationStateError) as e:
        _resume({L.cal_state_key("m1"): blob}, {b"m1"})
    msg = str(e.value)
    assert "model version 'm1'" in msg and repr(L.cal_state_key("m1")) in msg and why in msg
    assert "--job-name" in msg and f"DEL {L.cal_state_key('m1')}" in msg


class _Payload:
    """What an attacker writes with a plain SET: unpickling it creates a file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


@pytest.mark.parametrize("key", ["job", "learner"])
def test_a_malicious_pickle_at_a_state_key_is_refused_and_runs_nothing(tmp_path, key):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Payload(marker))
    pickle.loads(blob)  # the payload is live: unpickling it does create the marker
    assert marker.is_dir()
    marker.rmdir()
    strings = {L.cal_job_key("j") if key == "job" else L.cal_state_key("m1"): blob}
    with pytest.raises(CalibrationStateError, match="not a ctrstream state.*Nothing in it was run"):
        _resume(strings, {b"m1"})
    assert not marker.exists()


def test_json_values_write_nan_as_null():
    assert json.loads(dumps({"auc": math.nan, "x": [1.0, math.inf], "n": 3})) == {
        "auc": None,
        "x": [1.0, None],
        "n": 3,
    }
