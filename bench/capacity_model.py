"""The capacity model: measured per-core figures -> machines per tier at internet scale.

``ctrstream bench capacity --plan`` runs it; ``docs/capacity.md`` is its output. Every input
is a :class:`Figure` that names where it came from: a benchmark's JSON under
``bench/results/`` (file, row, the command that writes it), a published figure (its
address), or a stated assumption (:class:`Assumptions`, each overridable). The model is
arithmetic only - no I/O besides reading those files - so that the tests can check that it
computes what the doc says and that a changed input changes the output.

Sizing rule, every CPU tier: ``units = ceil(load / (capacity_per_unit x utilization))``
with ``utilization`` the planned busy fraction at peak (the headroom: 1 / utilization).
Memory: Redis holds ``bytes per hash x hashes`` for every view, times the measured ratio of
``used_memory`` to the sum of the hashes' ``MEMORY USAGE``, on machines whose RAM is filled
only to ``redis_memory_fill`` (fork copy-on-write for snapshots and replica syncs).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DAY_S = 86_400

# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Figure:
    """One input figure and where it comes from."""

    value: float
    unit: str
    kind: str  # measured | published | assumed | derived
    source: str  # a file under bench/results/, an address, or "assumption"
    origin: str  # the command that produced it (or the citation / the reason)
    detail: str = ""  # which row / cell

    def cite(self) -> str:
        where = f"`{self.source}`" if self.kind == "measured" else self.source
        row = f" ({self.detail})" if self.detail else ""
        return f"{self.kind}: {where}{row}; {self.origin}"


@dataclass(frozen=True)
class Assumptions:
    """The traffic, the machine shape and the headroom the plan is computed for. Every field
    is stated in the doc; ``ctrstream bench capacity --plan --set name=value`` changes one."""

    events_per_s: float = 1_000_000.0  # impressions + clicks into Kafka
    requests_per_s: float = 100_000.0  # prediction requests
    candidates: int = 100  # ads scored per request
    utilization: float = 0.6  # planned busy fraction of a core at peak (headroom 1/0.6)
    machine_cores: int = 32
    machine_ram_gb: float = 128.0
    redis_shards_per_machine: int = 8  # single-threaded masters + replicas per machine
    redis_memory_fill: float = 0.5  # of a Redis machine's RAM (fork copy-on-write headroom)
    redis_shard_max_gb: float = 25.0  # data per shard: bounds resync and failover times
    redis_replicas: int = 1  # per master
    kafka_replication: int = 3
    kafka_consumer_groups: int = 3  # readers of every raw record: features, join, archiver
    kafka_nic_gbit: float = 25.0
    kafka_retention_days: float = 3.0
    # the internet-scale audience, per day (not measured: stated)
    users_per_day: float = 500e6
    ads_per_day: float = 5e6
    campaigns_per_day: float = 500e3
    advertisers_per_day: float = 50e3
    sites_per_day: float = 2e6
    categories_per_site: float = 12.0  # distinct ad categories a site shows in a day
    ads_per_user_day: float = 40.0  # distinct ads one user sees in a day
    advertisers_per_user_day: float = 15.0
    speed_days_held: float = 2.0  # today's day hash and yesterday's, until its TTL
    batch_entities_factor: float = 1.5  # entities in a 7-day batch view / daily actives
    batch_versions_held: float = 2.0  # served + the one being written
    batch_cross_share: float = 1.0  # of the crossed user entities the batch view keeps
    batch_window_h: float = 6.0  # the daily recompute must finish within this
    spark_executor_cores: int = 32

    def with_overrides(self, pairs: list[str]) -> Assumptions:
        """``name=value`` pairs -> a copy with those fields changed (a clear error for an
        unknown name or a value of the wrong type)."""
        known = {f.name: f for f in fields(self)}
        changes: dict[str, Any] = {}
        for pair in pairs:
            name, sep, value = pair.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in known:
                raise ValueError(
                    f"--set {pair!r}: expected NAME=VALUE with NAME one of {', '.join(known)}"
                )
            typ = int if known[name].type in (int, "int") else float
            try:
                changes[name] = typ(float(value))
            except ValueError:
                raise ValueError(f"--set {pair!r}: {value!r} is not a number") from None
            if changes[name] < 0 or (changes[name] == 0 and name not in ZERO_ALLOWED):
                raise ValueError(f"--set {pair!r}: the value must be positive")
        return replace(self, **changes)


ZERO_ALLOWED = frozenset({"batch_cross_share", "redis_replicas"})
CROSSES = ("user_x_ad", "user_x_advertiser")

# The published Triton figure the GPU row falls back to when no GPU run of
# `ctrstream bench inference` exists (none did when the plan was written).
PUBLISHED_GPU = Figure(
    740_000.0,
    "rows/s per GPU",
    "published",
    "https://github.com/NVIDIA/DeepLearningExamples/blob/master/PyTorch/Recommendation/DLRM/triton/README.md",
    "NVIDIA DeepLearningExamples, DLRM on Triton, TorchScript FP16, one V100-32G",
    "batch 1024: 740k samples/s, p99 1.54 ms (a larger net than ours; an H100 is faster: conservative)",
)


def _load(results: Path, name: str, command: str) -> dict:
    path = results / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the capacity model needs it. Run `{command}` first "
            f"(or point --results at the folder that holds it)."
        )
    return json.loads(path.read_text())


def _rows(doc: dict, name: str) -> list[dict]:
    rows = doc.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{name} has no rows: rerun the benchmark that writes it")
    return rows


def _pick(rows: list[dict], name: str, what: str, pred) -> dict:
    got = [r for r in rows if pred(r)]
    if not got:
        raise ValueError(f"{name} has no row with {what}: rerun the benchmark that writes it")
    return got[0]


def load_inputs(results: Path) -> dict[str, Figure]:
    """Every measured input of the model, read from ``results`` (``bench/results``)."""
    results = Path(results)
    src = lambda n: f"bench/results/{n}"  # noqa: E731 - the name every figure cites
    out: dict[str, Figure] = {}

    # Kafka: replay.json (produce), capacity.json (broker CPU, consume)
    rp = _load(results, "replay.json", "ctrstream bench replay")
    rows = _rows(rp, "replay.json")
    prod = _pick(
        rows, "replay.json", "mode 'produce only'", lambda r: r.get("mode") == "produce only"
    )
    meta = rp.get("meta", {})
    out["kafka_produce_rec_s"] = Figure(
        prod["rec_per_s"], "records/s per producer", "measured", src("replay.json"),
        "ctrstream bench replay", "mode 'produce only'",
    )  # fmt: skip
    out["record_bytes"] = Figure(
        meta["bytes"] / meta["records"], "bytes/record", "measured", src("replay.json"),
        "ctrstream bench replay", "meta bytes / records",
    )  # fmt: skip
    out["click_share"] = Figure(
        meta["clicks"] / meta["records"], "clicks/record", "measured", src("replay.json"),
        "ctrstream bench replay (generator, scenario steady)", "meta clicks / records",
    )  # fmt: skip

    cap = _load(results, "capacity.json", "ctrstream bench capacity")
    crows = _rows(cap, "capacity.json")
    cmd = "ctrstream bench capacity"
    kp = _pick(
        crows, "capacity.json", "row 'kafka produce'", lambda r: r.get("row") == "kafka produce"
    )
    kc = _pick(
        crows, "capacity.json", "row 'kafka consume'", lambda r: r.get("row") == "kafka consume"
    )
    out["broker_us_produce"] = Figure(
        kp["broker_us_per_record"], "broker CPU us/record produced (RF 1)", "measured",
        src("capacity.json"), cmd, "row 'kafka produce'",
    )  # fmt: skip
    out["broker_us_consume"] = Figure(
        kc["broker_us_per_record"], "broker CPU us/record consumed", "measured",
        src("capacity.json"), cmd, "row 'kafka consume'",
    )  # fmt: skip
    out["consume_rec_s"] = Figure(
        kc["rec_per_s"], "records/s per consumer process", "measured", src("capacity.json"),
        cmd, "row 'kafka consume'",
    )  # fmt: skip

    # speed layer: capacity.json, single node, one process
    sp = _pick(
        crows, "capacity.json", "a speed row with masters 1 and processes 1",
        lambda r: r.get("masters") == 1 and r.get("processes") == 1 and "events_per_s" in r,
    )  # fmt: skip
    det = f"row {sp['row']!r}"
    out["speed_events_s"] = Figure(
        sp["events_per_s"], "events/s per features process", "measured", src("capacity.json"),
        cmd, det,
    )  # fmt: skip
    out["speed_job_us"] = Figure(
        sp["job_us_per_event"], "job CPU us/event", "measured", src("capacity.json"), cmd, det
    )
    out["redis_write_us"] = Figure(
        sp["redis_cpu_us_per_event"], "Redis process CPU us/event (all masters)", "measured",
        src("capacity.json"), cmd, det + " redis_cpu_us_per_event (INFO cpu)",
    )  # fmt: skip
    out["redis_write_cmd_us"] = Figure(
        sp["redis_us_per_event"], "Redis command us/event (all masters)", "measured",
        src("capacity.json"), cmd, det + " redis_us_per_event (INFO commandstats)",
    )  # fmt: skip

    # the same job on a Redis Cluster (optional: absent where no cluster was measured)
    cl = [
        r
        for r in crows
        if (r.get("masters") or 0) > 1 and r.get("processes") == 1 and "events_per_s" in r
    ]
    if cl:
        c = max(cl, key=lambda r: r["masters"])
        det = f"row {c['row']!r}"
        out["redis_write_us_cluster"] = Figure(
            c["redis_cpu_us_per_event"], f"Redis CPU us/event, sum over {c['masters']} masters",
            "measured", src("capacity.json"), cmd, det,
        )  # fmt: skip
        out["redis_write_us_busiest"] = Figure(
            c["busiest_master_cpu_us_per_event"],
            f"Redis CPU us/event, busiest of {c['masters']} masters", "measured",
            src("capacity.json"), cmd, det + " busiest_master_cpu_us_per_event",
        )  # fmt: skip

    # read path and API: the API bench's highest rate (most amortized) row
    api = _load(results, "api.json", "ctrstream bench api")
    # the single-node rows (a cluster step, where the API bench ran one, has no Redis CPU)
    arows = [
        r
        for r in _rows(api, "api.json")
        if r.get("redis", "single") == "single"
        and r.get("cpu_api_ms") is not None
        and r.get("cpu_redis_ms") is not None
    ]
    if not arows:
        raise ValueError(
            "api.json has no single-node row with cpu_api_ms and cpu_redis_ms: rerun "
            "`ctrstream bench api --isolated`"
        )
    top = max(arows, key=lambda r: r["rate_rps"])
    det = f"rate_rps {top['rate_rps']:g}, {api.get('meta', {}).get('candidates', '?')} candidates"
    out["api_cpu_us"] = Figure(
        top["cpu_api_ms"] * 1000, "API process CPU us/request", "measured", src("api.json"),
        "ctrstream bench api", det + " cpu_api_ms",
    )  # fmt: skip
    out["redis_read_us"] = Figure(
        top["cpu_redis_ms"] * 1000, "Redis CPU us/request", "measured", src("api.json"),
        "ctrstream bench api",
        det + f" cpu_redis_ms (shared-entity cache hit rate {top.get('cache_hit_rate', 0):.2f})",
    )  # fmt: skip

    # Triton: CPU figures measured here; the GPU one from a GPU run if any, else published
    inf = _load(results, "inference.json", "ctrstream bench inference")
    heads = inf.get("meta", {}).get("headline", [])
    h64 = [h for h in heads if h.get("batch") == 64 and h.get("triton_rows_per_cpu_s")]
    if not h64:
        raise ValueError(
            "inference.json has no batch-64 headline: rerun `ctrstream bench inference`"
        )
    best = max(h64, key=lambda h: h["triton_rows_per_cpu_s"])
    out["triton_cpu_rows"] = Figure(
        best["triton_rows_per_cpu_s"], "rows per CPU-second (Triton on CPU)", "measured",
        src("inference.json"), "ctrstream bench inference",
        f"headline {best['model']} batch 64 triton_rows_per_cpu_s ({best['triton_best_cpu']})",
    )  # fmt: skip
    gpu = inf.get("meta", {}).get("gpu")
    if gpu:
        g = [h for h in heads if h.get("triton_rows_per_s")]
        bestg = max(g, key=lambda h: h["triton_rows_per_s"])
        out["triton_gpu_rows"] = Figure(
            bestg["triton_rows_per_s"], "rows/s per GPU", "measured", src("inference.json"),
            "ctrstream bench inference --device gpu",
            f"headline {bestg['model']} batch {bestg['batch']} on {inf['meta'].get('device_label')}",
        )  # fmt: skip
    else:
        out["triton_gpu_rows"] = PUBLISHED_GPU

    # memory: capacity-memory.json
    mem = _load(results, "capacity-memory.json", "ctrstream bench capacity")
    mrows = _rows(mem, "capacity-memory.json")
    mcmd = "ctrstream bench capacity (memory phase)"
    for r in mrows:
        if r.get("view") == "speed":
            out[f"speed_hash:{r['family']}"] = Figure(
                r["bytes_mean"], f"bytes/day hash ({r['fields_mean']:.1f} fields, "
                f"{r['events_per_hash']:.1f} events/hash)", "measured",
                src("capacity-memory.json"), mcmd, f"speed view, family {r['family']}",
            )  # fmt: skip
        elif r.get("view") == "speed-fit":
            out[f"field_cost:{r['encoding']}"] = Figure(
                r["per_field_bytes"], f"bytes/field (+ {r['base_bytes']:.0f} B per hash)",
                "measured", src("capacity-memory.json"), mcmd,
                f"least squares over {r['hashes']} {r['encoding']} hashes",
            )  # fmt: skip
            out[f"field_base:{r['encoding']}"] = Figure(
                r["base_bytes"], "bytes per hash (intercept)", "measured",
                src("capacity-memory.json"), mcmd, f"{r['encoding']} fit",
            )  # fmt: skip
        elif r.get("view") == "batch":
            out[f"batch_entity:{r['family']}"] = Figure(
                r["bytes_per_entity"], f"bytes/entity ({r['keys_per_entity']:.1f} hashes)",
                "measured", src("capacity-memory.json"), mcmd, f"batch view, family {r['family']}",
            )  # fmt: skip
        elif r.get("view") == "server":
            out["used_per_mevents"] = Figure(
                r["per_million_events"], "bytes of used_memory per million events", "measured",
                src("capacity-memory.json"), mcmd, f"{r['events']:,} events replayed",
            )  # fmt: skip
            out["memory_overhead"] = Figure(
                r["overhead"], "used_memory / sum of MEMORY USAGE", "measured",
                src("capacity-memory.json"), mcmd, "speed view after the replay",
            )  # fmt: skip
            out["listpack_limit"] = Figure(
                r["listpack_limit"], "fields (hash-max-listpack-entries)", "measured",
                src("capacity-memory.json"), mcmd, "CONFIG GET",
            )  # fmt: skip

    # batch layer: memory.json (DuckDB view and training-row builds at growing sizes),
    # engines.json (DuckDB vs Spark on this machine)
    mj = _load(results, "memory.json", "ctrstream bench memory")
    runs = [(run.get("command", ""), r) for run in mj.get("runs", []) for r in run.get("rows", [])]
    vb = [(c, r) for c, r in runs if r.get("viewbuild_s")]
    tb = [(c, r) for c, r in runs if r.get("build_s")]
    if not vb or not tb:
        raise ValueError("memory.json lacks viewbuild/build rows: rerun `ctrstream bench memory`")
    c, r = max(vb, key=lambda cr: cr[1]["events"])
    cores = mj.get("device", {}).get("cores") or 2
    out["viewbuild_ev_core_s"] = Figure(
        r["events"] / r["viewbuild_s"] / cores, "events/s per core (DuckDB batch-view build)",
        "measured", src("memory.json"), c,
        f"{r['events']:,} events in {r['viewbuild_s']} s on {cores} cores, peak {r['viewbuild_gb']} GB",
    )  # fmt: skip
    out["viewbuild_gb"] = Figure(
        r["viewbuild_gb"], "GB peak RSS (DuckDB view build, spills beyond)", "measured",
        src("memory.json"), c, f"{r['events']:,} events",
    )  # fmt: skip
    c, r = max(tb, key=lambda cr: cr[1]["events"])
    out["trainbuild_rows_core_s"] = Figure(
        r["rows"] / r["build_s"] / cores, "rows/s per core (DuckDB training-row build)",
        "measured", src("memory.json"), c,
        f"{r['rows']:,} rows in {r['build_s']} s on {cores} cores, peak {r['build_gb']} GB",
    )  # fmt: skip
    ej = _load(results, "engines.json", "ctrstream bench engines")
    er = [r for r in _rows(ej, "engines.json") if str(r.get("engine", "")).startswith("spark")]
    if not er:
        raise ValueError("engines.json has no Spark row: rerun `ctrstream bench engines`")
    r = max(er, key=lambda x: x["rows"])
    m = re.fullmatch(r"local\[(\d+)\]", str(ej.get("meta", {}).get("spark_master", "")))
    scores = int(m.group(1)) if m else 2  # cores Spark ran on (local[N])
    out["spark_rows_core_s"] = Figure(
        r["rows/s"] / scores, "rows/s per core (Spark training-row build)", "measured",
        src("engines.json"), ej.get("meta", {}).get("command", "ctrstream bench engines"),
        f"{r['rows']:,} rows, {r['engine']}",
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------- the model


@dataclass
class Tier:
    """One tier of the plan."""

    name: str
    units: int  # processes / shards / GPUs / brokers
    unit: str
    machines: int
    cores: float
    memory_gb: float
    basis: str  # the formula, in words, with its numbers
    kind: str  # measured | extrapolated | published | assumed
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    assumptions: Assumptions
    inputs: dict[str, Figure]
    tiers: list[Tier]
    figures: dict[str, float]  # derived per-core and per-shard figures, and totals
    memory: list[dict]  # Redis memory by view and family
    variants: list[dict] = field(default_factory=list)  # the plan under changed assumptions


def _ceil(x: float) -> int:
    return max(1, math.ceil(x - 1e-9))


def _fields_per_day(events: float) -> float:
    """Expected fields of one speed-view day hash holding ``events`` events of one entity,
    spread evenly over the day: per resolution, the buckets of a day that receive at least
    one event (``slots x (1 - exp(-events / slots))``)."""
    from ctrstream import features as F

    total = 0.0
    for r in F.RESOLUTIONS:
        slots = F.DAY_MS / r.bucket_ms
        total += slots * (1.0 - math.exp(-events / slots))
    return total


def speed_hash_bytes(inputs: dict[str, Figure], fields_: float) -> float:
    """Bytes of a day hash with ``fields_`` fields, from the fitted per-field cost of the
    encoding Redis uses at that size."""
    limit = inputs["listpack_limit"].value if "listpack_limit" in inputs else 128
    enc = "listpack" if fields_ <= limit else "hashtable"
    if f"field_cost:{enc}" not in inputs:  # only one encoding was sampled: use it
        enc = next(k.split(":", 1)[1] for k in inputs if k.startswith("field_cost:"))
    return inputs[f"field_base:{enc}"].value + inputs[f"field_cost:{enc}"].value * fields_


def _daily_entities(a: Assumptions) -> dict[str, float]:
    """Active entities per day of every family (the audience assumptions)."""
    return {
        "user": a.users_per_day,
        "ad": a.ads_per_day,
        "campaign": a.campaigns_per_day,
        "advertiser": a.advertisers_per_day,
        "site": a.sites_per_day,
        "user_x_ad": a.users_per_day * a.ads_per_user_day,
        "user_x_advertiser": a.users_per_day * a.advertisers_per_user_day,
        "site_x_category": a.sites_per_day * a.categories_per_site,
    }


# The assumptions the doc's sensitivity table varies, one at a time: (what, --set pairs).
VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("as planned", ()),
    ("one batch-view version held (written in place)", ("batch_versions_held=1",)),
    ("no user crosses in the batch view", ("batch_cross_share=0",)),
    ("10 distinct ads per user-day", ("ads_per_user_day=10",)),
    ("twice the users", ("users_per_day=1e9",)),
    ("cores planned 80% busy", ("utilization=0.8",)),
)


def compute(inputs: dict[str, Figure], a: Assumptions) -> Plan:
    """The plan for ``a`` from ``inputs`` (see the module docstring for the rule), with the
    sensitivity table (:data:`VARIANTS`, each applied to ``a``)."""
    plan = _compute(inputs, a)
    for label, pairs in VARIANTS:
        p = _compute(inputs, a.with_overrides(list(pairs)))
        redis = next(t for t in p.tiers if t.name == "Redis Cluster")
        plan.variants.append(
            {
                "variant": label,
                "set": " ".join(pairs),
                "redis_masters": redis.units,
                "redis_data_gb": p.figures["Redis data GB (speed + batch, x overhead)"],
                "machines": sum(t.machines for t in p.tiers),
                "cores": sum(t.cores for t in p.tiers),
            }
        )
    return plan


def _compute(inputs: dict[str, Figure], a: Assumptions) -> Plan:
    v = {k: f.value for k, f in inputs.items()}
    u = a.utilization
    E, Q = a.events_per_s, a.requests_per_s
    rows_s = Q * a.candidates
    tiers: list[Tier] = []
    figs: dict[str, float] = {}

    # ---- speed layer (Bytewax features job): one worker per process, one core each. A
    # process's capacity is one core's worth of the job's CPU per event (its wall-clock rate
    # on the shared 2-core machine is lower: it waits for the CPU that Kafka, Redis and the
    # other jobs hold)
    per_proc = 1e6 / v["speed_job_us"]
    procs = _ceil(E / (per_proc * u))
    figs["speed events/s per core (1 s / job CPU per event)"] = per_proc
    figs["speed events/s per process, wall clock on the shared machine"] = v["speed_events_s"]
    tiers.append(
        Tier(
            "Bytewax features job", procs, "processes (one worker, one core each)",
            _ceil(procs / a.machine_cores), float(procs), 0.0,
            f"{E:,.0f} ev/s x {v['speed_job_us']:.1f} us job CPU per event / {u}",
            "extrapolated",
            ["linear in processes assumed: partitions are independent, and Redis is sized "
             "separately below",
             "the join job reads the same topics and is sized the same (not measured here)"],
        )
    )  # fmt: skip

    # ---- Kafka
    groups, rf = a.kafka_consumer_groups, a.kafka_replication
    broker_us = rf * v["broker_us_produce"] + groups * v["broker_us_consume"]
    broker_cores = E * broker_us / 1e6
    bytes_s = E * v["record_bytes"]
    nic_bytes = a.kafka_nic_gbit * 1e9 / 8
    # per broker: producer in + replication in/out + consumers out, spread evenly
    net_per_record = v["record_bytes"] * (1 + 2 * (rf - 1) + groups)
    brokers = max(
        rf,
        _ceil(broker_cores / (a.machine_cores * u)),
        _ceil(E * net_per_record / (nic_bytes * u)),
    )
    partitions = max(_ceil(E / (v["consume_rec_s"] * u)), procs)
    partitions = brokers * _ceil(partitions / brokers)
    disk_tb = bytes_s * DAY_S * a.kafka_retention_days * rf / 1e12
    figs["Kafka broker CPU us/record (RF x produce + groups x consume)"] = broker_us
    figs["Kafka bytes/s in"] = bytes_s
    tiers.append(
        Tier(
            "Kafka brokers", brokers, "brokers", brokers, broker_cores / u,
            0.0,
            f"CPU: {E:,.0f} rec/s x ({rf} x {v['broker_us_produce']:.2f} + {groups} x "
            f"{v['broker_us_consume']:.2f}) us = {broker_cores:,.1f} cores; network: "
            f"{E * net_per_record / 1e9:,.2f} GB/s over {a.kafka_nic_gbit:g} Gbit/s NICs; "
            f"at least RF={rf}",
            "extrapolated",
            [f"{partitions} partitions per raw topic (impressions and clicks alike: the join "
             f"relies on co-partitioning): one consumer reads {v['consume_rec_s']:,.0f} rec/s, "
             f"and every features process needs one",
             f"disk: {disk_tb:,.1f} TB for {a.kafka_retention_days:g} days x RF {rf}"],
        )
    )  # fmt: skip
    figs["Kafka partitions per raw topic"] = partitions

    # ---- Redis: CPU (writes + reads) and memory
    write_cores = E * v["redis_write_us"] / 1e6
    read_cores = Q * v["redis_read_us"] / 1e6
    cpu_shards = _ceil((write_cores + read_cores) / u)
    figs["Redis write CPU us/event"] = v["redis_write_us"]
    figs["Redis read CPU us/request"] = v["redis_read_us"]
    if "redis_write_us_cluster" in v:
        figs["Redis write CPU us/event, sum over the cluster's masters"] = v[
            "redis_write_us_cluster"
        ]
        figs["Redis write CPU us/event, busiest master of the cluster"] = v[
            "redis_write_us_busiest"
        ]
    figs["events/s one shard absorbs (writes only)"] = 1e6 / v["redis_write_us"]
    figs["requests/s one shard serves (reads only)"] = 1e6 / v["redis_read_us"]

    ents = _daily_entities(a)
    events_day = E * (1 - v["click_share"]) * DAY_S  # impressions: each touches every family
    ctr = v["click_share"] / (1 - v["click_share"])
    memory: list[dict] = []
    speed_bytes = 0.0
    for fam, n in ents.items():
        per_ent = events_day / n
        f_imp, f_clk = _fields_per_day(per_ent), _fields_per_day(per_ent * ctr)
        nbytes = speed_hash_bytes(inputs, f_imp + f_clk)
        tot = nbytes * n * a.speed_days_held
        speed_bytes += tot
        memory.append(
            {"view": "speed", "family": fam, "entities_per_day": n, "events_per_entity_day": per_ent,
             "fields_per_hash": f_imp + f_clk, "bytes_per_hash": nbytes, "total_gb": tot / 1e9}
        )  # fmt: skip
    batch_bytes = 0.0
    for fam, n in ents.items():
        key = f"batch_entity:{fam}"
        if key not in inputs:
            continue
        kept = n * a.batch_entities_factor * (a.batch_cross_share if fam in CROSSES else 1.0)
        tot = v[key] * kept * a.batch_versions_held
        batch_bytes += tot
        memory.append(
            {"view": "batch", "family": fam, "entities": kept,
             "bytes_per_entity": v[key], "total_gb": tot / 1e9}
        )  # fmt: skip
    overhead = v.get("memory_overhead", 1.0)
    data_gb = (speed_bytes + batch_bytes) * overhead / 1e9
    mem_shards = _ceil(data_gb / a.redis_shard_max_gb)
    shards = max(cpu_shards, mem_shards)
    shard_gb = data_gb / shards
    per_machine = max(
        1, min(a.redis_shards_per_machine, int(a.machine_ram_gb * a.redis_memory_fill // shard_gb))
    ) if shard_gb > 0 else a.redis_shards_per_machine  # fmt: skip
    nodes = shards * (1 + a.redis_replicas)
    figs["Redis data GB (speed + batch, x overhead)"] = data_gb
    figs["Redis shards for CPU"] = cpu_shards
    figs["Redis shards for memory"] = mem_shards
    tiers.append(
        Tier(
            "Redis Cluster", shards, f"masters (+{a.redis_replicas} replica each)",
            _ceil(nodes / per_machine), nodes * 1.0,
            data_gb * (1 + a.redis_replicas) / a.redis_memory_fill,
            f"CPU: ({E:,.0f} ev/s x {v['redis_write_us']:.2f} us + {Q:,.0f} req/s x "
            f"{v['redis_read_us']:.0f} us) / {u} = {cpu_shards} shards; memory: "
            f"{data_gb:,.0f} GB / {a.redis_shard_max_gb:g} GB = {mem_shards} shards",
            "extrapolated",
            [f"{'memory' if mem_shards >= cpu_shards else 'CPU'} decides the shard count",
             f"{per_machine} nodes per {a.machine_ram_gb:g} GB machine, RAM filled to "
             f"{a.redis_memory_fill:.0%}",
             "memory: bytes per day hash from the fitted per-field cost at the expected "
             "fields per hash (not measured at that size)"],
        )
    )  # fmt: skip

    # ---- API
    api_cores = Q * v["api_cpu_us"] / 1e6 / u
    api_procs = _ceil(api_cores)
    tiers.append(
        Tier(
            "Prediction API", api_procs, "processes (one core each)",
            _ceil(api_procs / a.machine_cores), float(api_procs), 0.0,
            f"{Q:,.0f} req/s x {v['api_cpu_us']:,.0f} us / {u}", "extrapolated",
            ["CPU per request measured at the API bench's highest rate, 100 candidates"],
        )
    )  # fmt: skip

    # ---- Triton
    gpu = inputs["triton_gpu_rows"]
    gpus = _ceil(rows_s / (gpu.value * u))
    cpu_cores = rows_s / v["triton_cpu_rows"] / u
    tiers.append(
        Tier(
            "Triton (GPU)", gpus, "GPUs", _ceil(gpus / 8), 0.0, 0.0,
            f"{rows_s:,.0f} rows/s / ({gpu.value:,.0f} rows/s per GPU x {u})",
            gpu.kind,
            [f"on CPUs instead: {cpu_cores:,.0f} cores at the measured "
             f"{v['triton_cpu_rows']:,.0f} rows per CPU-second ({_ceil(cpu_cores / a.machine_cores)} "
             f"machines)",
             "8 GPUs per machine assumed"],
        )
    )  # fmt: skip
    figs["Triton rows/s"] = rows_s
    figs["Triton CPU cores (alternative)"] = cpu_cores

    # ---- batch layer: the daily recompute
    from ctrstream import features as F

    view_days = max([w.days for w in F.LONG_WINDOWS] + [1])
    view_events = E * DAY_S * view_days
    window_s = a.batch_window_h * 3600
    vb_cores = view_events / (v["viewbuild_ev_core_s"] * window_s)
    imps_day = E * (1 - v["click_share"]) * DAY_S
    duck_cores = imps_day / (v["trainbuild_rows_core_s"] * window_s)
    spark_cores = imps_day / (v["spark_rows_core_s"] * window_s)
    duck_max = v["trainbuild_rows_core_s"] * a.machine_cores * window_s
    figs["batch view events to read (long window)"] = view_events
    figs["DuckDB training rows/day one machine rebuilds in the window"] = duck_max
    tiers.append(
        Tier(
            "Batch view build (DuckDB)", _ceil(vb_cores / a.machine_cores), "machines",
            _ceil(vb_cores / a.machine_cores), vb_cores, v["viewbuild_gb"],
            f"{view_events:,.0f} events ({view_days} days) / ({v['viewbuild_ev_core_s']:,.0f} "
            f"ev/s per core x {a.batch_window_h:g} h)",
            "extrapolated",
            ["one DuckDB process spans one machine: beyond its cores the view build must be "
             "split by entity partition across machines (it already runs one partition at a "
             "time) or move to Spark",
             "memory stays flat (DuckDB spills past its limit): measured peak at 32M events"],
        )
    )  # fmt: skip
    tiers.append(
        Tier(
            "Training rows (Spark)", _ceil(spark_cores / a.spark_executor_cores),
            "executor machines", _ceil(spark_cores / a.spark_executor_cores), spark_cores, 0.0,
            f"{imps_day:,.0f} impressions/day / ({v['spark_rows_core_s']:,.0f} rows/s per core "
            f"x {a.batch_window_h:g} h)",
            "extrapolated",
            [f"DuckDB would need {duck_cores:,.0f} cores in one process: one "
             f"{a.machine_cores}-core machine rebuilds {duck_max:,.0f} rows per "
             f"{a.batch_window_h:g} h, {duck_max / imps_day:.2%} of a day at this rate - so the "
             f"training-row build must move to Spark (ctrstream.batch.spark_engine) or be "
             f"sampled",
             "Spark per-core rate measured in local mode on 2 cores (no shuffle over a "
             "network): a cluster is slower per core"],
        )
    )  # fmt: skip
    return Plan(a, inputs, tiers, figs, memory)


# --------------------------------------------------------------------------- rendering


def _num(x: float) -> str:
    if x == 0:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.2f}" if abs(x) < 10 else f"{x:,.1f}"


def render_markdown(plan: Plan, command: str) -> str:
    """The plan as the generated section of ``docs/capacity.md``."""
    a = plan.assumptions
    out = [
        f"Generated by `{command}` from the files under `bench/results/` it names below.",
        "",
        f"**Targets:** {a.events_per_s:,.0f} events/s, {a.requests_per_s:,.0f} prediction "
        f"requests/s x {a.candidates} candidates = {a.requests_per_s * a.candidates:,.0f} rows "
        f"scored/s. **Headroom:** every CPU tier planned at {a.utilization:.0%} busy at peak "
        f"({1 / a.utilization:.2f}x the measured capacity); Redis RAM filled to "
        f"{a.redis_memory_fill:.0%}; machines of {a.machine_cores} cores and "
        f"{a.machine_ram_gb:g} GB.",
        "",
        "### The plan, per tier",
        "",
        "| tier | units | machines | cores | memory GB | from | kind |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in plan.tiers:
        out.append(
            f"| {t.name} | {t.units:,} {t.unit} | {t.machines:,} | {_num(t.cores)} | "
            f"{_num(t.memory_gb)} | {t.basis} | {t.kind} |"
        )
    out.append(
        f"| **total** | | {sum(t.machines for t in plan.tiers):,} | "
        f"{_num(sum(t.cores for t in plan.tiers))} | "
        f"{_num(sum(t.memory_gb for t in plan.tiers))} | GPUs: "
        f"{sum(t.units for t in plan.tiers if t.unit == 'GPUs'):,} | |"
    )
    out += ["", "Notes per tier:", ""]
    for t in plan.tiers:
        for n in t.notes:
            out.append(f"* {t.name}: {n}")
    out += ["", "### Per-core and per-shard figures", "", "| figure | value |", "|---|---|"]
    for k, x in plan.figures.items():
        out.append(f"| {k} | {_num(x)} |")
    out += [
        "",
        "### Redis memory by view and family",
        "",
        "| view | family | entities | events/entity-day | fields/hash | bytes/hash or entity | GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in plan.memory:
        ents = m.get("entities_per_day", m.get("entities", 0))
        out.append(
            f"| {m['view']} | {m['family']} | {ents:,.0f} | "
            f"{_num(m.get('events_per_entity_day', 0))} | {_num(m.get('fields_per_hash', 0))} | "
            f"{_num(m.get('bytes_per_hash', m.get('bytes_per_entity', 0)))} | {_num(m['total_gb'])} |"
        )
    total = sum(m["total_gb"] for m in plan.memory) or 1.0
    top = sorted(plan.memory, key=lambda m: -m["total_gb"])[:3]
    out += [
        "",
        "Largest: "
        + ", ".join(f"{m['view']} {m['family']} {m['total_gb'] / total:.0%}" for m in top)
        + " of the data (before the overhead factor and replicas).",
    ]
    out += [
        "",
        "### Sensitivity: one assumption changed at a time",
        "",
        "| variant | --set | Redis masters | Redis data GB | machines, all tiers | cores |",
        "|---|---|---|---|---|---|",
    ]
    for var in plan.variants:
        out.append(
            f"| {var['variant']} | {var['set'] and '`' + var['set'] + '`'} | {var['redis_masters']:,} | "
            f"{_num(var['redis_data_gb'])} | {var['machines']:,} | {_num(var['cores'])} |"
        )
    out += [
        "",
        "### Inputs (every figure and where it comes from)",
        "",
        "| input | value | unit | source |",
        "|---|---|---|---|",
    ]
    for k, f in plan.inputs.items():
        out.append(f"| {k} | {_num(f.value)} | {f.unit} | {f.cite()} |")
    out += ["", "### Assumptions (stated, not measured)", "", "| name | value |", "|---|---|"]
    for k, x in asdict(a).items():
        out.append(f"| {k} | {x:,g} |")
    return "\n".join(out) + "\n"


BEGIN = "<!-- capacity-plan:begin (generated: do not edit by hand) -->"
END = "<!-- capacity-plan:end -->"


def replace_section(doc: str, section: str) -> str:
    """``doc`` with the text between :data:`BEGIN` and :data:`END` replaced by ``section``."""
    if BEGIN not in doc or END not in doc:
        raise ValueError(
            f"the document has no generated section: it needs the lines {BEGIN!r} and {END!r}"
        )
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{section}{END}{tail}"


def plan_json(plan: Plan) -> dict:
    return {
        "assumptions": asdict(plan.assumptions),
        "inputs": {k: asdict(f) for k, f in plan.inputs.items()},
        "tiers": [asdict(t) for t in plan.tiers],
        "figures": plan.figures,
        "memory": plan.memory,
        "variants": plan.variants,
    }
