"""The prediction API: rank an ad request's candidates by calibrated pCTR.

``POST /v1/predict``::

    {"user_id": 17,
     "context": {"site_id": 3, "device_type": "mobile", "country": "US", "position": 0,
                 "event_time_ms": 1735689600000},          # optional, default: now
     "candidates": [{"ad_id": 4, "campaign_id": 2, "advertiser_id": 1, "ad_category": 7}, ...]}

answers the candidates ranked by calibrated score, each with its raw (model) and calibrated
score, plus the model version, the feature freshness, the calibration used and a
``degraded`` flag (features or model out of reach: scores are then the fallback of
``ctrstream.serving.triton_client``). Per-stage server timings come back in a ``Server-Timing`` header
(``redis``, ``assembly``, ``triton``, ``calibration``, ``handler``, ``app``) and as
Prometheus histograms on ``/metrics``.

Bad input is a 4xx with a precise message, never a 500: the request models are strict
(``extra="forbid"``, no type coercion, bounded numbers and lengths), a body that is not JSON
is a 422 (a declared non-JSON content type a 415), and any unexpected failure inside scoring
degrades the answer instead of failing it.

Fast path (the endpoint is called ~200 times a second with 100 candidates each): the body is
parsed and validated in one step by pydantic-core (``PredictRequest.model_validate_json`` -
the same strict models, the same error messages, documented in the OpenAPI schema), the
answer is encoded with msgspec straight from the score arrays (no per-candidate model
objects), and the request bypasses Starlette's middleware stack and router: ``_App`` hands
``POST /v1/predict`` to a raw-ASGI handler (the FastAPI route of the same handler stays for
the OpenAPI document). ``ctrstream serve --workers N`` runs N such processes on one port.

Feature freshness: counts of entities that do not involve the user (ad, campaign,
advertiser, site, site x category) are reused across requests while they provably lag Redis
by less than ``feature_cache_s`` (default and maximum: the speed layer's flush interval,
``settings.flush_interval_ms``): for that long after they were read, or - with
``feature_tracking`` (default) - until Redis reports a write to them, as long as the
invalidation channel's heartbeat is that fresh (``ctrstream.store.reader``).
``feature_cache_staleness_ms`` in the answer is the bound for the reused counts of that
request (null: everything read now). Hit and miss counts are on ``/metrics``
(``ctrstream_api_feature_cache_total``), the channel's state on ``/readyz``
(``feature_cache``).

``POST /v1/auction``::

    {"user_id": 17, "context": {"site_id": 3, "device_type": "mobile", "country": "US",
                                "event_time_ms": 1735689600000},     # optional, default: now
     "slots": 3,
     "candidates": [{"ad_id": 4, "campaign_id": 2, "advertiser_id": 1, "ad_category": 7,
                     "bid_cpc": 0.8}, ...],
     "reserve": {"cpc": 0.05, "ecpm": 0.5}}                          # optional

runs the ad server's auction (``ctrstream.serving.auction``, the code the closed loop's
``ctrstream.serving.adserver`` runs) for one request with the served model: candidates scored
at the reference position 0, calibrated, ranked by bid x pCTR0 above the reserve, the slots
filled by generalized second price; it answers the winners with their slot, price (per
click), pCTR0 and calibrated pCTR at their slot, the model version and ``degraded``. Same
validation and limits as ``/v1/predict`` (through FastAPI's router, not the fast path).

``GET /healthz`` (the process is up), ``GET /readyz`` (Redis answers and the model is ready
on Triton; 503 otherwise), ``GET /metrics`` (Prometheus text), ``GET /openapi.json`` and
``/docs``.

Limits (``ctrstream.serving.limits``): a body must arrive within ``body_timeout_s`` of the
headers (408 and the connection closed otherwise) and hold at most ``max_body_bytes`` (413);
the request head's deadline and size are the server's (``ctrstream serve --head-timeout
--max-header-bytes``: 408, 431). The
OpenAPI document lists every status and content type a route answers, and what its schema
allows the server accepts: an integer written with a zero fraction (``17.0``, a JSON Schema
integer) is that integer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Literal, TypeVar

import msgspec
import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ctrstream import features as F
from ctrstream.serving.assembly import CANDIDATE_FIELDS, assemble_async, request_columns
from ctrstream.serving.auction import AuctionConfig, auction, n_uniforms
from ctrstream.serving.limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    limit_request,
)
from ctrstream.serving.triton_client import DEFAULT_MODEL, AsyncScorer
from ctrstream.store.connection import redis_client
from ctrstream.store.reader import AsyncFeatureStore, Method

log = logging.getLogger("ctrstream.api")

MAX_CANDIDATES = 500
MAX_ID = 2**53  # ids beyond this cannot round-trip through JSON numbers safely
MIN_TIME_MS = 1  # event times are > 0 (ctrstream.events)
MAX_TIME_MS = 253402300799999  # 9999-12-31T23:59:59.999Z

Id = Annotated[int, Field(ge=0, le=MAX_ID)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


_M = TypeVar("_M", bound=BaseModel)


class Context(_Strict):
    site_id: Id
    device_type: Literal["mobile", "desktop", "tablet", "ctv"]
    country: Annotated[str, Field(min_length=1, max_length=8, pattern=r"^[A-Za-z0-9_-]+$")]
    position: Annotated[int, Field(ge=0, le=1000)]
    event_time_ms: Annotated[int, Field(ge=MIN_TIME_MS, le=MAX_TIME_MS)] | None = None


class Candidate(_Strict):
    ad_id: Id
    campaign_id: Id
    advertiser_id: Id
    ad_category: Id


class PredictRequest(_Strict):
    user_id: Id
    context: Context
    candidates: Annotated[list[Candidate], Field(min_length=1, max_length=MAX_CANDIDATES)]


MAX_SLOTS = 20
MAX_BID = 1e6  # per click, in the currency of the bids
Bid = Annotated[float, Field(gt=0, le=MAX_BID, allow_inf_nan=False)]


class AuctionContext(_Strict):
    site_id: Id
    device_type: Literal["mobile", "desktop", "tablet", "ctv"]
    country: Annotated[str, Field(min_length=1, max_length=8, pattern=r"^[A-Za-z0-9_-]+$")]
    event_time_ms: Annotated[int, Field(ge=MIN_TIME_MS, le=MAX_TIME_MS)] | None = None


class AuctionCandidate(_Strict):
    ad_id: Id
    campaign_id: Id
    advertiser_id: Id
    ad_category: Id
    bid_cpc: Bid  # what the advertiser bids per click


class Reserve(_Strict):
    """Reserve prices: per click and per thousand impressions (expected, bid x pCTR0)."""

    cpc: Annotated[float, Field(ge=0, le=MAX_BID, allow_inf_nan=False)] = 0.0
    ecpm: Annotated[float, Field(ge=0, le=1000 * MAX_BID, allow_inf_nan=False)] = 0.0


class AuctionRequest(_Strict):
    user_id: Id
    context: AuctionContext
    slots: Annotated[int, Field(ge=1, le=MAX_SLOTS)]
    candidates: Annotated[list[AuctionCandidate], Field(min_length=1, max_length=MAX_CANDIDATES)]
    reserve: Reserve | None = None  # default: the server's (ctrstream serve)


class AuctionWinner(BaseModel):
    ad_id: int
    campaign_id: int
    advertiser_id: int
    ad_category: int
    slot: int  # 0 = top
    price: float  # cost per click if clicked (generalized second price, at least the reserve)
    bid_cpc: float
    pctr0: float  # calibrated pCTR at the reference position 0: what the ranking used
    raw_score: float  # the model's pCTR at the winner's slot
    calibrated_score: float  # calibrated pCTR at the winner's slot


class AuctionResponse(BaseModel):
    winners: list[AuctionWinner]
    slots: int
    filled: int
    qualified: int  # candidates above the reserve
    reserve_cpc: float
    reserve_ecpm: float
    model_name: str
    model_version: str
    calibration: str
    degraded: bool
    degraded_reasons: list[str]
    event_time_ms: int


class ScoredCandidate(BaseModel):
    ad_id: int
    campaign_id: int
    advertiser_id: int
    ad_category: int
    rank: int
    raw_score: float
    calibrated_score: float


class PredictResponse(BaseModel):
    candidates: list[ScoredCandidate]
    model_name: str
    model_version: str
    calibration: str
    degraded: bool
    degraded_reasons: list[str]
    event_time_ms: int
    batch_version: str | None
    batch_cutoff_ms: int | None
    newest_bucket_ms: int | None
    feature_staleness_ms: int | None
    feature_cache_staleness_ms: float | None = None


class ErrorItem(BaseModel):
    loc: str
    type: str | None
    msg: str | None


class ErrorResponse(BaseModel):
    """Every 4xx of the API: what is wrong (``detail``) and where (``errors``)."""

    detail: str
    errors: list[ErrorItem] = []


def _error_doc(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


# answers of every route: the body limits apply before any route runs
LIMIT_RESPONSES: dict[int | str, dict] = {
    408: _error_doc("the request head or body did not arrive within its timeout"),
    413: _error_doc("the body is larger than the limit"),
}
PREDICT_RESPONSES: dict[int | str, dict] = {
    **LIMIT_RESPONSES,
    415: _error_doc("the content type is not JSON"),
    422: _error_doc("the body is not JSON or does not follow PredictRequest"),
}
AUCTION_RESPONSES: dict[int | str, dict] = {
    **LIMIT_RESPONSES,
    415: _error_doc("the content type is not JSON"),
    422: _error_doc("the body is not JSON or does not follow AuctionRequest"),
}


def _integral_float(text: str) -> float | int:
    """A JSON number with a fraction, as an int when it is integral (``17.0``, ``1e2``)."""
    x = float(text)
    return int(x) if x.is_integer() else x


def _has_integral_floats(e: ValidationError) -> bool:
    return any(
        err["type"] == "int_type"
        and isinstance(err.get("input"), float)
        and err["input"].is_integer()
        for err in e.errors()
    )


STAGES = ("redis", "assembly", "triton", "calibration", "handler", "app")
_ENCODE = msgspec.json.Encoder().encode


def _is_json(content_type: str | None) -> bool:
    """No content type, ``application/json`` or ``application/*+json`` (as FastAPI accepts)."""
    if not content_type:
        return True
    main = content_type.split(";", 1)[0].strip().lower()
    return main == "application/json" or (
        main.startswith("application/") and main.endswith("+json")
    )


MAX_BODY_BYTES = DEFAULT_MAX_BODY_BYTES
_JSON_HEADERS = [(b"content-type", b"application/json")]


class _App(FastAPI):
    """FastAPI with a raw-ASGI fast path for ``POST /v1/predict``.

    The request is handled by ``self.predict_asgi`` directly, not through Starlette's
    middleware stack, router and ``Request``/``Response`` objects (about a sixth of the
    API's CPU per request at 100 candidates, measured with py-spy). The endpoint is still a
    FastAPI route - the OpenAPI document, and a mounted or embedded use, go through it - and
    both paths run the same ``handle`` (same validation, same messages, same answer)."""

    predict_asgi: Callable[..., Awaitable[None]] | None = None  # (scope, receive, send)
    max_body_bytes: int = MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        if (
            self.predict_asgi is not None
            and scope["path"] == "/v1/predict"
            and scope["method"] == "POST"
        ):
            app = self.predict_asgi
        else:
            app = super().__call__
        return await limit_request(
            app, scope, receive, send, self.max_body_bytes, self.body_timeout_s
        )


def _server_timing(timings: dict[str, float]) -> bytes:
    return ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in timings.items()).encode()


class _Calibration:
    """``ctrstream.calibration.calibrator.CalibratorClient`` when it is importable and has state for the
    answering model version; identity otherwise (``calibration="none"``)."""

    def __init__(self, settings):
        self.client = None
        self.error: str | None = None
        try:
            from ctrstream.calibration.client import CalibratorClient
        except ImportError as e:
            self.error = f"calibration unavailable: {e}"
            return
        try:
            self.client = CalibratorClient(settings)
        except Exception as e:  # noqa: BLE001 - the API serves uncalibrated scores and reports why
            self.error = f"calibrator could not start: {type(e).__name__}: {e}"

    def apply(
        self, raw: np.ndarray, model_version: str, context: dict, model_name: str = ""
    ) -> tuple[np.ndarray, str]:
        if self.client is None or not model_version:
            return raw, "none"
        try:
            out = self.client.calibrate(raw, model_version, context, model_name=model_name)
        except Exception as e:  # noqa: BLE001 - no state yet, Redis down, ...: identity
            log.debug("calibration skipped: %s", e)
            return raw, "none"
        if out is None:
            return raw, "none"
        out = np.asarray(out, dtype=np.float64).reshape(-1)
        if out.shape != raw.shape or not np.all(np.isfinite(out)):
            return raw, "none"
        return np.clip(out, 0.0, 1.0), "river"


def _errors(exc_errors, prefix: tuple = ()) -> tuple[str, list[dict]]:
    errors = []
    for e in exc_errors:
        loc = ".".join(str(p) for p in (*prefix, *e.get("loc", ())))
        errors.append({"loc": loc, "type": e.get("type"), "msg": e.get("msg")})
    return "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:10]), errors[:50]


def _json_body(schema: str) -> dict:
    """The OpenAPI request body of a route that parses its own JSON (``schema``: a
    component the app registers)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }


def create_app(
    settings,
    model: str = DEFAULT_MODEL,
    model_name: str | None = None,
    max_rows: int = 256,
    feature_method: Method = "script",
    feature_cache_s: float | None = None,
    feature_tracking: bool = True,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    reserve_cpc: float = 0.0,
    reserve_ecpm: float = 0.0,
) -> FastAPI:
    """The API app. ``feature_cache_s``: the most the reused window counts of entities that
    do not involve the user (ad, campaign, advertiser, site, site x category) may lag Redis -
    bounded extra staleness in exchange for far fewer Redis reads. Default and maximum: the
    speed layer's flush interval (``settings.flush_interval_ms``), so a served count is at
    most one more flush interval behind than Redis itself; 0: no cache.
    ``feature_tracking``: keep cached counts until Redis reports a write to them (server-
    assisted invalidation, ``ctrstream.store.reader.InvalidationTracker``) instead of for
    ``feature_cache_s`` only - the bound above still holds, enforced by heartbeats.
    ``max_body_bytes``, ``body_timeout_s``: the body limits (``ctrstream.serving.limits``).
    ``reserve_cpc``, ``reserve_ecpm``: the reserve prices of ``POST /v1/auction`` when a
    request names none."""
    default_reserve = AuctionConfig(reserve_cpc=reserve_cpc, reserve_ecpm=reserve_ecpm)
    if max_body_bytes < 1 or body_timeout_s <= 0:
        raise ValueError(
            f"max_body_bytes must be at least 1 and body_timeout_s above 0, "
            f"not {max_body_bytes} and {body_timeout_s:g}"
        )
    flush_s = settings.flush_interval_ms / 1000.0
    if feature_cache_s is None:
        feature_cache_s = flush_s
    if not 0 <= feature_cache_s <= flush_s:
        raise ValueError(
            f"feature_cache_s must be between 0 and the speed layer's flush interval "
            f"({flush_s:g} s, settings.flush_interval_ms), not {feature_cache_s:g}"
        )
    registry = CollectorRegistry()
    stage_hist = Histogram(
        "ctrstream_api_stage_seconds",
        "server time per stage of /v1/predict",
        ["stage"],
        registry=registry,
        buckets=(
            0.0005,
            0.001,
            0.002,
            0.004,
            0.006,
            0.008,
            0.01,
            0.015,
            0.02,
            0.025,
            0.035,
            0.05,
            0.1,
            0.25,
            0.5,
            1,
            2.5,
        ),
    )
    requests = Counter(
        "ctrstream_api_requests_total",
        "prediction requests by outcome",
        ["outcome"],
        registry=registry,
    )
    candidates_c = Counter("ctrstream_api_candidates_total", "candidates scored", registry=registry)
    auction_hist = Histogram(
        "ctrstream_api_auction_stage_seconds",
        "server time per stage of /v1/auction",
        ["stage"],
        registry=registry,
        buckets=(0.001, 0.002, 0.004, 0.008, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    )
    auctions_c = Counter(
        "ctrstream_api_auctions_total",
        "POST /v1/auction answers by outcome (invalid requests: ctrstream_api_requests_total)",
        ["outcome"],
        registry=registry,
    )
    cache_c = Counter(
        "ctrstream_api_feature_cache_total",
        "entity keys of /v1/predict served from the shared-entity feature cache (hit) "
        "or read from Redis while it is on (miss)",
        ["result"],
        registry=registry,
    )

    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["redis"] = redis_client(
            settings, asyncio=True, timeout_s=max(0.05, settings.triton.timeout_s / 2)
        )
        state["store"] = AsyncFeatureStore(
            state["redis"],
            mode="lambda",
            method=feature_method,
            cache_ttl_s=feature_cache_s,
            tracking=feature_tracking,
        )
        await state["store"].start()
        state["scorer"] = AsyncScorer(
            settings, model=model, model_name=model_name, max_rows=max_rows
        )
        state["calibration"] = _Calibration(settings)
        try:
            yield
        finally:
            await state["store"].close()
            await state["scorer"].close()
            await state["redis"].aclose()

    app = _App(
        title="ctrstream prediction API",
        version="1",
        description="Ranks an ad request's candidates by calibrated pCTR "
        "(lambda-merged features, ONNX model on Triton, River calibration).",
        lifespan=lifespan,
    )
    app.max_body_bytes = max_body_bytes
    app.body_timeout_s = body_timeout_s

    def invalid(msg: str, errors: list, status: int = 422) -> tuple[int, bytes, dict]:
        requests.labels("invalid").inc()
        return status, _ENCODE({"detail": msg, "errors": errors}), {}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        status, body, _ = invalid(*_errors(exc.errors()))
        return Response(content=body, status_code=status, media_type="application/json")

    request_schema = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    request_defs = request_schema.pop("$defs", {})
    auction_schema = AuctionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    request_defs.update(auction_schema.pop("$defs", {}))

    def parse(model: type[_M], raw_body: bytes) -> _M | tuple[str, list[dict]]:
        """The body as ``model``, or (message, errors) of a 422."""
        try:
            return model.model_validate_json(raw_body)
        except ValidationError as e:
            if not _has_integral_floats(e):
                return _errors(e.errors(), ("body",))
            # ``17.0`` is an integer in JSON Schema: the strict models (the fast path) refuse
            # it, so such a body is parsed again with integral numbers as ints
            try:
                doc = json.loads(raw_body, parse_float=_integral_float)
            except (ValueError, RecursionError):  # what pydantic-core parsed, json refuses
                return _errors(e.errors(), ("body",))
            try:
                return model.model_validate(doc)
            except ValidationError as e2:
                return _errors(e2.errors(), ("body",))

    def not_json() -> tuple[int, bytes, dict]:
        return invalid(
            "body: content-type must be application/json",
            [
                {
                    "loc": "body",
                    "type": "content_type",
                    "msg": "content-type must be application/json",
                }
            ],
            415,
        )

    async def handle(content_type: str | None, raw_body: bytes) -> tuple[int, bytes, dict]:
        """(status, JSON body, stage timings) of one ``POST /v1/predict``."""
        h0 = time.perf_counter()
        if not _is_json(content_type):
            return not_json()
        req = parse(PredictRequest, raw_body)
        if not isinstance(req, PredictRequest):
            return invalid(*req)
        ctx_m = req.context
        t_ms = ctx_m.event_time_ms or int(time.time() * 1000)
        ctx = {
            "site_id": ctx_m.site_id,
            "device_type": ctx_m.device_type,
            "country": ctx_m.country,
            "position": ctx_m.position,
            "event_time_ms": ctx_m.event_time_ms,
        }
        cands = req.candidates
        reasons: list[str] = []
        ids = np.array(
            [(c.ad_id, c.campaign_id, c.advertiser_id, c.ad_category) for c in cands],
            dtype=np.int64,
        )
        columns = request_columns(
            req.user_id, ctx, {f: ids[:, k] for k, f in enumerate(CANDIDATE_FIELDS)}, t_ms
        )
        asm = await assemble_async(state["store"], columns, t_ms)
        if asm.degraded:
            reasons.append(asm.error or "feature store unavailable")
        res = await state["scorer"].score(asm.sparse, asm.dense)
        if res.degraded:
            reasons.append(f"model unavailable: {res.error}")
        t_cal = time.perf_counter()
        raw = res.raw.astype(np.float64)
        calibrated, calibration = (
            state["calibration"].apply(raw, res.model_version, ctx, res.model_name)
            if not res.degraded
            else (raw, "none")
        )
        t_end = time.perf_counter()
        order = np.argsort(-calibrated, kind="stable")
        ranked = ids[order].tolist()
        out = [
            {
                "ad_id": a,
                "campaign_id": c,
                "advertiser_id": v,
                "ad_category": g,
                "rank": r,
                "raw_score": x,
                "calibrated_score": y,
            }
            for r, ((a, c, v, g), x, y) in enumerate(
                zip(ranked, raw[order].tolist(), calibrated[order].tolist()), 1
            )
        ]
        fr = asm.read
        timings = {
            "redis": fr.timings.get("redis", 0.0),
            "assembly": fr.timings.get("assembly", 0.0),
            "triton": res.timings.get("triton", 0.0),
            "calibration": t_end - t_cal,
        }
        degraded = bool(reasons)
        body = _ENCODE(
            {
                "candidates": out,
                "model_name": res.model_name,
                "model_version": res.model_version,
                "calibration": calibration,
                "degraded": degraded,
                "degraded_reasons": reasons,
                "event_time_ms": t_ms,
                "batch_version": fr.batch_version,
                "batch_cutoff_ms": fr.cutoff_ms,
                "newest_bucket_ms": fr.newest_bucket_ms,
                "feature_staleness_ms": fr.staleness_ms,
                "feature_cache_staleness_ms": (
                    None if fr.cache_staleness_s is None else round(fr.cache_staleness_s * 1000, 3)
                ),
            }
        )
        timings["handler"] = time.perf_counter() - h0
        for k, v in timings.items():
            stage_hist.labels(k).observe(v)
        requests.labels("degraded" if degraded else "ok").inc()
        candidates_c.inc(len(cands))
        if fr.cache_hits:
            cache_c.labels("hit").inc(fr.cache_hits)
        if fr.cache_misses:
            cache_c.labels("miss").inc(fr.cache_misses)
        return 200, body, timings

    async def predict_asgi(scope, receive, send) -> None:
        """The fast path: ASGI in, ``handle``, ASGI out; the ``app`` stage is measured here."""
        t0 = time.perf_counter()
        content_type = None
        for k, v in scope["headers"]:
            if k == b"content-type":
                content_type = v.decode("latin-1")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_body_bytes:  # limit_request refuses it first; kept for embedded use
                status, body, timings = invalid(
                    f"body: larger than {max_body_bytes} bytes",
                    [
                        {
                            "loc": "body",
                            "type": "too_large",
                            "msg": f"larger than {max_body_bytes} bytes",
                        }
                    ],
                    413,
                )
                break
            chunks.append(chunk)
            more = message.get("more_body", False)
        else:
            try:
                status, body, timings = await handle(content_type, b"".join(chunks))
            except Exception as e:  # a bug, not bad input: a 500 that says so
                log.exception("POST /v1/predict failed")
                requests.labels("error").inc()
                status, body, timings = (
                    500,
                    _ENCODE({"detail": f"internal error: {type(e).__name__}: {e}"}),
                    {},
                )
        headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        if status == 200:
            timings["app"] = dt = time.perf_counter() - t0
            stage_hist.labels("app").observe(dt)
            headers.append((b"server-timing", _server_timing(timings)))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    app.predict_asgi = predict_asgi

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=PREDICT_RESPONSES,
        openapi_extra=_json_body("PredictRequest"),
    )
    async def predict(request: Request):
        """The FastAPI route of the same handler (OpenAPI, and any use that bypasses
        ``_App.__call__``)."""
        status, body, timings = await handle(
            request.headers.get("content-type"), await request.body()
        )
        headers = {"server-timing": _server_timing(timings).decode()} if status == 200 else None
        return Response(
            content=body, status_code=status, media_type="application/json", headers=headers
        )

    async def handle_auction(content_type: str | None, raw_body: bytes) -> tuple[int, bytes, dict]:
        """(status, JSON body, stage timings) of one ``POST /v1/auction``: the candidates
        scored at the reference position 0 by the served model, calibrated, the auction
        (``ctrstream.serving.auction``, no exploration), the winners scored at their slots."""
        h0 = time.perf_counter()
        if not _is_json(content_type):
            return not_json()
        req = parse(AuctionRequest, raw_body)
        if not isinstance(req, AuctionRequest):
            return invalid(*req)
        cfg = (
            default_reserve
            if req.reserve is None
            else AuctionConfig(reserve_cpc=req.reserve.cpc, reserve_ecpm=req.reserve.ecpm)
        )
        ctx_m = req.context
        t_ms = ctx_m.event_time_ms or int(time.time() * 1000)
        ctx = {
            "site_id": ctx_m.site_id,
            "device_type": ctx_m.device_type,
            "country": ctx_m.country,
            "position": 0,
            "event_time_ms": ctx_m.event_time_ms,
        }
        cands = req.candidates
        ids = np.array(
            [(c.ad_id, c.campaign_id, c.advertiser_id, c.ad_category) for c in cands],
            dtype=np.int64,
        )
        bids = np.array([c.bid_cpc for c in cands], dtype=np.float64)
        columns = request_columns(
            req.user_id, ctx, {f: ids[:, k] for k, f in enumerate(CANDIDATE_FIELDS)}, t_ms
        )
        reasons: list[str] = []
        asm = await assemble_async(state["store"], columns, t_ms)
        if asm.degraded:
            reasons.append(asm.error or "feature store unavailable")
        scorer = state["scorer"]
        res = await scorer.score(asm.sparse, asm.dense)
        tc0 = time.perf_counter()
        raw0 = res.raw.astype(np.float64)
        pctr0, calibration = (
            state["calibration"].apply(raw0, res.model_version, ctx)
            if not res.degraded
            else (raw0, "none")
        )
        t1 = time.perf_counter()
        n = len(cands)
        won = auction(
            np.array([0, n], dtype=np.int64),
            bids,
            pctr0,
            np.array([req.slots], dtype=np.int64),
            np.zeros(1, dtype=bool),
            np.zeros((1, n_uniforms(req.slots))),
            cfg,
        )
        t2 = time.perf_counter()
        w = won.candidate_index
        raw_at, cal_at = raw0[w], pctr0[w]
        triton_s = res.timings.get("triton", 0.0)
        if len(w) and not res.degraded:
            at_slot = {f: v[w] for f, v in columns.items()}
            at_slot["position"] = won.slot
            res_at = await scorer.score(F.sparse_ids(at_slot), asm.dense[w])
            triton_s += res_at.timings.get("triton", 0.0)
            if res_at.degraded:
                reasons.append(f"model unavailable: {res_at.error}")
            else:
                raw_at = res_at.raw.astype(np.float64)
                cal_at, _ = state["calibration"].apply(
                    raw_at,
                    res_at.model_version,
                    {"position": won.slot, "device_type": at_slot["device_type"]},
                )
        elif res.degraded:
            reasons.append(f"model unavailable: {res.error}")

        def finite(a: np.ndarray) -> list[float]:
            return np.nan_to_num(np.asarray(a, np.float64), nan=0.0, posinf=1.0).tolist()

        winners = [
            {
                "ad_id": a,
                "campaign_id": c,
                "advertiser_id": v,
                "ad_category": g,
                "slot": s,
                "price": p,
                "bid_cpc": b,
                "pctr0": q0,
                "raw_score": x,
                "calibrated_score": y,
            }
            for (a, c, v, g), s, p, b, q0, x, y in zip(
                ids[w].tolist(),
                won.slot.tolist(),
                finite(won.price),
                bids[w].tolist(),
                finite(won.pctr0),
                finite(raw_at),
                finite(cal_at),
            )
        ]
        degraded = bool(reasons)
        body = _ENCODE(
            {
                "winners": winners,
                "slots": req.slots,
                "filled": int(won.filled[0]),
                "qualified": int(won.qualified[0]),
                "reserve_cpc": cfg.reserve_cpc,
                "reserve_ecpm": cfg.reserve_ecpm,
                "model_name": res.model_name,
                "model_version": res.model_version,
                "calibration": calibration,
                "degraded": degraded,
                "degraded_reasons": reasons,
                "event_time_ms": t_ms,
            }
        )
        fr = asm.read
        timings = {
            "redis": fr.timings.get("redis", 0.0),
            "assembly": fr.timings.get("assembly", 0.0),
            "triton": triton_s,
            "calibration": t1 - tc0,
            "auction": t2 - t1,
            "handler": time.perf_counter() - h0,
        }
        for k, v in timings.items():
            auction_hist.labels(k).observe(v)
        auctions_c.labels("degraded" if degraded else "ok").inc()
        return 200, body, timings

    @app.post(
        "/v1/auction",
        response_model=AuctionResponse,
        responses=AUCTION_RESPONSES,
        openapi_extra=_json_body("AuctionRequest"),
    )
    async def auction_route(request: Request):
        """Run the auction of one ad request: its candidates (with bids) ranked by bid x the
        served model's calibrated pCTR at the reference position, above the reserve, slots
        filled by generalized second price (``ctrstream.serving.auction``)."""
        try:
            status, body, timings = await handle_auction(
                request.headers.get("content-type"), await request.body()
            )
        except Exception as e:  # a bug, not bad input: a 500 that says so
            log.exception("POST /v1/auction failed")
            auctions_c.labels("error").inc()
            status, body, timings = (
                500,
                _ENCODE({"detail": f"internal error: {type(e).__name__}: {e}"}),
                {},
            )
        headers = {"server-timing": _server_timing(timings).decode()} if status == 200 else None
        return Response(
            content=body, status_code=status, media_type="application/json", headers=headers
        )

    def openapi():
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(request_defs)
            schemas["PredictRequest"] = request_schema
            schemas["AuctionRequest"] = auction_schema
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the OpenAPI document

    @app.get("/healthz", responses=LIMIT_RESPONSES)
    async def healthz():
        return {"status": "ok"}

    @app.get(
        "/readyz",
        responses={
            **LIMIT_RESPONSES,
            503: {"description": "Redis or the model is not ready (same body as 200)"},
        },
    )
    async def readyz():
        checks: dict[str, bool | str] = {}
        try:
            checks["redis"] = bool(await state["redis"].ping())
        except Exception as e:  # noqa: BLE001 - any failed ping is a failed readiness check, reported
            checks["redis"] = False
            checks["redis_error"] = f"{type(e).__name__}: {e}"
        checks["model"] = await state["scorer"].ready()
        checks["model_name"] = state["scorer"].model_name
        checks["feature_cache"] = state["store"].cache_stats()
        ok = checks["redis"] and checks["model"]
        return JSONResponse(
            status_code=200 if ok else 503,
            content={"status": "ready" if ok else "not ready", **checks},
        )

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            **LIMIT_RESPONSES,
            200: {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
        },
    )
    async def metrics():
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # several worker processes (``ctrstream serve --workers N``): every worker writes
            # its samples to the shared directory; any worker answers with the sum of all
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return Response(generate_latest(merged), media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.state.ctr = state
    return app


APP_ARGS_ENV = "CTRSTREAM_API_ARGS"  # create_app's keyword arguments (JSON), for worker processes


def app_from_env() -> FastAPI:
    """The app of one worker process of ``ctrstream serve --workers N`` (a uvicorn factory):
    ``create_app(get_settings(), **json.loads($CTRSTREAM_API_ARGS))``."""
    from ctrstream.config import get_settings

    return create_app(get_settings(), **json.loads(os.environ.get(APP_ARGS_ENV, "{}")))


__all__ = [
    "create_app",
    "app_from_env",
    "ErrorResponse",
    "PredictRequest",
    "PredictResponse",
    "AuctionRequest",
    "AuctionResponse",
    "MAX_CANDIDATES",
    "MAX_SLOTS",
]
