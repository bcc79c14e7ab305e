"""The store's calibration persistence without a server: what a bad state says, JSON."""

from __future__ import annotations

import json
import math
import pickle

import pytest

from ctrstream.calibration.calibrator import VersionCalibrator
from ctrstream.store import layout as L
from ctrstream.store.calibration import CalibrationStateError, CalibrationStore, dumps


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


def test_resume_loads_the_job_and_every_version():
    vc = VersionCalibrator("m1")
    fake = _FakeRedis(
        {
            L.cal_job_key("j"): pickle.dumps({"offsets": {}}),
            L.cal_state_key("m1"): pickle.dumps(vc),
        },
        {b"m1", b"m2"},
    )
    found = CalibrationStore(fake).resume("j")
    assert found.job_state == {"offsets": {}}
    assert list(found.versions) == ["m1"]  # m2 has no state: nothing to resume
    assert found.versions["m1"].params() == vc.params()
    assert CalibrationStore(_FakeRedis({}, set())).resume("new").job_state is None


@pytest.mark.parametrize(
    "blob, why",
    [
        (b"not a pickle", "UnpicklingError"),
        (
            pickle.dumps(VersionCalibrator("m1")).replace(b"state_format", b"state_formax"),
            "written by another version of ctrstream",
        ),
    ],
)
def test_a_state_that_cannot_be_loaded_says_which_key_and_what_to_do(blob, why):
    fake = _FakeRedis({L.cal_state_key("m1"): blob}, {b"m1"})
    with pytest.raises(CalibrationStateError) as e:
        CalibrationStore(fake).resume("j")
    msg = str(e.value)
    assert "model version 'm1'" in msg and repr(L.cal_state_key("m1")) in msg and why in msg
    assert "--job-name" in msg and f"DEL {L.cal_state_key('m1')}" in msg


def test_json_values_write_nan_as_null():
    assert json.loads(dumps({"auc": math.nan, "x": [1.0, math.inf], "n": 3})) == {
        "auc": None,
        "x": [1.0, None],
        "n": 3,
    }
