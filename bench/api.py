"""``ctrstream bench api``: open-loop load on the prediction API; latency vs throughput.

Requests are sent on a **fixed arrival schedule** (request ``i`` of a step at
``t0 + i / rate``) whatever the answers do - an open loop, so a slow server cannot slow the
load down and hide its own queueing (no coordinated omission). Latency is measured from each
request's *scheduled* time to its answer. Each step runs ``--duration`` seconds at one rate
(default 50, 100, 200, 300 rps) with ``--candidates`` candidates per request (default 100),
then waits at most ``--drain`` seconds for stragglers; the run stops by itself.

Where the time goes: the API returns a ``Server-Timing`` header per request (``redis``,
``assembly``, ``triton``, ``calibration``, ``handler``, ``app``); the benchmark aggregates it
with the client-side latency into

* ``redis``, ``assembly``, ``triton``, ``calibration`` - the handler's stages,
* ``framework`` = app - handler stages (request validation, response building, middleware),
* ``outside`` = client latency - app (HTTP parsing, event-loop queueing, the network and the
  load generator itself).

``--live-events-per-s N`` keeps writing N impressions per second into the speed view of the
benchmark's entities while the load runs (every flush interval, like the speed layer), so
the API's shared-entity cache is measured against a live speed view, not only a quiet one.

CPU per request (``cpu_api_ms``, ``cpu_redis_ms``, ``cpu_triton_ms``, ``cpu_loadgen_ms``):
user + system CPU of each process (Triton with its Python-backend stubs) over a step, per
request sent - on a 2-core machine they share the cores, so their sum bounds the rate.
``cache_hit_rate``: the API's shared-entity feature cache over the step (from ``/metrics``).

Set-up, unless told otherwise: with ``--isolated`` Redis and Triton are started on free
loopback ports in a temporary directory (stopped by PID at the end); otherwise the running
local stack (``ctrstream stack up``) is used. When the model is not ready on Triton a small
one with the model I/O contract is published (``ctrstream.models.publish``). Features of the
benchmark's own entities (ids from ``ID_BASE``, so no real entity is touched) are written to
the speed view (through the speed layer's writer) and to a batch view when none is served
(through the batch layer's writer). Without ``--url`` the API is started as a subprocess on a free loopback port.
Everything targets 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ctrstream import features as F

ID_BASE = 900_000_000
STAGES = ("redis", "assembly", "triton", "calibration")


# --------------------------------------------------------------------------- demo model


def demo_onnx_bytes(weights: np.ndarray | None = None, bias: float | None = None) -> bytes:
    """A tiny ONNX model with the model I/O contract: ``prob = sigmoid(dense @ w + b)`` (the
    sparse ids enter multiplied by zero, so both inputs are real graph inputs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (
        np.full((F.N_DENSE, 1), 0.01, dtype=np.float32)
        if weights is None
        else np.asarray(weights, dtype=np.float32).reshape(F.N_DENSE, 1)
    )
    b = np.array(
        [np.log(F.PRIOR.mean / (1 - F.PRIOR.mean)) if bias is None else bias], dtype=np.float32
    )
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "AX"),
        numpy_helper.from_array(np.array([0.0], dtype=np.float32), "ZERO"),
    ]
    nodes = [
        helper.make_node("MatMul", ["dense", "W"], ["z0"]),
        helper.make_node("Add", ["z0", "B"], ["z1"]),
        helper.make_node("Cast", ["sparse_ids"], ["sf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["sf", "AX"], ["ss"], keepdims=1),
        helper.make_node("Mul", ["ss", "ZERO"], ["s0"]),
        helper.make_node("Add", ["z1", "s0"], ["z"]),
        helper.make_node("Sigmoid", ["z"], [F.OUTPUT_PROB]),
    ]
    graph = helper.make_graph(
        nodes,
        "ctr_demo",
        [
            helper.make_tensor_value_info(F.INPUT_SPARSE, TensorProto.INT64, ["N", F.N_SPARSE]),
            helper.make_tensor_value_info(F.INPUT_DENSE, TensorProto.FLOAT, ["N", F.N_DENSE]),
        ],
        [helper.make_tensor_value_info(F.OUTPUT_PROB, TensorProto.FLOAT, ["N", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_demo_model(
    repo: Path, name: str, version: int = 1, weights=None, bias=None, max_batch_size: int = 1024
) -> Path:
    """Write the Python-backend model dir ``repo/name`` of a demo model without loading or
    verifying it (tests that need a model of given weights under a given name and version):
    ``version/model.onnx``, the real ``models/triton_model.py`` as ``version/model.py`` and
    the config ``ctrstream.models.publish`` writes for the Python flavour (latest version
    served). Returns the model dir; load it with Triton's ``load_model``."""
    from ctrstream.models.publish import TRITON_MODEL_PY, model_config

    d = Path(repo) / name
    (d / str(version)).mkdir(parents=True, exist_ok=True)
    (d / str(version) / "model.onnx").write_bytes(demo_onnx_bytes(weights, bias))
    shutil.copyfile(TRITON_MODEL_PY, d / str(version) / "model.py")
    (d / "config.pbtxt").write_text(
        model_config(
            name,
            "python",
            None,
            F.N_SPARSE,
            F.N_DENSE,
            max_batch_size=max_batch_size,
            instances=1,
            max_queue_delay_us=200,
            intra_op_threads=1,
        )
    )
    return d


def ensure_model(settings, base: str = "ctr_deep", log=print) -> str:
    """The served model name of ``base``, publishing the demo model first (with
    ``ctrstream.models.publish.publish``, the project's one publishing path) when none is
    ready."""
    import tritonclient.grpc as grpcclient

    from ctrstream.models import publish as pub

    name = pub.served_model_name(settings, base)
    client = grpcclient.InferenceServerClient(settings.triton.grpc_url)
    try:
        try:
            if client.is_model_ready(name):
                return name
        except Exception:  # noqa: BLE001 - not loaded or not reachable: publish reports it
            pass
    finally:
        client.close()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.onnx"
        path.write_bytes(demo_onnx_bytes())
        info = pub.publish(settings, path, base)
    log(f"published demo model {info}")
    return info.get("model_name", name)


# --------------------------------------------------------------------------- data


class Universe:
    def __init__(self, seed: int = 7, n_ads: int = 5000, n_users: int = 20000):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.n_ads = n_ads
        self.ads = ID_BASE + np.arange(n_ads)
        self.campaign = ID_BASE + rng.integers(0, max(1, n_ads // 10), n_ads)
        self.advertiser = ID_BASE + (self.campaign - ID_BASE) % max(1, n_ads // 50)
        self.category = ID_BASE + rng.integers(0, 30, n_ads)
        self.sites = ID_BASE + np.arange(50)
        self.users = ID_BASE + np.arange(n_users)

    def request(self, n_candidates: int) -> dict:
        rng = self.rng
        idx = rng.choice(self.n_ads, n_candidates, replace=False)
        return {
            "user_id": int(rng.choice(self.users)),
            "context": {
                "site_id": int(rng.choice(self.sites)),
                "device_type": str(rng.choice(["mobile", "desktop", "tablet"])),
                "country": str(rng.choice(["US", "DE", "FR", "GB"])),
                "position": int(rng.integers(0, 4)),
            },
            "candidates": [
                {
                    "ad_id": int(self.ads[i]),
                    "campaign_id": int(self.campaign[i]),
                    "advertiser_id": int(self.advertiser[i]),
                    "ad_category": int(self.category[i]),
                }
                for i in idx
            ],
        }


def _entity_index(name: str) -> int:
    return F.ENTITIES.index(F.ENTITY_BY_NAME[name])


class _CellColumns:
    """Speed-view cells of one entity collected as numpy columns (``SpeedCells``)."""

    def __init__(self, entity: str):
        self.entity = entity
        self.cols: dict[str, list] = {
            k: [] for k in ("parts", "res", "bucket", "imps", "clicks", "new")
        }

    def add(self, parts: tuple[int, ...], res: int, buckets, imps, clicks, new: bool) -> None:
        n = len(buckets)
        self.cols["parts"].append(np.tile(np.asarray(parts, np.int64), (n, 1)))
        self.cols["res"].append(np.full(n, res, np.int64))
        self.cols["bucket"].append(np.asarray(buckets, np.int64))
        self.cols["imps"].append(np.asarray(imps, np.int64))
        self.cols["clicks"].append(np.asarray(clicks, np.int64))
        self.cols["new"].append(np.full(n, new, bool))

    def cells(self):
        from ctrstream.store.speed_view import SpeedCells

        c = {k: np.concatenate(v) for k, v in self.cols.items()}
        return SpeedCells(
            _entity_index(self.entity),
            list(c["parts"].T),
            c["res"],
            c["bucket"],
            c["imps"],
            c["clicks"],
            c["new"],
        )


def seed_features(settings, uni: Universe, now_ms: int, log=print) -> dict:
    """Speed-view buckets for the universe's ads, campaigns, advertisers, sites,
    site x category and a slice of users, written by the speed layer's own writer
    (``ctrstream.store.speed_view.SpeedViewWriter``, absolute counts, the day hashes expiring
    after six hours); when no batch view is served, a batch view of the same counts (closed
    buckets up to a cut-off two hours back, plus long windows) written by the batch layer's
    own writer (``ctrstream.batch.views.write_batch_view``). Returns what was written."""
    import pyarrow as pa

    from ctrstream.store.batch_view import served_version
    from ctrstream.store.connection import redis_client
    from ctrstream.store.speed_view import SpeedViewWriter

    r = redis_client(settings, timeout_s=60.0)
    rng = np.random.default_rng(11)
    ents: list[tuple[str, tuple[int, ...]]] = []
    ents += [("ad", (int(a),)) for a in uni.ads]
    ents += [("campaign", (int(c),)) for c in np.unique(uni.campaign)]
    ents += [("advertiser", (int(a),)) for a in np.unique(uni.advertiser)]
    ents += [("site", (int(s),)) for s in uni.sites]
    ents += [
        ("site_x_category", (int(s), int(c))) for s in uni.sites for c in np.unique(uni.category)
    ]
    ents += [("user", (int(u),)) for u in uni.users[:2000]]
    served = served_version(r)
    cutoff = F.align_cutoff(now_ms - 2 * F.HOUR_MS)
    ttl_ms = 6 * 3600 * 1000
    bucket_rows: dict[str, list] = {
        k: [] for k in ("entity", "eid", "res", "bucket", "imps", "clicks")
    }
    long_rows: dict[str, list] = {k: [] for k in ("entity", "eid", "long_window", "imps", "clicks")}
    speed: dict[str, _CellColumns] = {}
    for ent, parts in ents:
        eid = F.entity_id(F.ENTITY_BY_NAME[ent], dict(zip(F.ENTITY_BY_NAME[ent].fields, parts)))
        cols = speed.get(ent) or speed.setdefault(ent, _CellColumns(ent))
        for k, res in enumerate(F.RESOLUTIONS):
            buckets = list(F.window_buckets(now_ms, res))
            imps = rng.poisson(20, len(buckets))
            clicks = rng.binomial(imps, 0.02)
            cols.add(parts, k, buckets, imps, clicks, new=True)  # new: every day hash gets the TTL
            if served is None:
                for b, i, c in zip(buckets, imps, clicks):
                    if (b + 1) * res.bucket_ms <= cutoff:
                        for col, v in zip(bucket_rows, (ent, eid, res.name, b, int(i), int(c))):
                            bucket_rows[col].append(v)
        if served is None:
            for w in F.LONG_WINDOWS:
                for col, v in zip(
                    long_rows, (ent, eid, w.name, int(rng.poisson(5000)), int(rng.poisson(100)))
                ):
                    long_rows[col].append(v)
    with SpeedViewWriter(settings, hash_ttl_ms=ttl_ms) as writer:
        writer.write([c.cells() for c in speed.values()])
    version = None
    if served is None:
        from ctrstream.batch.point_in_time import BUCKET_COUNTS_SCHEMA, LONG_COUNTS_SCHEMA
        from ctrstream.batch.views import write_batch_view

        buckets_t = pa.table(bucket_rows).cast(BUCKET_COUNTS_SCHEMA)
        longs_t = pa.table(long_rows).cast(LONG_COUNTS_SCHEMA)
        version = write_batch_view(settings, buckets_t, longs_t, cutoff, r=r, ttl_ms=ttl_ms)[
            "version"
        ]
    r.close()
    log(
        f"seeded {len(ents)} entities x {len(F.RESOLUTIONS)} resolutions"
        + (
            f"; batch view {version} cut-off {cutoff}"
            if version
            else "; batch view: the served one"
        )
    )
    return {"entities": len(ents), "batch_version": version or served}


class LiveSpeedWriter:
    """Stands in for the speed layer while the load runs (``--live-events-per-s``): every
    flush interval it counts ``events_per_s x interval`` random impressions of the universe
    into the current bucket of every resolution of their shared entities (ad, campaign,
    advertiser, site, site x category) and writes the absolute counts of the changed cells
    through the speed layer's writer - speed-view writes that Redis reports to the API's
    cache, as in a live system. A cell's count starts from what the speed view holds when the
    writer first touches it (the seeded counts of the current buckets)."""

    SHARED = ("ad", "campaign", "advertiser", "site", "site_x_category")

    def __init__(self, settings, uni: Universe, events_per_s: float, interval_s: float):
        import threading

        self.settings, self.uni = settings, uni
        self.events_per_s, self.interval_s = float(events_per_s), float(interval_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-speed-writer", daemon=True)
        self.events = 0
        self.flushes = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        from ctrstream.store.connection import redis_client
        from ctrstream.store.speed_view import SpeedViewWriter, read_speed_cells

        r = redis_client(self.settings, timeout_s=30.0)
        writer = SpeedViewWriter(self.settings, hash_ttl_ms=6 * 3600 * 1000)
        rng = np.random.default_rng(3)
        uni = self.uni
        cats = uni.category
        # (entity, id parts, resolution index, bucket) -> [impressions, clicks]
        counts: dict[tuple[str, tuple[int, ...], int, int], list[int]] = {}
        try:
            while not self._stop.wait(self.interval_s):
                now = int(time.time() * 1000)
                n = int(rng.poisson(self.events_per_s * self.interval_s))
                idx = rng.integers(0, uni.n_ads, n)
                sites = rng.choice(uni.sites, n)
                current = [now // res.bucket_ms for res in F.RESOLUTIONS]
                added: dict[tuple[str, tuple[int, ...], int, int], int] = {}
                for i, site in zip(idx.tolist(), sites.tolist()):
                    for ent, parts in (
                        ("ad", (int(uni.ads[i]),)),
                        ("campaign", (int(uni.campaign[i]),)),
                        ("advertiser", (int(uni.advertiser[i]),)),
                        ("site", (site,)),
                        ("site_x_category", (site, int(cats[i]))),
                    ):
                        for k, b in enumerate(current):
                            cell = (ent, parts, k, b)
                            added[cell] = added.get(cell, 0) + 1
                # closed buckets are never written again
                counts = {c: v for c, v in counts.items() if c[3] == current[c[2]]}
                fresh = [c for c in added if c not in counts]
                if fresh:
                    addr = [
                        (
                            e,
                            F.entity_id(
                                F.ENTITY_BY_NAME[e], dict(zip(F.ENTITY_BY_NAME[e].fields, p))
                            ),
                            F.RESOLUTIONS[k].name,
                            t,
                            b,
                        )
                        for e, p, k, b in fresh
                        for t in F.EVENT_TYPES
                    ]
                    held = read_speed_cells(r, addr)
                    for j, c in enumerate(fresh):
                        counts[c] = [held[2 * j], held[2 * j + 1]]
                cols = {e: _CellColumns(e) for e in self.SHARED}
                for c, v in added.items():
                    counts[c][0] += v
                    cols[c[0]].add(
                        c[1], c[2], [c[3]], [counts[c][0]], [counts[c][1]], new=c in fresh
                    )
                writer.write([cc.cells() for cc in cols.values() if cc.cols["res"]])
                writer.drain()
                self.events += n
                self.flushes += 1
        finally:
            writer.close()
            r.close()


# --------------------------------------------------------------------------- load


def _parse_server_timing(h: str | None) -> dict[str, float]:
    out: dict[str, float] = {}
    if not h:
        return out
    for part in h.split(","):
        name, _, rest = part.strip().partition(";dur=")
        try:
            out[name] = float(rest) / 1000.0
        except ValueError:
            pass
    return out


async def _one(session, url, body: bytes, scheduled: float, loop, rec: list):
    sent = loop.time()
    try:
        async with session.post(
            url, data=body, headers={"content-type": "application/json"}
        ) as resp:
            payload = await resp.read()
            done = loop.time()
            degraded = False
            if resp.status == 200:
                degraded = b'"degraded":true' in payload
            rec.append(
                (
                    done - scheduled,
                    sent - scheduled,
                    resp.status,
                    degraded,
                    _parse_server_timing(resp.headers.get("Server-Timing")),
                )
            )
    except Exception as e:  # noqa: BLE001 - timeouts and connection errors are errors
        rec.append((loop.time() - scheduled, sent - scheduled, type(e).__name__, False, {}))


async def run_step(
    url: str, bodies: list[bytes], rate: float, duration: float, drain: float, timeout: float
) -> tuple[list, float]:
    import aiohttp

    loop = asyncio.get_running_loop()
    rec: list = []
    n = max(1, int(rate * duration))
    conn = aiohttp.TCPConnector(limit=1024, force_close=False)
    tmo = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=conn, timeout=tmo) as session:
        t0 = loop.time() + 0.05
        tasks = []
        for i in range(n):
            target = t0 + i / rate
            delay = target - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(
                asyncio.create_task(_one(session, url, bodies[i % len(bodies)], target, loop, rec))
            )
        done, pending = await asyncio.wait(tasks, timeout=drain)
        for t in pending:
            t.cancel()
        elapsed = loop.time() - t0
    lost = n - len(rec)
    for _ in range(lost):
        rec.append((drain, 0.0, "not answered", False, {}))
    return rec, elapsed


def summarize(rate: float, rec: list, elapsed: float) -> dict:
    lat = np.array([r[0] for r in rec]) * 1000
    ok = np.array([r[2] == 200 for r in rec])
    lag = np.array([r[1] for r in rec]) * 1000
    okl = lat[ok] if ok.any() else np.array([np.nan])
    row = {
        "rate_rps": rate,
        "sent": len(rec),
        "achieved_rps": round(ok.sum() / elapsed, 1),
        "p50_ms": float(np.percentile(okl, 50)),
        "p95_ms": float(np.percentile(okl, 95)),
        "p99_ms": float(np.percentile(okl, 99)),
        "max_ms": float(np.max(okl)),
        "errors": int((~ok).sum()),
        "degraded": int(sum(1 for r in rec if r[3])),
        "send_lag_p99_ms": float(np.percentile(lag, 99)),
    }
    st = [r[4] for r in rec if r[2] == 200 and r[4]]
    if st:

        def mean(k):
            return float(np.mean([s.get(k, 0.0) for s in st]) * 1000)

        for k in STAGES:
            row[f"{k}_ms"] = mean(k)
        handler_stages = sum(row[f"{k}_ms"] for k in STAGES)
        row["framework_ms"] = mean("app") - handler_stages
        row["outside_ms"] = float(
            np.mean([r[0] - r[4].get("app", 0.0) for r in rec if r[2] == 200 and r[4]]) * 1000
        )
        row["app_p99_ms"] = float(np.percentile([s.get("app", 0.0) for s in st], 99) * 1000)
    errs: dict[str, int] = {}
    for r in rec:
        if r[2] != 200:
            errs[str(r[2])] = errs.get(str(r[2]), 0) + 1
    row["error_kinds"] = json.dumps(errs) if errs else ""
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    from ctrstream.plots import pyplot

    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = [r["achieved_rps"] for r in rows]
    for q, m in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        a.plot(x, [r[q] for r in rows], m, label=q.replace("_ms", ""))
    a.axhline(25, color="red", ls="--", lw=1, label="25 ms target")
    a.set_xlabel("achieved throughput (requests/s)")
    a.set_ylabel("latency (ms, from scheduled send)")
    a.set_yscale("log")
    a.legend()
    a.grid(alpha=0.3)
    a.set_title(title)
    parts = [*STAGES, "framework", "outside"]
    bottom = np.zeros(len(rows))
    labels = [str(int(r["rate_rps"])) for r in rows]
    for p in parts:
        v = np.array([r.get(f"{p}_ms", 0.0) for r in rows])
        b.bar(labels, v, bottom=bottom, label=p)
        bottom += v
    b.set_xlabel("offered rate (requests/s)")
    b.set_ylabel("mean ms per request")
    b.set_title("where the time goes")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CPU and cache


class CpuMeter:
    """CPU time per request of each process taking part (the API, Redis, Triton with its
    Python-backend stubs, this load generator): on a 2-core machine they all share the cores,
    so this - not only latency - says where the time goes."""

    def __init__(self, pids: dict[str, int | None]):
        self.pids = {k: v for k, v in pids.items() if v}
        self.pids["loadgen"] = os.getpid()
        self._at: dict[str, float] = {}

    def _cpu(self, k: str, pid: int) -> float:
        # the load generator started the API (and an isolated stack): itself only
        from ctrstream.bench.common import process_cpu_s

        return process_cpu_s(pid, descendants=(k != "loadgen"))

    def start(self) -> None:
        self._at = {k: self._cpu(k, p) for k, p in self.pids.items()}

    def per_request_ms(self, n: int) -> dict[str, float]:
        return {
            f"cpu_{k}_ms": (self._cpu(k, p) - self._at.get(k, 0.0)) / max(n, 1) * 1000
            for k, p in self.pids.items()
        }


def _cache_counts(url: str) -> tuple[float, float] | None:
    """(hits, misses) of the API's shared-entity feature cache from /metrics."""
    import httpx

    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    got = {"hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        if line.startswith("ctrstream_api_feature_cache_total{"):
            for k in got:
                if f'result="{k}"' in line:
                    got[k] = float(line.rsplit(" ", 1)[1])
    return got["hit"], got["miss"]


# --------------------------------------------------------------------------- main


def _ratios(rows: list[dict]) -> dict[str, float]:
    """Per rate: the cluster's p99 over the single Redis' p99 (the median of each over the
    repeated steps)."""
    out = {}
    for rate in sorted({r["rate_rps"] for r in rows}):
        one = [r["p99_ms"] for r in rows if r["rate_rps"] == rate and r["redis"] == "single"]
        many = [r["p99_ms"] for r in rows if r["rate_rps"] == rate and r["redis"] != "single"]
        if one and many:
            out[f"{rate:g}"] = float(np.median(many) / np.median(one))
    return out


def _start_api(args, settings, model_name: str, tmp: str | None):
    """Start ``ctrstream serve`` on a free loopback port for ``settings``; (process, url)."""
    from ctrstream.stack.manager import settings_env
    from ctrstream.stack.procs import start_job
    from ctrstream.stack.services import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tmp or tempfile.gettempdir()) / f"bench-api-{port}.log"
    proc = start_job(
        [
            sys.executable,
            "-m",
            "ctrstream",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model-name",
            model_name,
            "--feature-method",
            args.feature_method,
            "--workers",
            str(args.api_workers),
            *(
                []
                if args.feature_cache_s is None
                else ["--feature-cache-s", str(args.feature_cache_s)]
            ),
            *(["--no-feature-tracking"] if args.no_feature_tracking else []),
        ],
        env={**os.environ, **settings_env(settings)},
        log_path=log_path,
    )
    print(f"API PID {proc.pid} on {url} (log {log_path})")
    _wait_ready(url, 60, proc)
    return proc, url


def _wait_ready(url: str, timeout: float, proc=None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the API exited with code {proc.returncode} during start-up")
        try:
            r = httpx.get(url + "/readyz", timeout=2)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"API at {url} not ready after {timeout:.0f}s: {last}")


def main(argv: list[str] | None = None) -> int:
    from ctrstream.bench.common import print_table, results_dir, write_results
    from ctrstream.config import get_settings
    from ctrstream.stack.manager import Stack, isolated_settings
    from ctrstream.stack.procs import stop_job

    ap = argparse.ArgumentParser(prog="ctrstream bench api", description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running API (http://127.0.0.1:PORT); default: start one")
    ap.add_argument("--rates", default="50,100,200,300", help="offered rates, requests/s")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds at the lowest rate first")
    ap.add_argument("--drain", type=float, default=10.0, help="seconds to wait for stragglers")
    ap.add_argument("--timeout", type=float, default=5.0, help="client timeout per request")
    ap.add_argument("--model", default="ctr_deep")
    ap.add_argument(
        "--isolated",
        action="store_true",
        help="start Redis + Triton on free ports in a temp dir (stopped at the end)",
    )
    ap.add_argument("--no-seed", action="store_true", help="do not write benchmark features")
    ap.add_argument(
        "--live-events-per-s",
        type=float,
        default=0.0,
        help="while the load runs, write this many impressions per second into the "
        "speed view of the benchmark's entities every flush interval (a live "
        "speed layer: invalidates the API's cache); 0: a quiet speed view",
    )
    ap.add_argument(
        "--no-feature-tracking",
        action="store_true",
        help="the API's cache by TTL only (no Redis invalidation reports)",
    )
    ap.add_argument("--feature-method", default="script", choices=["script", "pipeline"])
    ap.add_argument(
        "--feature-cache-s",
        type=float,
        default=None,
        help="the API's shared-entity feature cache TTL (0: every request reads Redis; "
        "default and maximum: the speed layer's flush interval)",
    )
    ap.add_argument(
        "--api-workers",
        type=int,
        default=1,
        help="API worker processes when the benchmark starts the API "
        "(ctrstream serve --workers; default 1: on 2 cores shared with Redis and "
        "Triton a second worker measured worse - two caches, more contention)",
    )
    ap.add_argument(
        "--redis-cluster",
        type=int,
        default=0,
        help="also run the API against a Redis Cluster of this many masters (a replica "
        "each), started for the run and holding the same data, and report each rate's p99 "
        "next to the single Redis' p99 measured in the same run (alternating steps); needs "
        "--isolated",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="steps per rate and topology (alternating single / cluster with --redis-cluster)",
    )
    ap.add_argument("--name", default="api", help="results file name (bench/results/NAME.json/png)")
    args = ap.parse_args(argv)
    if args.redis_cluster and not args.isolated:
        print(
            "error: --redis-cluster starts its own cluster next to an isolated Redis: "
            "add --isolated",
            file=sys.stderr,
        )
        return 2
    if args.redis_cluster and args.url:
        print("error: --redis-cluster starts its own APIs: leave out --url", file=sys.stderr)
        return 2
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        print(
            "error: the load generator only targets loopback (http://127.0.0.1:PORT)",
            file=sys.stderr,
        )
        return 2

    settings = get_settings()
    stack = None
    tmp = None
    api_proc = None
    cluster_api = None
    cluster_cm = None
    try:
        if args.isolated:
            tmp = tempfile.mkdtemp(prefix="ctr-bench-api-")
            settings = isolated_settings(Path(tmp), settings)
            stack = Stack(settings)
            stack.up(only=["redis", "triton"], log=print)
        uni = Universe()
        now_ms = int(time.time() * 1000)
        model_name = ensure_model(settings, args.model)
        seeded = None if args.no_seed else seed_features(settings, uni, now_ms)
        url = args.url
        if url is None:
            api_proc, url = _start_api(args, settings, model_name, tmp)
        else:
            _wait_ready(url, 10)
        targets = [("single", url)]
        if args.redis_cluster:
            from ctrstream.stack.manager import isolated_redis_cluster
            from ctrstream.store.cluster import copy_to_cluster
            from ctrstream.store.connection import redis_client

            cluster_cm = isolated_redis_cluster(None, masters=args.redis_cluster, log=print)
            csettings = settings.model_copy(update={"redis": cluster_cm.__enter__().redis})
            src = redis_client(settings, timeout_s=60.0)
            copied = copy_to_cluster(src, csettings)
            src.close()
            print(f"copied {copied} keys into the {args.redis_cluster}-master cluster")
            cluster_api, curl = _start_api(args, csettings, model_name, tmp)
            targets.append((f"cluster-{args.redis_cluster}", curl))
        bodies = [json.dumps(uni.request(args.candidates)).encode() for _ in range(500)]
        if args.warmup > 0:
            for _, u in targets:
                asyncio.run(
                    run_step(
                        u.rstrip("/") + "/v1/predict",
                        bodies,
                        min(rates),
                        args.warmup,
                        args.drain,
                        args.timeout,
                    )
                )
        rows = []
        svc_pid = {}
        try:
            st = stack or Stack(settings)
            svc_pid = {name: st.by_name(name).pid() for name in ("redis", "triton")}
        except Exception:  # noqa: BLE001 - no local stack: CPU of the API and load generator only
            pass
        writer = None
        if args.live_events_per_s > 0:
            writer = LiveSpeedWriter(
                settings, uni, args.live_events_per_s, settings.flush_interval_ms / 1000.0
            )
            writer.start()
        for rate in rates:
            for _rep in range(max(1, args.repeat)):
                for topo, u in targets:  # alternating: both see the same machine load
                    api_pid = api_proc if topo == "single" else cluster_api
                    meter = CpuMeter(
                        {
                            "api": api_pid.pid if api_pid is not None else None,
                            **(svc_pid if topo == "single" else {}),
                        }
                    )
                    before = _cache_counts(u)
                    meter.start()
                    rec, elapsed = asyncio.run(
                        run_step(
                            u.rstrip("/") + "/v1/predict",
                            bodies,
                            rate,
                            args.duration,
                            args.drain,
                            args.timeout,
                        )
                    )
                    row = summarize(rate, rec, elapsed)
                    row["redis"] = topo
                    row.update(meter.per_request_ms(len(rec)))
                    after = _cache_counts(u)
                    if before and after and sum(after) > sum(before):
                        row["cache_hit_rate"] = (after[0] - before[0]) / (sum(after) - sum(before))
                    rows.append(row)
                    print(
                        f"{topo:>10} {rate:6.0f} rps: p50 {row['p50_ms']:.1f} ms  "
                        f"p99 {row['p99_ms']:.1f} ms  redis {row.get('redis_ms', 0):.2f} ms  "
                        f"errors {row['errors']}  degraded {row['degraded']}",
                        flush=True,
                    )
        if writer is not None:
            writer.stop()
        cols = [
            *(["redis"] if args.redis_cluster else []),
            "rate_rps",
            "achieved_rps",
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "errors",
            "degraded",
            *[f"{k}_ms" for k in STAGES],
            "framework_ms",
            "outside_ms",
            "send_lag_p99_ms",
            "cache_hit_rate",
            *[f"cpu_{k}_ms" for k in ("api", "redis", "triton", "loadgen")],
        ]
        print_table(f"prediction API, {args.candidates} candidates/request, open loop", rows, cols)
        meta = {
            "candidates": args.candidates,
            "duration_s": args.duration,
            "rates": rates,
            "model": model_name,
            "url": url,
            "isolated": args.isolated,
            "api_workers": None if args.url else args.api_workers,
            "seeded": seeded,
            "feature_method": args.feature_method,
            "feature_cache_s": (
                args.feature_cache_s
                if args.feature_cache_s is not None
                else settings.flush_interval_ms / 1000.0
            ),
            "feature_tracking": not args.no_feature_tracking,
            "live_events_per_s": args.live_events_per_s,
            "live_events_written": writer.events if writer is not None else 0,
            "target": "p99 <= 25 ms at 200 rps"
            + (
                f"; p99 on {args.redis_cluster} masters <= 1.5x the single Redis' p99"
                if args.redis_cluster
                else ""
            ),
            "redis_cluster_masters": args.redis_cluster,
            "p99_ratio_cluster_vs_single": _ratios(rows) if args.redis_cluster else None,
            "latency": "from each request's scheduled send time (open loop)",
        }
        if args.redis_cluster:
            for rate, ratio in meta["p99_ratio_cluster_vs_single"].items():
                print(f"p99 cluster / single at {rate} rps: {ratio:.2f} (target <= 1.5)")
        path = write_results(args.name, rows, meta)
        png = results_dir() / f"{args.name}.png"
        plot(
            [r for r in rows if r.get("redis", "single") == "single"],
            png,
            f"/v1/predict, {args.candidates} candidates",
        )
        print(f"wrote {path} and {png}")
        return 0
    finally:
        if api_proc is not None:
            stop_job(api_proc)
        if cluster_api is not None:
            stop_job(cluster_api)
        if cluster_cm is not None:
            cluster_cm.__exit__(None, None, None)
        if stack is not None:
            stack.down()
