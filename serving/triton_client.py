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

import numpy as np

from ctrstream import features as F

DEFAULT_MODEL = "ctr_deep"
RECONNECT_MAX_MS = 1000


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
        self.url = url or settings.triton.grpc_url
        self._client = None
        self.last_version: str | None = None

    def _get_client(self):
        if self._client is None:
            import tritonclient.grpc.aio as grpcaio

            self._client = grpcaio.InferenceServerClient(self.url, channel_args=channel_args())
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.close()
            finally:
                self._client = None

    async def ready(self) -> bool:
        """Whether the server answers and the model is ready (never raises)."""
        try:
            return bool(
                await asyncio.wait_for(
                    self._get_client().is_model_ready(self.model_name, self._ask), self.timeout_s
                )
            )
        except Exception:  # noqa: BLE001 - a readiness probe answers, never raises
            return False

    async def _infer_once(
        self, sparse: np.ndarray, dense: np.ndarray, version: str, timeout: float
    ) -> tuple[np.ndarray, str]:
        from tritonclient.grpc import InferInput, InferRequestedOutput

        i_sparse = InferInput(F.INPUT_SPARSE, list(sparse.shape), "INT64")
        i_sparse.set_data_from_numpy(sparse)
        i_dense = InferInput(F.INPUT_DENSE, list(dense.shape), "FP32")
        i_dense.set_data_from_numpy(dense)
        resp = await self._get_client().infer(
            self.model_name,
            [i_sparse, i_dense],
            model_version=version,
            outputs=[InferRequestedOutput(F.OUTPUT_PROB)],
            client_timeout=max(timeout, 0.001),
        )
        prob = resp.as_numpy(F.OUTPUT_PROB)
        if prob is None or prob.size != len(sparse):
            raise ScoringError(
                f"model {self.model_name} returned {None if prob is None else prob.shape} "
                f"for {len(sparse)} rows"
            )
        return prob.reshape(-1).astype(np.float32), resp.get_response().model_version

    async def _infer_chunk(self, sparse, dense, version: str, deadline: float, stats: dict):
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
