"""``ctrstream bench inference``: how much does serving through Triton cost, and how does
throughput change as the model grows?

For each model (the published deep model, or the default DCNv2 with random weights when none
is published, plus a synthetic DCNv2 family whose embedding tables grow from megabytes to
gigabytes and whose MLPs widen) and each client batch size x concurrency, it measures
throughput (rows/s) and latency p50/p99:

* **in-process** - ONNX Runtime in this process on the same device (CPU provider here, CUDA
  provider on a GPU), same thread budget: the limit Triton is measured against;
* **Triton over gRPC** - dynamic batching on and off (two model configurations), tensors in
  the gRPC message or in **system shared memory** (and **CUDA shared memory** on a GPU).

Headline: Triton rows/s / in-process rows/s at each batch size. On a GPU every row also gets
the hardware floor of its batch (FLOPs at the measured matmul rate, bytes at the measured
copy bandwidth; ``bench/inference_floor.py``); on a CPU that section is skipped and says so.

Locally Triton (the ``nvidia-pytriton`` server binary) has only the Python backend, so "Triton"
here is the Python backend running ONNX Runtime (``models/triton_model.py``); the production
ONNX Runtime backend is measured with NVIDIA's container (``--backend onnxruntime``; see
docs/inference-benchmark.md).

    ctrstream bench inference            # default grid, a few minutes on 2 CPU cores
    ctrstream bench inference --quick    # about a minute
    ctrstream bench inference --sizes 64M,1G,4G --mlp "256,128;1024,512,256"
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ctrstream.bench.common import device_info, print_table, write_results
from ctrstream.bench.inference_models import (
    DEFAULT_MLP,
    BenchModel,
    batch_cost,
    onnx_cost,
    parse_mlp,
    parse_size,
    published,
    remove_variants,
    synthetic,
    write_variant,
)
from ctrstream.config import Settings

DEFAULT_FAMILY = [("64M", "256,128"), ("1G", "256,128"), ("64M", "1024,512,256")]
QUICK_FAMILY = [("16M", "256,128")]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ctrstream bench inference",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small grid, about one minute")
    p.add_argument(
        "--batch-sizes", type=_ints, help="client batch sizes (default 1,64,1024; quick 1,256)"
    )
    p.add_argument("--concurrency", type=_ints, help="requests in flight (default 1,4)")
    p.add_argument(
        "--sizes",
        help="synthetic family: total embedding-table sizes, e.g. 64M,1G,4G "
        "(crossed with --mlp; default 64M and 1G with 256,128 plus 64M "
        "with 1024,512,256; quick: 16M)",
    )
    p.add_argument(
        "--mlp",
        help="synthetic family: MLP widths, ';'-separated specs, e.g. "
        "'256,128;1024,512,256' (default 256,128 when --sizes is given)",
    )
    p.add_argument(
        "--embed-dim", type=int, default=16, help="embedding width of the synthetic family"
    )
    p.add_argument("--no-published", action="store_true", help="skip the published model")
    p.add_argument("--no-synthetic", action="store_true", help="skip the synthetic family")
    p.add_argument("--duration", type=float, help="timed seconds per cell (default 1.0; quick 0.5)")
    p.add_argument("--warmup", type=float, help="untimed seconds before each cell (default 0.25)")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="ONNX Runtime intra-op threads, in-process and in Triton (default: all cores)",
    )
    p.add_argument(
        "--transports",
        default="grpc,system_shm",
        help="grpc, system_shm, cuda_shm (cuda_shm is added automatically on a GPU)",
    )
    p.add_argument("--dyn-batching", default="on,off", help="on, off or on,off")
    p.add_argument(
        "--queue-delay-us",
        type=int,
        default=500,
        help="dynamic batcher's max_queue_delay_microseconds",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "python", "onnxruntime"],
        default="auto",
        help="Triton backend (auto: settings.triton.backend; the local server has only python)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument(
        "--isolated",
        action="store_true",
        help="always start an own Triton on free ports (default: only if none is reachable)",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="results directory (default: settings.results_dir, bench/results)",
    )
    p.add_argument("--name", help="result file stem (default inference, or inference_quick)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    a.batch_sizes = a.batch_sizes or ([1, 256] if a.quick else [1, 64, 1024])
    a.concurrency = a.concurrency or [1, 4]
    a.duration = a.duration if a.duration is not None else (0.5 if a.quick else 1.0)
    a.warmup = a.warmup if a.warmup is not None else (0.2 if a.quick else 0.25)
    a.name = a.name or ("inference_quick" if a.quick else "inference")
    if a.sizes or a.mlp:
        sizes = (a.sizes or "64M").split(",")
        mlps = (a.mlp or ",".join(map(str, DEFAULT_MLP))).split(";")
        a.family = [(s.strip(), m.strip()) for s in sizes for m in mlps]
    else:
        a.family = QUICK_FAMILY if a.quick else DEFAULT_FAMILY
    a.dyn = [x.strip() == "on" for x in a.dyn_batching.split(",") if x.strip()]
    a.transports = [t.strip() for t in a.transports.split(",") if t.strip()]
    return a


# --------------------------------------------------------------------------- environment


def gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def triton_reachable(settings: Settings) -> bool:
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(settings.triton.grpc_url)
        try:
            return bool(client.is_server_ready(client_timeout=1.0))
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - anything wrong means "not reachable"
        return False


@contextmanager
def triton_for_bench(settings: Settings, isolated: bool, log=print):
    """The Triton to measure: the configured one when it is reachable and its model
    repository is on this file system, otherwise an own one on free ports (stopped by PID)."""
    if not isolated and triton_reachable(settings) and settings.triton.model_repository.is_dir():
        log(
            f"using the running Triton at {settings.triton.grpc_url} "
            f"(repository {settings.triton.model_repository})"
        )
        yield settings
        return
    from ctrstream.stack.manager import isolated_settings
    from ctrstream.stack.services import TritonService

    run_dir = Path(tempfile.mkdtemp(prefix="ctrbench-inference-"))
    own = isolated_settings(run_dir, base=settings)
    # the Triton service alone (Stack.up would import the Kafka client for its topics)
    svc = TritonService(own)
    t0 = time.monotonic()
    svc.start()
    pid = svc.pid()
    log(
        f"started an own Triton (PID {pid}) at {own.triton.grpc_url} in "
        f"{time.monotonic() - t0:.1f}s"
    )
    try:
        yield own
    finally:
        svc.stop()
        log(f"stopped the own Triton (PID {pid})")
        shutil.rmtree(run_dir, ignore_errors=True)


# --------------------------------------------------------------------------- the benchmark


def build_models(settings: Settings, a: argparse.Namespace, log=print) -> list[BenchModel]:
    models: list[BenchModel] = []
    if not a.no_published:
        models.append(published(settings, log=log))
    if not a.no_synthetic:
        for size, mlp in a.family:
            models.append(
                synthetic(
                    settings, parse_size(size), parse_mlp(mlp), embed_dim=a.embed_dim, log=log
                )
            )
    for m in models:
        m.cost = onnx_cost(m.onnx_path)
    return models


def run(settings: Settings, a: argparse.Namespace, log=print) -> dict:
    """Run the whole grid; return ``{"rows", "headline", "meta", "paths"}``."""
    from ctrstream.bench.inference_floor import floor_seconds, measure
    from ctrstream.bench.inference_load import CpuMeter, make_inputs, run_inprocess, run_triton
    from ctrstream.models.onnx_runtime import ort_session

    gpu = gpu_available() if a.device == "auto" else a.device == "gpu"
    backend = settings.triton.backend if a.backend == "auto" else a.backend
    transports = list(a.transports)
    if gpu and "cuda_shm" not in transports:
        transports.append("cuda_shm")
    if not gpu:
        transports = [t for t in transports if t != "cuda_shm"]
    dev = device_info()
    device_label = f"gpu: {dev.get('gpu', '?')}" if gpu else f"cpu: {dev['cpu']} x{dev['cores']}"
    triton_path = (
        "Triton Python backend running ONNX Runtime (models/triton_model.py)"
        if backend == "python"
        else "Triton ONNX Runtime backend"
    )
    log(f"device: {device_label}; threads budget {a.threads}; Triton path: {triton_path}")
    if backend == "python":
        log(
            "note: the local Triton has only the Python backend, so 'triton' rows are the Python "
            "backend running ONNX Runtime; the production ONNX Runtime backend is measured with "
            "NVIDIA's container on a GPU (docs/inference-benchmark.md)"
        )

    hw = measure() if gpu else None
    floor_note = (
        "measured with torch on the GPU"
        if hw
        else "no CUDA device on this machine (the compute/memory floor needs a GPU)"
    )
    log(f"hardware floor: {floor_note if hw else 'skipped - ' + floor_note}")

    log("models:")
    models = build_models(settings, a, log=log)
    for m in models:
        c = m.cost
        log(
            f"  {m.name:22s} table {c['table_rows']:>11,} x {c['embed_dim']} = "
            f"{c['table_bytes'] / 2**20:8,.0f} MiB, {c['flops_per_row'] / 1e6:6.2f} MFLOP/row, "
            f"dense weights {c['dense_param_bytes'] / 2**20:.1f} MiB  ({m.origin})"
        )

    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    )
    max_bs = max(
        8192, max(a.batch_sizes)
    )  # ctrstream.models.publish's default, or the largest batch
    rows: list[dict] = []
    n_cells = (
        len(models) * len(a.batch_sizes) * len(a.concurrency) * (1 + len(a.dyn) * len(transports))
    )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with (
        triton_for_bench(settings, a.isolated, log=log) as ts,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=True,
        ) as progress,
    ):
        task = progress.add_task("cells", total=n_cells)

        repo = ts.triton.model_repository
        from ctrstream.models.publish import control_client

        admin = control_client(ts)  # model control needs the stack's key
        from ctrstream.stack.services import TritonService

        meter = CpuMeter(TritonService(ts).pid())
        try:
            for m in models:
                inputs = {
                    b: make_inputs(
                        b,
                        max(a.concurrency),
                        m.num_embeddings,
                        m.cost["n_sparse"],
                        m.cost["n_dense"],
                        seed=b,
                    )
                    for b in a.batch_sizes
                }
                base = dict(
                    model=m.name,
                    table_mib=round(m.cost["table_bytes"] / 2**20, 1),
                    mlp="x".join(map(str, m.config.get("mlp_dims", []))) or "?",
                    device=device_label,
                )

                def floor_cols(b: int, rps: float, cost: dict = m.cost) -> dict:
                    if not hw:
                        return {}
                    f = floor_seconds(*batch_cost(cost, b), hw)
                    frps = b / f["floor_s"]
                    return dict(
                        floor_ms=round(f["floor_s"] * 1e3, 4),
                        floor_bound=f["bound"],
                        floor_rows_per_s=round(frps, 1),
                        pct_of_floor=round(100.0 * rps / frps, 2),
                    )

                progress.update(task, description=f"{m.name}: loading")
                sess = ort_session(m.onnx_path, providers=providers, threads=a.threads)
                variants: dict[bool, tuple[str, float]] = {}
                try:
                    for dyn in a.dyn:  # both configurations loaded side by side
                        name = write_variant(
                            repo, m, backend, dyn, max_bs, a.threads, a.queue_delay_us
                        )
                        variants[dyn] = (name, 0.0)
                        t0 = time.monotonic()
                        admin.load_model(name, client_timeout=900)
                        variants[dyn] = (name, round(time.monotonic() - t0, 2))
                    # interleaved: the in-process limit and every Triton configuration of one
                    # (batch, concurrency) run back to back, so a busy neighbour on a shared
                    # machine hits them alike (other_cpu_pct records how busy it was)
                    for b in a.batch_sizes:
                        for c in a.concurrency:
                            progress.update(task, description=f"{m.name}: batch {b}, conc {c}")
                            meter.start()
                            cell = run_inprocess(sess, inputs[b], c, a.duration, a.warmup)
                            r = cell.summary()
                            rows.append(
                                {
                                    **base,
                                    "path": "in-process",
                                    "dyn_batching": None,
                                    "transport": "-",
                                    "batch": b,
                                    "concurrency": c,
                                    **r,
                                    **cpu_cols(cell, meter.stop()),
                                    **floor_cols(b, r["rows_per_s"]),
                                }
                            )
                            progress.advance(task)
                            for dyn, (name, load_s) in variants.items():
                                for tr in transports:
                                    meter.start()
                                    cell = run_triton(
                                        ts.triton.grpc_url,
                                        name,
                                        inputs[b],
                                        c,
                                        a.duration,
                                        a.warmup,
                                        tr,
                                    )
                                    r = cell.summary()
                                    rows.append(
                                        {
                                            **base,
                                            "path": f"triton-{backend}",
                                            "dyn_batching": dyn,
                                            "transport": tr,
                                            "batch": b,
                                            "concurrency": c,
                                            **r,
                                            **cpu_cols(cell, meter.stop()),
                                            "load_s": load_s,
                                            **floor_cols(b, r["rows_per_s"]),
                                        }
                                    )
                                    progress.advance(task)
                finally:
                    del sess
                    for name, _ in variants.values():
                        try:
                            admin.unload_model(name)
                        except Exception:  # noqa: BLE001 - best effort; the files go anyway
                            pass
                    remove_variants(repo, [n for n, _ in variants.values()])
        finally:
            admin.close()

    headline = add_ratios(rows)
    meta = dict(
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        triton_path=triton_path,
        backend=backend,
        threads=a.threads,
        gpu=gpu,
        device_label=device_label,
        transports=transports,
        hardware_floor=hw or {"skipped": floor_note},
        models=[m.meta() for m in models],
        headline=headline,
        notes=[
            "rows_per_s: rows answered per second over the timed window, closed loop "
            "(each of `concurrency` clients sends its next request when the last returns)",
            "ratio_vs_inprocess: Triton rows/s / in-process ONNX Runtime rows/s at the same "
            "batch size and concurrency; headline: best Triton configuration / best "
            "in-process concurrency at each batch size",
            "the load generator runs on the same machine as Triton and shares its cores",
            "rows_per_cpu_s: rows answered per CPU-second used by the benchmark process "
            "(client, or in-process inference) plus Triton and its stubs, over the whole cell; "
            "server_rows_per_cpu_s counts Triton's CPU only (the client on another machine); "
            "cpu_eff_vs_inprocess / headline cpu_ratio compare it with in-process: on a shared "
            "machine this is the robust comparison, rows/s depends on the neighbours",
            "cells run interleaved per (batch, concurrency): in-process, then each Triton "
            "configuration; other_cpu_pct = CPU (% of all cores) used during the cell by "
            "processes other than this benchmark and its Triton - high values mean a busy "
            "neighbour distorted that cell",
        ],
    )
    return dict(rows=rows, headline=headline, meta=meta)


def cpu_cols(cell, cpu: dict) -> dict:
    """CPU accounting of a cell and its efficiency: rows answered per CPU-second used by
    this process (client / in-process inference) and the server together, and by the server
    alone. Numerator and denominator span the same interval (the whole cell, warm-up
    included), so unlike rows/s they hardly depend on how busy the machine's neighbours were."""
    out = dict(cpu)
    tot = (cpu.get("client_cpu_s") or 0.0) + (cpu.get("server_cpu_s") or 0.0)
    out["rows_per_cpu_s"] = round(cell.total_rows / tot, 1) if tot > 0 else None
    srv = cpu.get("server_cpu_s") or 0.0
    out["server_rows_per_cpu_s"] = round(cell.total_rows / srv, 1) if srv > 0 else None
    return out


