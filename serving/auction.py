"""The auction: which candidates of each ad request are shown, in which slot, at what price.

Pure numpy, vectorized over requests: the candidates of ``n`` requests (``cand_offsets``:
request ``i``'s are ``[off[i], off[i+1])``) are padded to an ``(n, max candidates)`` matrix
(padding and non-qualifying candidates score ``-inf``), so there is no Python loop over
requests or candidates.

Rules (one request):

* **rank** by ``bid * pctr0`` - the expected value per impression at the reference position
  (``pctr0``: the calibrated pCTR with position 0); ties keep the candidate order;
* **qualify** above the reserve: ``bid >= reserve_cpc`` and ``bid * pctr0 * 1000 >=
  reserve_ecpm``, and ``pctr0 > 0`` (no expected value, no impression);
* **fill** the first ``min(n_slots, qualifying)`` ranks (``filled``; the rest stay empty);
* **price** (generalized second price with a reserve): the winner at rank ``r`` pays
  ``max(reserve_cpc, score[r+1] / pctr0_r, reserve_ecpm / 1000 / pctr0_r)`` per click, capped
  at its bid, where ``score[r+1]`` is the next *qualifying* candidate's ``bid * pctr0`` (0 when
  there is none: the last winner then pays the reserve). So ``price * pctr0 <= bid * pctr0``
  and a winner never pays more than it bid.

**Exploration** (requests with ``explore``): the winners' order over the slots is a uniform
random permutation (each winner in each of the ``m`` filled slots with probability ``1/m``),
and with probability ``new_ad_explore_share`` one slot goes to a new candidate
(``cand_new``) drawn uniformly among the request's new, non-winning candidates that meet the
bid reserve (``bid >= reserve_cpc``; the eCPM reserve is waived: a new ad's pCTR is what
exploration is there to learn). The new ad is added to the winners when a slot is free and
otherwise replaces the lowest-ranked winner; it pays ``max(reserve_cpc, reserve_ecpm / 1000 /
pctr0)`` capped at its bid. ``propensity`` is the probability of that candidate in that slot
*given the request's exploration branch* (1 for a request that is not explored; ``1/m`` for a
permuted winner; ``1 / (new candidates * m)`` for the new ad, flagged ``new_ad``): the
exploration draw itself (``explore``, e.g. ``u < explore_share``) is logged as ``explored``.

Determinism: every random choice reads the pre-drawn uniforms ``rng_u`` (``(n, N_UNIFORMS)``,
columns ``U_*``), so a request's result is a function of its inputs and its uniforms
(:func:`request_uniforms` derives them from the request id).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

# columns of the pre-drawn uniforms of each request
U_EXPLORE = 0  # explore this request when u < explore_share (explore_mask)
U_NEW = 1  # exploration: give one slot to a new ad when u < new_ad_explore_share
U_NEW_PICK = 2  # which new candidate
U_PERM = 3  # U_PERM .. U_PERM + max_slots - 1: the permutation keys of the slots
DEFAULT_MAX_SLOTS = 8


def n_uniforms(max_slots: int = DEFAULT_MAX_SLOTS) -> int:
    """Columns of ``rng_u`` that :func:`auction` reads for requests of at most ``max_slots``."""
    return U_PERM + max_slots


@dataclass(frozen=True)
class AuctionConfig:
    """The auction's parameters (reserve prices per click and per thousand impressions)."""

    reserve_cpc: float = 0.0
    reserve_ecpm: float = 0.0
    explore_share: float = 0.05  # of requests, explored (explore_mask)
    new_ad_explore_share: float = 0.5  # of explored requests, the share that show a new ad

    def __post_init__(self) -> None:
        for name in ("reserve_cpc", "reserve_ecpm"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"AuctionConfig.{name} must be a finite number >= 0, not {v!r}")
        for name in ("explore_share", "new_ad_explore_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"AuctionConfig.{name} must be in [0, 1], not {v!r}")


@dataclass
class AuctionResult:
    """The shown impressions (sorted by request, then slot) and per-request fill."""

    request_index: np.ndarray  # int64 (k,) index of the request
    candidate_index: np.ndarray  # int64 (k,) global index into the cand_* arrays
    slot: np.ndarray  # int64 (k,) 0 = top
    price: np.ndarray  # float64 (k,) cost per click
    rank_score: np.ndarray  # float64 (k,) bid * pctr0
    pctr0: np.ndarray  # float64 (k,) the pCTR at the reference position it was ranked by
    propensity: np.ndarray  # float64 (k,) P(this candidate in this slot | branch)
    explored: np.ndarray  # bool (k,) the request was explored
    new_ad: np.ndarray  # bool (k,) shown by new-ad exploration
    filled: np.ndarray  # int64 (n,) slots filled per request
    qualified: np.ndarray  # int64 (n,) candidates above the reserve per request

    def __len__(self) -> int:
        return len(self.request_index)


def explore_mask(rng_u: np.ndarray, cfg: AuctionConfig) -> np.ndarray:
    """Which requests are explored: ``rng_u[:, U_EXPLORE] < cfg.explore_share``."""
    return np.asarray(rng_u)[:, U_EXPLORE] < cfg.explore_share


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def request_uniforms(
    request_ids: np.ndarray | list[str], seed: int = 0, n: int | None = None
) -> np.ndarray:
    """``(len(request_ids), n)`` uniforms in [0, 1), a pure function of (seed, request id):
    the same request draws the same exploration whatever batch it lands in."""
    n = n_uniforms() if n is None else n
    ids = [str(r) for r in np.asarray(request_ids, dtype=object).tolist()]
    salt = str(int(seed)).encode() + b"\x00"
    base = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(salt + r.encode(), digest_size=8).digest(), "little")
            for r in ids
        ),
        dtype=np.uint64,
        count=len(ids),
    )
    with np.errstate(over="ignore"):
        x = base[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None, :] * np.uint64(
            0xD1B54A32D192ED03
        )
    return (_splitmix64(x) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _check(
    cand_offsets: np.ndarray,
    bid: np.ndarray,
    pctr0: np.ndarray,
    n_slots: np.ndarray,
    explore: np.ndarray,
    rng_u: np.ndarray,
    cand_new: np.ndarray | None,
) -> None:
    n = len(n_slots)
    if cand_offsets.shape != (n + 1,) or cand_offsets[0] != 0:
        raise ValueError(
            f"cand_offsets must have len(n_slots) + 1 = {n + 1} entries starting at 0, "
            f"not shape {cand_offsets.shape}"
        )
    if np.any(np.diff(cand_offsets) < 0):
        raise ValueError("cand_offsets must be non-decreasing")
    total = int(cand_offsets[-1])
    for name, a in (("bid", bid), ("pctr0", pctr0)):
        if a.shape != (total,):
            raise ValueError(f"{name} must have one value per candidate ({total}), not {a.shape}")
    if cand_new is not None and np.asarray(cand_new).shape != (total,):
        raise ValueError(f"cand_new must have one value per candidate ({total})")
    if explore.shape != (n,):
        raise ValueError(f"explore must have one value per request ({n}), not {explore.shape}")
    if np.any(n_slots < 0):
        raise ValueError("n_slots must be >= 0")
    need = U_PERM + (int(n_slots.max()) if n else 0)
    if rng_u.ndim != 2 or rng_u.shape[0] != n or rng_u.shape[1] < need:
        raise ValueError(
            f"rng_u must be ({n}, >= {need}) uniforms (n_uniforms(max_slots)), not {rng_u.shape}"
        )


def auction(
    cand_offsets: np.ndarray,
    bid: np.ndarray,
    pctr0: np.ndarray,
    n_slots: np.ndarray,
    explore: np.ndarray,
    rng_u: np.ndarray,
    cfg: AuctionConfig,
    cand_new: np.ndarray | None = None,
) -> AuctionResult:
    """Run the auction of every request at once (rules: the module docstring)."""
    off = np.asarray(cand_offsets, dtype=np.int64)
    bid = np.asarray(bid, dtype=np.float64)
    pctr0 = np.asarray(pctr0, dtype=np.float64)
    n_slots = np.asarray(n_slots, dtype=np.int64)
    explore = np.asarray(explore, dtype=bool)
    rng_u = np.asarray(rng_u, dtype=np.float64)
    _check(off, bid, pctr0, n_slots, explore, rng_u, cand_new)
    n = len(n_slots)
    counts = np.diff(off)
    m_cand = int(counts.max()) if n else 0
    s_max = int(n_slots.max()) if n else 0
    rows = np.arange(n)
    row_of = np.repeat(rows, counts)
    col_of = np.arange(int(off[-1]), dtype=np.int64) - off[row_of]

    # (n, M) matrices; M >= s_max + 1 so that the rank after the last slot always exists
    width = max(m_cand, s_max + 1)
    ev = bid * pctr0
    qual = (
        (bid >= cfg.reserve_cpc) & (ev * 1000.0 >= cfg.reserve_ecpm) & (pctr0 > 0) & np.isfinite(ev)
    )
    score = np.full((n, width), -np.inf)
    score[row_of, col_of] = np.where(qual, ev, -np.inf)
    order = np.argsort(-score, axis=1, kind="stable")[:, : s_max + 1]
    top = np.take_along_axis(score, order, axis=1)  # (n, s_max + 1) descending
    qualified = np.isfinite(score).sum(axis=1)
    filled = np.minimum(n_slots, qualified)
    rank = np.arange(s_max, dtype=np.int64)[None, :]
    win = rank < filled[:, None]  # (n, s_max)
    gidx = off[:-1, None] + order[:, :s_max]  # global candidate index per rank
    gidx = np.where(win, gidx, 0)

    w_pctr = np.where(win, pctr0[gidx] if len(pctr0) else 0.0, 1.0)
    w_bid = np.where(win, bid[gidx] if len(bid) else 0.0, 0.0)
    nxt = top[:, 1 : s_max + 1]
    nxt = np.where(np.isfinite(nxt), nxt, 0.0)
    price = np.maximum.reduce(
        [np.full_like(w_pctr, cfg.reserve_cpc), nxt / w_pctr, cfg.reserve_ecpm / 1000.0 / w_pctr]
    )
    price = np.minimum(price, w_bid)
    prop = np.ones((n, s_max))
    is_new = np.zeros((n, s_max), dtype=bool)

    # exploration: a new ad in one slot (free, or the lowest-ranked winner's)
    shown = filled.copy()
    if cand_new is not None and s_max and np.any(explore):
        new = np.asarray(cand_new, dtype=bool)
        eligible = np.zeros((n, width), dtype=bool)
        eligible[row_of, col_of] = new & (bid >= cfg.reserve_cpc) & np.isfinite(pctr0)
        won = np.zeros((n, width), dtype=bool)
        np.put_along_axis(won, order[:, :s_max], win, axis=1)
        eligible &= ~won
        n_new = eligible.sum(axis=1)
        branch = explore & (rng_u[:, U_NEW] < cfg.new_ad_explore_share) & (n_new > 0)
        branch &= n_slots > 0
        if np.any(branch):
            pick = np.minimum((rng_u[:, U_NEW_PICK] * n_new).astype(np.int64), n_new - 1)
            col = np.argmax(np.cumsum(eligible, axis=1) > pick[:, None], axis=1)
            at = np.minimum(filled, n_slots - 1)  # where the new ad goes in the rank list
            b = np.flatnonzero(branch)
            g = off[b] + col[b]
            a = at[b]
            gidx[b, a] = g
            win[b, a] = True
            is_new[b, a] = True
            p_b = pctr0[g]
            p_safe = np.where(p_b > 0, p_b, 1.0)
            ecpm_floor = np.where(p_b > 0, cfg.reserve_ecpm / 1000.0 / p_safe, 0.0)
            floor = np.maximum(cfg.reserve_cpc, ecpm_floor)
            price[b, a] = np.minimum(floor, bid[g])
            shown[b] = np.minimum(filled[b] + 1, n_slots[b])
            prop[b, a] = 1.0 / n_new[b]

    # slots: the rank, or a uniform permutation of the shown positions when explored
    slot = np.broadcast_to(rank, (n, s_max)).copy()
    if s_max and np.any(explore):
        keys = np.where(rank < shown[:, None], rng_u[:, U_PERM : U_PERM + s_max], np.inf)
        perm = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
        slot = np.where(explore[:, None], perm, slot)
        prop = np.where(explore[:, None], prop / np.maximum(shown, 1)[:, None], prop)

    r_i, k_i = np.nonzero(win)
    order_out = np.lexsort((slot[r_i, k_i], r_i))
    r_i, k_i = r_i[order_out], k_i[order_out]
    g = gidx[r_i, k_i]
    return AuctionResult(
        request_index=r_i.astype(np.int64),
        candidate_index=g.astype(np.int64),
        slot=slot[r_i, k_i].astype(np.int64),
        price=price[r_i, k_i].astype(np.float64),
        rank_score=ev[g] if len(g) else np.zeros(0),
        pctr0=pctr0[g] if len(g) else np.zeros(0),
        propensity=prop[r_i, k_i],
        explored=explore[r_i],
        new_ad=is_new[r_i, k_i],
        filled=shown.astype(np.int64),
        qualified=qualified.astype(np.int64),
    )


__all__ = [
    "AuctionConfig",
    "AuctionResult",
    "auction",
    "explore_mask",
    "n_uniforms",
    "request_uniforms",
    "U_EXPLORE",
    "U_NEW",
    "U_NEW_PICK",
    "U_PERM",
]
