"""Scoring rows with the published model on Triton (gRPC, asyncio).

:class:`AsyncScorer` splits the rows into requests of at most ``max_rows`` rows, sends them
concurrently over one gRPC channel (``tritonclient.grpc.aio``), and retries failed requests a
bounded number of times within one deadline (``settings.triton.timeout_s`` for the whole
call, however many attempts). The answer says which model version produced the scores
(Triton's ``model_version`` of the response; when a version switch lands between two
requests of one call, the older ones are re-asked from the newest version so that one call
is never scored by two models). With ``model_version`` set (an experiment arm's pinned
version, served side by side with others: ``ctrstream.models.publish.pin_versions``) every
request asks exactly that version, and the answer's ``model_version`` is it.

When Triton cannot answer in time the scores are the **fallback**: per row, the smoothed
historical CTR of the ad from the counts the dense features were made of (its window with
the most impressions), which is the prior mean ``features.PRIOR.mean`` when there are none -
flagged ``degraded``. Scoring never raises.

**Several servers** (``settings.triton.grpc_urls``: ``CTRSTREAM_TRITON__URLS``, or the local
stack's ``--triton-replicas``): each request goes to the server with the fewest outstanding
requests of this client (ties in turn), among the servers that have the version it asks.
A server that fails with ``UNAVAILABLE`` is skipped for ``DEAD_RETRY_S`` and the request is
retried at once on another; after that the server is asked for its versions again and used
when it answers. The version switch works across servers: the client keeps a view of the
ready versions of every server (refreshed every ``VIEW_TTL_S`` in the background, and at once
when a request finds its version gone) and asks, pinned, the newest version that is ready
on **every** live server - so a version that the publisher has loaded on one server but not
yet on the others is not asked, and a server that lacks a version is not sent requests for
it (docs/triton-replicas.md). With one server, requests ask no version (Triton's newest
ready one), as they always have.

Recovery: when Triton goes away the gRPC channel reconnects by itself, with its reconnection
backoff capped at ``RECONNECT_MAX_MS`` (gRPC's default grows to two minutes, which would keep
answers degraded long after Triton is back), so scoring leaves the fallback within about a
second of Triton serving the model again - no restart of the API or the scorer.

:class:`Scorer` is the synchronous wrapper for batch use (the streaming scorer): it owns an
event loop on a background thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctrstream import features as F

DEFAULT_MODEL = "ctr_deep"
RECONNECT_MAX_MS = 1000
# several servers: how long a server that failed with UNAVAILABLE is skipped, and how old
# the view of every server's ready versions may get before it is read again
DEAD_RETRY_S = 1.0
VIEW_TTL_S = 0.5


def channel_args() -> list[tuple[str, int]]:
    """gRPC channel options: tritonclient's defaults (message sizes, keepalive) plus a
    reconnection backoff of at most ``RECONNECT_MAX_MS``."""
    from tritonclient.grpc import KeepAliveOptions
    from tritonclient.grpc._client import MAX_GRPC_MESSAGE_SIZE

    ka = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", ka.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", ka.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", ka.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", ka.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
    ]


@dataclass
class ScoreResult:
    raw: np.ndarray  # float32 (rows,) click probabilities before calibration
    model_version: str  # "" when degraded
    degraded: bool
    model_name: str = ""  # the Triton model asked (the served flavour, e.g. "ctr_lr_py")
    error: str | None = None
    attempts: int = 0
    timings: dict = field(default_factory=dict)


class ScoringError(RuntimeError):
    def __init__(self, message: str, attempts: int = 0):
        super().__init__(message)
        self.attempts = attempts


def served_model_name(settings, base: str = DEFAULT_MODEL) -> str:
    """The Triton model name of ``base`` for this stack's backend flavour."""
    try:
        from ctrstream.models.publish import served_model_name as _served
    except ImportError:
        return f"{base}_py" if settings.triton.backend == "python" else base
    return _served(settings, base)


def base_model_name(name: str) -> str:
    """The published base name of a Triton model name (``ctr_lr_py`` -> ``ctr_lr``): what
    predictions and calibrators are keyed by, whichever flavour served them."""
    try:
        from ctrstream.models.publish import base_model_name as _base
    except ImportError:
        return name.removesuffix("_py")
    return _base(name)


_DENSE_PER_ENTITY = F.N_WINDOWS * 3