def add_ratios(rows: list[dict]) -> list[dict]:
    """Per-row ratio against in-process at the same (model, batch, concurrency), and the
    headline per (model, batch): best Triton row / best in-process row."""
    inproc = {
        (r["model"], r["batch"], r["concurrency"]): r["rows_per_s"]
        for r in rows
        if r["path"] == "in-process"
    }
    inproc_eff = {
        (r["model"], r["batch"], r["concurrency"]): r.get("rows_per_cpu_s")
        for r in rows
        if r["path"] == "in-process"
    }
    for r in rows:
        key = (r["model"], r["batch"], r["concurrency"])
        base, eff = inproc.get(key), inproc_eff.get(key)
        triton = r["path"] != "in-process"
        r["ratio_vs_inprocess"] = round(r["rows_per_s"] / base, 3) if base and triton else None
        r["cpu_eff_vs_inprocess"] = (
            round(r["rows_per_cpu_s"] / eff, 3)
            if triton and eff and r.get("rows_per_cpu_s")
            else None
        )
    headline = []
    keys = sorted(
        {(r["model"], r["batch"]) for r in rows},
        key=lambda k: ([r["model"] for r in rows].index(k[0]), k[1]),
    )
    for model, b in keys:
        grp = [r for r in rows if r["model"] == model and r["batch"] == b]
        ip = [r for r in grp if r["path"] == "in-process"]
        tr = [r for r in grp if r["path"] != "in-process"]
        if not ip or not tr:
            continue
        bi = max(ip, key=lambda r: r["rows_per_s"])
        bt = max(tr, key=lambda r: r["rows_per_s"])
        ei = max((r.get("rows_per_cpu_s") or 0.0 for r in ip), default=0.0)
        et = max(tr, key=lambda r: r.get("rows_per_cpu_s") or 0.0)
        headline.append(
            dict(
                model=model,
                batch=b,
                inprocess_rows_per_s=bi["rows_per_s"],
                inprocess_p99_ms=bi["p99_ms"],
                inprocess_concurrency=bi["concurrency"],
                triton_rows_per_s=bt["rows_per_s"],
                triton_p99_ms=bt["p99_ms"],
                triton_best=(
                    f"db={'on' if bt['dyn_batching'] else 'off'} {bt['transport']} "
                    f"c={bt['concurrency']}"
                ),
                ratio=round(bt["rows_per_s"] / bi["rows_per_s"], 3) if bi["rows_per_s"] else None,
                inprocess_rows_per_cpu_s=ei or None,
                triton_rows_per_cpu_s=et.get("rows_per_cpu_s"),
                triton_best_cpu=(
                    f"db={'on' if et['dyn_batching'] else 'off'} {et['transport']} "
                    f"c={et['concurrency']}"
                ),
                cpu_ratio=(
                    round(et["rows_per_cpu_s"] / ei, 3) if ei and et.get("rows_per_cpu_s") else None
                ),
            )
        )
    return headline


