"""Deterministic traffic split: a salted hash of the user id picks the user's arm.

The randomization unit is the **user**: every request of a user goes to one arm for the
whole experiment, so per-user aggregates are independent across users and the analysis
(:mod:`ctrstream.experiments.stats`) treats users as the independent observations.

The hash: ``h = splitmix64(user_id XOR k(salt))`` where ``k(salt)`` is the first 8 bytes of
BLAKE2b of the salt (not Python's ``hash()``, which is randomized per process), and
splitmix64 is Steele et al.'s 64-bit finalizer (the seeding mixer of Java's
``SplittableRandom``): every input bit flips each output bit with probability ~1/2, so
consecutive ids land on independent-looking uniforms. ``u = (h >> 11) / 2**53`` is uniform
on [0, 1); the arm is the first whose cumulative weight exceeds ``u``. A different salt gives
an independent split (a new experiment does not inherit the previous one's users). The same
id, salt and weights give the same arm in every process, on every machine.
"""

from __future__ import annotations

import hashlib

import numpy as np
from numpy.typing import NDArray

from .design import Experiment

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def salt_key(salt: str) -> np.uint64:
    """The salt as a 64-bit key (BLAKE2b, stable across processes)."""
    return np.uint64(int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "big"))


def _splitmix64(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _ids_as_uint64(user_ids: np.ndarray) -> NDArray[np.uint64]:
    ids = np.asarray(user_ids)
    if ids.dtype.kind in "iu":
        return (
            ids.astype(np.int64).view(np.uint64) if ids.dtype.kind == "i" else ids.astype(np.uint64)
        )
    if ids.dtype.kind in "OUS":
        # string ids: BLAKE2b of the text (per element; the loop's ids are integers)
        return np.fromiter(
            (
                int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "big")
                for u in ids.ravel()
            ),
            dtype=np.uint64,
            count=ids.size,
        ).reshape(ids.shape)
    raise TypeError(f"user ids of dtype {ids.dtype} cannot be assigned: pass integer or string ids")


def unit_uniform(user_ids: np.ndarray, salt: str) -> NDArray[np.float64]:
    """The uniform on [0, 1) each user id hashes to under ``salt``."""
    with np.errstate(over="ignore"):
        h = _splitmix64(_ids_as_uint64(user_ids) ^ salt_key(salt))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2.0**53)


def assign(user_ids: np.ndarray, exp: Experiment) -> NDArray[np.int64]:
    """Each user's arm: an index into ``exp.deciding_arms`` (int64, the shape of the ids).

    Weights are the deciding arms' weights normalised to sum 1 (a weight of 0 gets no
    users; shadow arms are not in the split).
    """
    arms = exp.deciding_arms
    if not arms:
        raise ValueError(f"experiment {exp.name!r} has no deciding arm to assign users to")
    w = np.array([a.weight for a in arms], dtype=np.float64)
    cum = np.cumsum(w / w.sum())
    cum[-1] = 1.0  # rounding must not leave a sliver of [0, 1) unassigned
    u = unit_uniform(user_ids, exp.salt)
    return np.searchsorted(cum, u, side="right").astype(np.int64)