def fallback_scores(dense: np.ndarray, entity: str = "ad") -> np.ndarray:
    """The smoothed historical CTR of each row's ``entity`` from its dense features: the
    window with the most impressions (``log1p`` is monotone), else the prior mean."""
    dense = np.asarray(dense, dtype=np.float32)
    k = [e.name for e in F.ENTITIES].index(entity)
    block = dense[:, k * _DENSE_PER_ENTITY : (k + 1) * _DENSE_PER_ENTITY].reshape(
        -1, F.N_WINDOWS, 3
    )
    best = np.argmax(block[..., 0], axis=1)
    out = block[np.arange(len(block)), best, 2]
    return np.where(np.isfinite(out), out, np.float32(F.PRIOR.mean)).astype(np.float32)


class _Server:
    """One Triton server of a client: its channel, the requests in flight to it, when it
    may be tried again after a failure, and the versions of the model it has ready."""

    def __init__(self, url: str):
        self.url = url
        self.client: Any = None
        self.outstanding = 0
        self.down_until = 0.0
        self.versions: frozenset[str] | None = None  # None: not known (never read, or down)

    def channel(self) -> Any:
        if self.client is None:
            import tritonclient.grpc.aio as grpcaio

            self.client = grpcaio.InferenceServerClient(self.url, channel_args=channel_args())
        return self.client

    def up(self, now: float) -> bool:
        return now >= self.down_until

    def mark_down(self, now: float) -> None:
        self.down_until = now + DEAD_RETRY_S
        self.versions = None  # asked again before it is used again


def _unavailable(e: Exception) -> bool:
    """Whether ``e`` says the server cannot be reached (as opposed to refusing a request)."""
    status = getattr(e, "status", None)
    code = status() if callable(status) else status
    text = f"{code} {e}"
    return "UNAVAILABLE" in text or "failed to connect" in text.lower()


