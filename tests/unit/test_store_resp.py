"""The generic vectorized RESP renderer of the store (``ctrstream.store.resp``), without a
server: byte for byte what hiredis' packer produces."""

from __future__ import annotations

import numpy as np


def test_vectorized_resp_rendering_matches_hiredis():
    """The features sink renders its HSET/PEXPIRE commands with numpy; byte for byte they
    must be what hiredis' packer produces, for ids and counts of every digit length."""
    import hiredis

    from ctrstream.store.resp import render

    rng = np.random.default_rng(7)
    n = 500
    a = rng.integers(0, 10 ** rng.integers(1, 18, n))
    b = rng.integers(0, 10 ** rng.integers(1, 10, n))
    c = np.concatenate([[0, 9, 10, 99, 100], rng.integers(0, 10**6, n - 5)])
    got = render(
        [
            b"*6\r\n$4\r\nHSET\r\n$",
            np.array([len(f"t:x:{i}:{j}") for i, j in zip(a, b)]),
            b"\r\nt:x:",
            a,
            b":",
            b,
            b"\r\n$",
            np.array([len(f"i{x}") for x in c]),
            b"\r\ni",
            c,
            b"\r\n$1\r\n7\r\n$",
            np.array([len(f"c{x}") for x in c]),
            b"\r\nc",
            c,
            b"\r\n$1\r\n0\r\n",
        ],
        n,
    )  # `c` twice: printed once, used twice
    want = b"".join(
        hiredis.pack_command((b"HSET", f"t:x:{i}:{j}", f"i{x}", 7, f"c{x}", 0))
        for i, j, x in zip(a.tolist(), b.tolist(), c.tolist())
    )
    assert got == want
    one = np.array([10**18 + 7])  # widest int64 magnitudes take the 64-bit path
    assert render([b"x", one, b"y", np.array([0])], 1) == b"x%dy0" % (10**18 + 7)
    assert render([b"x", np.zeros(0, np.int64)], 0) == b""
