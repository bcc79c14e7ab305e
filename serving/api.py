"""The prediction API: rank an ad request's candidates by calibrated pCTR.

``POST /v1/predict``::

    {"user_id": 17,
     "context": {"site_id": 3, "device_type": "mobile", "country": "US", "position": 0,
                 "event_time_ms": 1735689600000},          # optional, default: now
     "candidates": [{"ad_id": 4, "campaign_id": 2, "advertiser_id": 1, "ad_category": 7}, ...]}

answers the candidates ranked by calibrated score, each with its raw (model) and calibrated
score, plus the model version, the feature freshness, the calibration used and a
``degraded`` flag (features or model out of reach: scores are then the fallback of
``serving.triton_client``). Per-stage server timings come back in a ``Server-Timing`` header
(``redis``, ``assembly``, ``triton``, ``calibration``, ``handler``, ``app``) and as
Prometheus histograms on ``/metrics``.

Bad input is a 4xx with a precise message, never a 500: the request models are strict
(``extra="forbid"``, no type coercion, bounded numbers and lengths), a body that is not JSON
is a 422, and any unexpected failure inside scoring degrades the answer instead of failing it.

``GET /healthz`` (the process is up), ``GET /readyz`` (Redis answers and the model is ready
on Triton; 503 otherwise), ``GET /metrics``, ``GET /openapi.json`` and ``/docs``.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from serving.assembly import assemble_async, request_columns
from serving.triton_client import DEFAULT_MODEL, AsyncScorer
from streaming.featurestore import AsyncFeatureStore, redis_client

log = logging.getLogger("ctrstream.api")

MAX_CANDIDATES = 500
MAX_ID = 2**53  # ids beyond this cannot round-trip through JSON numbers safely
MIN_TIME_MS = 1  # event times are > 0 (streaming.events)
MAX_TIME_MS = 253402300799999  # 9999-12-31T23:59:59.999Z

Id = Annotated[int, Field(ge=0, le=MAX_ID)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


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


STAGES = ("redis", "assembly", "triton", "calibration", "handler", "app")


class _Calibration:
    """``streaming.calibration.CalibratorClient`` when it is importable and has state for the
    answering model version; identity otherwise (``calibration="none"``)."""

    def __init__(self, settings):
        self.client = None
        self.error: str | None = None
        try:
            from streaming.calibration import CalibratorClient
        except ImportError as e:
            self.error = f"calibration unavailable: {e}"
            return
        try:
            self.client = CalibratorClient(settings)
        except Exception as e:  # noqa: BLE001
            self.error = f"calibrator could not start: {type(e).__name__}: {e}"

    def apply(self, raw: np.ndarray, model_version: str, context: dict) -> tuple[np.ndarray, str]:
        if self.client is None or not model_version:
            return raw, "none"
        try:
            out = self.client.calibrate(raw, model_version, context)
        except Exception as e:  # noqa: BLE001 - no state yet, Redis down, ...: identity
            log.debug("calibration skipped: %s", e)
            return raw, "none"
        if out is None:
            return raw, "none"
        out = np.asarray(out, dtype=np.float64).reshape(-1)
        if out.shape != raw.shape or not np.all(np.isfinite(out)):
            return raw, "none"
        return np.clip(out, 0.0, 1.0), "river"


def create_app(settings, model: str = DEFAULT_MODEL, model_name: str | None = None,
               max_rows: int = 256, feature_method: str = "script",
               feature_cache_s: float = 2.0) -> FastAPI:
    """The API app. ``feature_cache_s``: how long window counts of entities that do not
    involve the user (ad, campaign, advertiser, site, site x category) are reused between
    requests - bounded extra staleness in exchange for far fewer Redis reads (0: off)."""
    registry = CollectorRegistry()
    stage_hist = Histogram("ctrstream_api_stage_seconds", "server time per stage of /v1/predict",
                           ["stage"], registry=registry,
                           buckets=(.0005, .001, .002, .004, .006, .008, .01, .015, .02, .025,
                                    .035, .05, .1, .25, .5, 1, 2.5))
    requests = Counter("ctrstream_api_requests_total", "prediction requests by outcome",
                       ["outcome"], registry=registry)
    candidates_c = Counter("ctrstream_api_candidates_total", "candidates scored", registry=registry)

    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["redis"] = redis_client(settings, asyncio=True, timeout_s=max(0.05, settings.triton.timeout_s / 2))
        state["store"] = AsyncFeatureStore(state["redis"], mode="lambda", method=feature_method,
                                           cache_ttl_s=feature_cache_s)
        state["scorer"] = AsyncScorer(settings, model=model, model_name=model_name, max_rows=max_rows)
        state["calibration"] = _Calibration(settings)
        try:
            yield
        finally:
            await state["scorer"].close()
            await state["redis"].aclose()

    app = FastAPI(title="ctrstream prediction API", version="1",
                  description="Ranks an ad request's candidates by calibrated pCTR "
                              "(lambda-merged features, ONNX model on Triton, River calibration).",
                  lifespan=lifespan)

    @app.middleware("http")
    async def timing(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        dt = time.perf_counter() - t0
        st = getattr(request.state, "timings", None)
        if st is not None:
            st["app"] = dt
            stage_hist.labels("app").observe(dt)
            response.headers["Server-Timing"] = ", ".join(
                f"{k};dur={v * 1000:.3f}" for k, v in st.items())
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        requests.labels("invalid").inc()
        errors = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()))
            errors.append({"loc": loc, "type": e.get("type"), "msg": e.get("msg")})
        msg = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:10])
        return JSONResponse(status_code=422, content={"detail": msg, "errors": errors[:50]})

    @app.post("/v1/predict", response_model=PredictResponse)
    async def predict(req: PredictRequest, request: Request) -> PredictResponse:
        h0 = time.perf_counter()
        t_ms = req.context.event_time_ms or int(time.time() * 1000)
        ctx = req.context.model_dump()
        cands = req.candidates
        reasons: list[str] = []
        columns = request_columns(req.user_id, ctx, [c.__dict__ for c in cands], t_ms)
        asm = await assemble_async(state["store"], columns, t_ms)
        if asm.degraded:
            reasons.append(asm.error or "feature store unavailable")
        res = await state["scorer"].score(asm.sparse, asm.dense)
        if res.degraded:
            reasons.append(f"model unavailable: {res.error}")
        t_cal = time.perf_counter()
        raw = res.raw.astype(np.float64)
        calibrated, calibration = state["calibration"].apply(raw, res.model_version, ctx) \
            if not res.degraded else (raw, "none")
        t_end = time.perf_counter()
        order = np.argsort(-calibrated, kind="stable")
        out = [ScoredCandidate(ad_id=cands[i].ad_id, campaign_id=cands[i].campaign_id,
                               advertiser_id=cands[i].advertiser_id,
                               ad_category=cands[i].ad_category, rank=r + 1,
                               raw_score=float(raw[i]), calibrated_score=float(calibrated[i]))
               for r, i in enumerate(order.tolist())]
        fr = asm.read
        timings = {"redis": fr.timings.get("redis", 0.0), "assembly": fr.timings.get("assembly", 0.0),
                   "triton": res.timings.get("triton", 0.0), "calibration": t_end - t_cal}
        timings["handler"] = time.perf_counter() - h0
        for k, v in timings.items():
            stage_hist.labels(k).observe(v)
        request.state.timings = timings
        degraded = bool(reasons)
        requests.labels("degraded" if degraded else "ok").inc()
        candidates_c.inc(len(cands))
        return PredictResponse(
            candidates=out, model_name=res.model_name, model_version=res.model_version,
            calibration=calibration, degraded=degraded, degraded_reasons=reasons,
            event_time_ms=t_ms, batch_version=fr.batch_version, batch_cutoff_ms=fr.cutoff_ms,
            newest_bucket_ms=fr.newest_bucket_ms, feature_staleness_ms=fr.staleness_ms)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        checks = {}
        try:
            checks["redis"] = bool(await state["redis"].ping())
        except Exception as e:  # noqa: BLE001
            checks["redis"] = False
            checks["redis_error"] = f"{type(e).__name__}: {e}"
        checks["model"] = await state["scorer"].ready()
        checks["model_name"] = state["scorer"].model_name
        ok = checks["redis"] and checks["model"]
        return JSONResponse(status_code=200 if ok else 503,
                            content={"status": "ready" if ok else "not ready", **checks})

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.state.ctr = state
    return app


__all__ = ["create_app", "PredictRequest", "PredictResponse", "MAX_CANDIDATES"]