class AsyncScorer:
    def __init__(
        self,
        settings,
        model: str = DEFAULT_MODEL,
        model_name: str | None = None,
        max_rows: int = 256,
        retries: int = 2,
        timeout_s: float | None = None,
        url: str | None = None,
        model_version: int | None = None,
        urls: list[str] | None = None,
    ):
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        if model_version is not None and (
            isinstance(model_version, bool)
            or not isinstance(model_version, int)
            or model_version < 1
        ):
            raise ValueError(
                f"model_version must be a published version number (an int >= 1) or None "
                f"for the newest, not {model_version!r}"
            )
        self.settings = settings
        self.model_name = model_name or served_model_name(settings, model)
        # the published base name (what predictions and calibrators are keyed by)
        self.base_name = base_model_name(self.model_name) if model_name else model
        # None: the newest ready version; a number: exactly that version, every request
        self.model_version = model_version
        self._ask = "" if model_version is None else str(model_version)
        self.max_rows = int(max_rows)
        self.retries = int(retries)
        self.timeout_s = float(timeout_s if timeout_s is not None else settings.triton.timeout_s)
        chosen = list(urls) if urls else [url] if url else list(settings.triton.grpc_urls)
        if not chosen:
            raise ValueError("no Triton server to ask: set CTRSTREAM_TRITON__URLS")
        self.urls = chosen
        self.url = ", ".join(chosen)
        self._servers = [_Server(u) for u in chosen]
        self._balanced = len(chosen) > 1
        self._turn = 0  # round robin among the least loaded
        self._view_at = -1e9  # when every server's ready versions were last read
        self._refreshing: asyncio.Task | None = None
        self.last_version: str | None = None

    def _get_client(self):
        return self._servers[0].channel()

    async def close(self) -> None:
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
        for srv in self._servers:
            if srv.client is not None:
                try:
                    await srv.client.close()
                finally:
                    srv.client = None

    async def ready(self) -> bool:
        """Whether a server answers and the model is ready on it (never raises)."""
        for srv in self._servers:
            try:
                if await asyncio.wait_for(
                    srv.channel().is_model_ready(self.model_name, self._ask), self.timeout_s
                ):
                    return True
            except Exception:  # noqa: BLE001 - a readiness probe answers, never raises
                continue
        return False

    # --- several servers: the view of their versions, and the choice of one -------------
    async def _read_versions(self, srv: _Server, timeout: float) -> None:
        """Ask ``srv`` which versions of the model it has ready; mark it down when it cannot
        be reached."""
        try:
            md = await asyncio.wait_for(
                srv.channel().get_model_metadata(self.model_name, as_json=True), timeout
            )
        except Exception as e:  # noqa: BLE001 - an unreachable or modelless server is skipped
            if _unavailable(e) or isinstance(e, TimeoutError):
                srv.mark_down(time.monotonic())
            else:  # it answers, but does not serve the model (not loaded there)
                srv.versions = frozenset()
            return
        srv.versions = frozenset(str(v) for v in md.get("versions", []))

    async def _refresh(self) -> None:
        """Read the ready versions of every server that may be used (in parallel)."""
        now = time.monotonic()
        timeout = min(self.timeout_s, 1.0)
        await asyncio.gather(*[self._read_versions(s, timeout) for s in self._servers if s.up(now)])
        self._view_at = time.monotonic()

    async def _fresh_view(self, force: bool = False) -> None:
        """Refresh the view at once when ``force`` or when there is none; in the background
        when it is older than ``VIEW_TTL_S`` (requests go on with the current view)."""
        stale = time.monotonic() - self._view_at > VIEW_TTL_S
        if force or self._view_at < 0 or all(s.versions is None for s in self._servers):
            if self._refreshing is not None and not self._refreshing.done():
                await asyncio.shield(self._refreshing)
                if not force:
                    return
            await self._refresh()
        elif stale and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    def _target(self) -> str:
        """The version to ask: the pinned one, else the newest version ready on every live
        server whose versions are known ("" when they share none: let Triton choose)."""
        if self._ask:
            return self._ask
        now = time.monotonic()
        known = [s.versions for s in self._servers if s.up(now) and s.versions]
        if not known:
            return ""
        common = frozenset.intersection(*known)
        if not common:
            return ""
        return max(common, key=lambda v: (len(v), v))

    def _pick(self, version: str, avoid: set[str]) -> _Server:
        """The live server with the fewest outstanding requests that has ``version`` ready
        (ties in turn); servers in ``avoid`` (failed in this call) only when no other fits."""
        now = time.monotonic()
        live = [s for s in self._servers if s.up(now)]
        pool = [
            s for s in live if s.versions is not None and (not version or version in s.versions)
        ]
        pool = [s for s in pool if s.url not in avoid] or pool
        if not pool:  # nothing known to fit: any live server, else any (it answers why not)
            pool = [s for s in live if s.url not in avoid] or live or self._servers
        least = min(s.outstanding for s in pool)
        best = [s for s in pool if s.outstanding == least]
        self._turn += 1
        return best[self._turn % len(best)]

    # --- requests ----------------------------------------------------------------------
    async def _infer_once(
        self,
        sparse: np.ndarray,
        dense: np.ndarray,
        version: str,
        timeout: float,
        srv: _Server | None = None,
    ) -> tuple[np.ndarray, str]:
        from tritonclient.grpc import InferInput, InferRequestedOutput

        srv = srv or self._servers[0]
        i_sparse = InferInput(F.INPUT_SPARSE, list(sparse.shape), "INT64")
        i_sparse.set_data_from_numpy(sparse)
        i_dense = InferInput(F.INPUT_DENSE, list(dense.shape), "FP32")
        i_dense.set_data_from_numpy(dense)
        srv.outstanding += 1
        try:
            resp = await srv.channel().infer(
                self.model_name,
                [i_sparse, i_dense],
                model_version=version,
                outputs=[InferRequestedOutput(F.OUTPUT_PROB)],
                client_timeout=max(timeout, 0.001),
            )
        finally:
            srv.outstanding -= 1
        prob = resp.as_numpy(F.OUTPUT_PROB)
        if prob is None or prob.size != len(sparse):
            raise ScoringError(
                f"model {self.model_name} returned {None if prob is None else prob.shape} "
                f"for {len(sparse)} rows"
            )
        return prob.reshape(-1).astype(np.float32), resp.get_response().model_version

    async def _infer_chunk(self, sparse, dense, version: str, deadline: float, stats: dict):
        if self._balanced:
            return await self._infer_chunk_balanced(sparse, dense, version, deadline, stats)
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            stats["attempts"] += 1
            try:
                return await self._infer_once(sparse, dense, version, remaining)
            except Exception as e:  # noqa: BLE001 - every failure is retried, then degraded
                last = e
                backoff = min(0.005 * (2**attempt), max(0.0, deadline - time.monotonic()))
                if attempt < self.retries and backoff > 0:
                    await asyncio.sleep(backoff)
        raise ScoringError(
            f"Triton {self.url} model {self.model_name}: "
            f"{type(last).__name__ if last else 'deadline'}: {last or 'no time left'}",
            stats["attempts"],
        )

    async def _infer_chunk_balanced(
        self, sparse, dense, version: str, deadline: float, stats: dict
    ) -> tuple[np.ndarray, str]:
        """One chunk over several servers: ``version`` ("" = the view's target, asked pinned)
        on a server that has it; a failure is retried at once on another server (an
        unreachable one is skipped for ``DEAD_RETRY_S``), after reading the view again."""
        last: Exception | None = None
        failed: set[str] = set()
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ask = version or self._target()
            srv = self._pick(ask, failed)
            stats["attempts"] += 1
            try:
                return await self._infer_once(sparse, dense, ask, remaining, srv)
            except Exception as e:  # noqa: BLE001 - every failure is retried, then degraded
                last = e
                failed.add(srv.url)
                if _unavailable(e):
                    srv.mark_down(time.monotonic())
                if attempt < self.retries and deadline > time.monotonic():
                    try:  # the version may be gone (a switch) or the server: look again
                        await asyncio.wait_for(
                            self._fresh_view(force=True), max(0.0, deadline - time.monotonic())
                        )
                    except Exception:  # noqa: BLE001 - the next attempt uses what is known
                        pass
                    if len(failed) >= len(self._servers):  # every server failed: back off
                        failed.clear()
                        backoff = min(0.005 * (2**attempt), max(0.0, deadline - time.monotonic()))
                        if backoff > 0:
                            await asyncio.sleep(backoff)
        raise ScoringError(
            f"Triton {self.url} model {self.model_name}: "
            f"{type(last).__name__ if last else 'deadline'}: {last or 'no time left'}",
            stats["attempts"],
        )

    async def infer(self, sparse: np.ndarray, dense: np.ndarray) -> tuple[np.ndarray, str, int]:
        """Raw scores and the answering version; raises :class:`ScoringError`."""
        sparse = np.ascontiguousarray(sparse, dtype=np.int64)
        dense = np.ascontiguousarray(dense, dtype=np.float32)
        n = len(sparse)
        if n == 0:
            return np.zeros(0, np.float32), self.last_version or "", 0
        deadline = time.monotonic() + self.timeout_s
        stats = {"attempts": 0}
        bounds = [(s, min(s + self.max_rows, n)) for s in range(0, n, self.max_rows)]
        ask = self._ask
        if self._balanced:  # each attempt asks the view's target (below: one model per call)
            try:
                await asyncio.wait_for(self._fresh_view(), self.timeout_s)
            except Exception:  # noqa: BLE001 - the attempts below report what is wrong
                pass
        if len(bounds) == 1:  # the usual case (one request's candidates): no task to schedule
            parts = [await self._infer_chunk(sparse, dense, ask, deadline, stats)]
        else:
            parts = await asyncio.gather(
                *[
                    self._infer_chunk(sparse[a:b], dense[a:b], ask, deadline, stats)
                    for a, b in bounds
                ]
            )
        versions = [v for _, v in parts]
        newest = max(versions, key=lambda v: (len(v), v))
        if any(v != newest for v in versions):  # a switch landed mid-call: one model per call
            redo = [k for k, v in enumerate(versions) if v != newest]
            again = await asyncio.gather(
                *[
                    self._infer_chunk(
                        sparse[bounds[k][0] : bounds[k][1]],
                        dense[bounds[k][0] : bounds[k][1]],
                        newest,
                        deadline,
                        stats,
                    )
                    for k in redo
                ]
            )
            for k, p in zip(redo, again):
                parts[k] = p
        self.last_version = newest
        return np.concatenate([p for p, _ in parts]), newest, stats["attempts"]

    async def score(self, sparse: np.ndarray, dense: np.ndarray) -> ScoreResult:
        """Scores for every row; the fallback (flagged ``degraded``) when Triton fails."""
        t0 = time.perf_counter()
        try:
            raw, version, attempts = await self.infer(sparse, dense)
            return ScoreResult(
                raw,
                version,
                False,
                self.model_name,
                None,
                attempts,
                {"triton": time.perf_counter() - t0},
            )
        except Exception as e:  # noqa: BLE001 - scoring never raises
            return ScoreResult(
                fallback_scores(dense),
                "",
                True,
                self.model_name,
                f"{type(e).__name__}: {e}",
                getattr(e, "attempts", 0),
                {"triton": time.perf_counter() - t0},
            )


class Scorer:
    """Synchronous wrapper: ``Scorer(settings).score(sparse, dense) -> ScoreResult``."""

    def __init__(self, settings, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="triton-scorer", daemon=True
        )
        self._thread.start()
        self._async = AsyncScorer(settings, **kwargs)

    @property
    def model_name(self) -> str:
        return self._async.model_name

    @property
    def base_name(self) -> str:
        return self._async.base_name

    @property
    def model_version(self) -> int | None:
        return self._async.model_version

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def score(self, sparse: np.ndarray, dense: np.ndarray) -> ScoreResult:
        return self._run(self._async.score(sparse, dense))

    def ready(self) -> bool:
        return self._run(self._async.ready())

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = [
    "AsyncScorer",
    "Scorer",
    "ScoreResult",
    "ScoringError",
    "base_model_name",
    "fallback_scores",
    "served_model_name",
    "DEFAULT_MODEL",
]