# --------------------------------------------------------------------------- output


def _series_label(r: dict) -> str:
    if r["path"] == "in-process":
        return "in-process ORT"
    return f"triton db={'on' if r['dyn_batching'] else 'off'} {r['transport']}"


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """Throughput against p99 latency, one panel per model; colour = serving path, line
    style = concurrency, points along a line = growing client batch size."""
    from ctrstream.plots import pyplot

    plt = pyplot()

    models = list(dict.fromkeys(r["model"] for r in rows))
    labels = list(dict.fromkeys(_series_label(r) for r in rows))
    concs = sorted({r["concurrency"] for r in rows})
    colors = dict(zip(labels, plt.get_cmap("tab10").colors))
    styles = dict(zip(concs, ["-", "--", ":", "-."] * 4))
    cols = min(len(models), 2)
    nrows = (len(models) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 4.8 * nrows + 0.6), squeeze=False)
    for ax, model in zip(axes.flat, models):
        grp = [r for r in rows if r["model"] == model and r["p99_ms"]]
        for label in labels:
            for c in concs:
                pts = sorted(
                    (r for r in grp if _series_label(r) == label and r["concurrency"] == c),
                    key=lambda r: r["batch"],
                )
                if not pts:
                    continue
                ax.plot(
                    [p["p99_ms"] for p in pts],
                    [p["rows_per_s"] for p in pts],
                    styles[c],
                    color=colors[label],
                    marker="o",
                    ms=3.5,
                    lw=2.4 if label.startswith("in-process") else 1.3,
                    label=f"{label} c={c}",
                )
                for p in pts:
                    ax.annotate(
                        str(p["batch"]),
                        (p["p99_ms"], p["rows_per_s"]),
                        fontsize=6,
                        alpha=0.55,
                        xytext=(2, 2),
                        textcoords="offset points",
                    )
        r0 = grp[0] if grp else {}
        ax.set_title(
            f"{model}: table {r0.get('table_mib', 0):,.0f} MiB, mlp {r0.get('mlp', '?')}"
            " (labels = client batch size)",
            fontsize=9,
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("p99 latency (ms)")
        ax.set_ylabel("throughput (rows/s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(models) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# printed column <- row key
TABLE_COLUMNS = {
    "model": "model",
    "path": "path",
    "db": "dyn_batching",
    "xport": "transport",
    "batch": "batch",
    "conc": "concurrency",
    "rows/s": "rows_per_s",
    "p50 ms": "p50_ms",
    "p99 ms": "p99_ms",
    "/inproc": "ratio_vs_inprocess",
    "rows/cpu-s": "rows_per_cpu_s",
    "cpu-eff/inproc": "cpu_eff_vs_inprocess",
    "other cpu%": "other_cpu_pct",
}
FLOOR_COLUMNS = {"floor ms": "floor_ms", "bound": "floor_bound", "% floor": "pct_of_floor"}
HEADLINE_COLUMNS = {
    "model": "model",
    "batch": "batch",
    "inproc rows/s": "inprocess_rows_per_s",
    "inproc p99": "inprocess_p99_ms",
    "triton rows/s": "triton_rows_per_s",
    "triton p99": "triton_p99_ms",
    "best triton config": "triton_best",
    "triton/inproc": "ratio",
    "inproc rows/cpu-s": "inprocess_rows_per_cpu_s",
    "triton rows/cpu-s": "triton_rows_per_cpu_s",
    "cpu-eff ratio": "cpu_ratio",
}
_SHORT = {
    "in-process": "inproc",
    "triton-python": "triton-py",
    "triton-onnxruntime": "triton-ort",
    "system_shm": "shm",
    "cuda_shm": "cuda-shm",
    True: "on",
    False: "off",
    None: "",
}


def _display(rows: list[dict], columns: dict) -> list[dict]:
    out = []
    for r in rows:
        d = {}
        for col, key in columns.items():
            v = r.get(key)
            d[col] = _SHORT.get(v, v) if isinstance(v, (str, bool)) or v is None else v
        out.append(d)
    return out


def report(result: dict, a: argparse.Namespace, log=print) -> dict:
    rows, meta = result["rows"], result["meta"]
    cols = {**TABLE_COLUMNS, **(FLOOR_COLUMNS if meta["gpu"] else {})}
    print_table(
        f"inference: every cell ({meta['device_label']}; {meta['triton_path']})",
        _display(rows, cols),
        list(cols),
    )
    print_table(
        "inference headline: best Triton / best in-process, by rows/s and by rows per "
        "CPU-second, per batch size",
        _display(result["headline"], HEADLINE_COLUMNS),
        list(HEADLINE_COLUMNS),
    )
    if not meta["gpu"]:
        log("hardware floor: skipped - " + meta["hardware_floor"]["skipped"])
    out = write_results(a.name, rows, meta, out_dir=a.out_dir)
    paths = {"json": out}
    if not a.no_plot and rows:
        paths["png"] = plot(
            rows,
            out.with_suffix(".png"),
            f"ctrstream bench inference - {meta['device_label']}\ntriton = {meta['triton_path']}",
        )
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    a = parse_args(argv)
    if not sys.stdout.isatty():  # rich's 80-column default would squeeze the tables
        os.environ.setdefault("COLUMNS", "200")
    settings = settings or Settings()
    t0 = time.monotonic()
    result = run(settings, a)
    result["meta"]["wall_s"] = round(time.monotonic() - t0, 1)
    report(result, a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
