"""Models of ``ctrstream bench inference``: the published deep model, a synthetic DCNv2
family, their cost per row (read off the ONNX graph), and the Triton configurations the
benchmark loads (dynamic batching on and off).

The ONNX files come from ``ctrstream.models.nets.DCNv2`` + ``ctrstream.models.export.export_onnx``; the Python
backend's ``model.py`` is ``models/triton_model.py`` (the one ``ctrstream.models.publish`` ships).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ctrstream.config import Settings
from ctrstream.features import HASH_BUCKETS, N_DENSE, N_SPARSE

BENCH_PREFIX = "bench_inf_"
DEFAULT_EMBED_DIM = 16
DEFAULT_MLP = (256, 128)
DEFAULT_CROSS = 3


@dataclass
class BenchModel:
    name: str  # short label in tables ("published", "dcn-64M-256x128", ...)
    origin: str  # "published" | "published-missing:random-weights" | "synthetic"
    onnx_path: Path
    num_embeddings: int
    n_sparse: int = N_SPARSE
    n_dense: int = N_DENSE
    config: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)

    def meta(self) -> dict:
        d = asdict(self)
        d["onnx_path"] = str(self.onnx_path)
        return d


# --------------------------------------------------------------------------- sizes

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"64M"`` / ``"1G"`` / ``"1.5G"`` / ``"4096"`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 64M, 1G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def fmt_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % (_UNITS[unit] // 16 or 1) == 0:
            v = n / _UNITS[unit]
            return f"{v:g}{unit}"
    return str(n)


def parse_mlp(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.split(r"[x,]", text.strip()) if x)


# --------------------------------------------------------------------------- building


def _cache_dir(settings: Settings) -> Path:
    return settings.cache_dir / "bench-inference"


def synthetic(
    settings: Settings,
    table_bytes: int,
    mlp_dims=DEFAULT_MLP,
    embed_dim: int = DEFAULT_EMBED_DIM,
    cross_layers: int = DEFAULT_CROSS,
    log=print,
) -> BenchModel:
    """A DCNv2 with random weights whose embedding table holds ``table_bytes`` (fp32),
    exported once and cached under ``<cache_dir>/bench-inference/``."""
    rows = max(N_SPARSE, table_bytes // (embed_dim * 4))
    cfg = dict(
        num_embeddings=rows,
        n_sparse=N_SPARSE,
        n_dense=N_DENSE,
        embed_dim=embed_dim,
        cross_layers=cross_layers,
        mlp_dims=list(mlp_dims),
    )
    name = f"dcn-{fmt_size(rows * embed_dim * 4)}-{'x'.join(map(str, mlp_dims))}"
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    path = _cache_dir(settings) / f"{name}-{key}" / "model.onnx"
    if not path.exists():
        _export_random(cfg, path, log)
    return BenchModel(name, "synthetic", path, rows, config=cfg)


def _export_random(cfg: dict, path: Path, log) -> None:
    import time

    import torch

    from ctrstream.models.export import export_onnx
    from ctrstream.models.nets import DCNv2

    t0 = time.monotonic()
    torch.manual_seed(0)
    with torch.no_grad():
        model = DCNv2(**cfg, sparse_grad=False).eval()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(path.parent, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # a large table: the parity check compares a few batches only, it stays quick
    info = export_onnx(model, tmp, parity_check=True)
    tmp.rename(path)
    log(
        f"  built {path.parent.name}: {info['bytes'] / 2**20:,.0f} MiB ONNX, parity "
        f"{info['parity_max_abs_diff']:.1e}, {time.monotonic() - t0:.1f}s"
    )


def published(settings: Settings, log=print) -> BenchModel:
    """The newest published deep model (ONNX under ``data_dir/models`` or the model
    repository); when none is published, the default DCNv2 architecture with random weights."""
    found = find_published(settings)
    if found is not None:
        log(f"  published model: {found}")
        return BenchModel("published", "published", found, _table_rows(found))
    cfg: dict[str, Any] = dict(
        num_embeddings=N_SPARSE * HASH_BUCKETS,
        n_sparse=N_SPARSE,
        n_dense=N_DENSE,
        embed_dim=DEFAULT_EMBED_DIM,
        cross_layers=DEFAULT_CROSS,
        mlp_dims=list(DEFAULT_MLP),
    )
    path = _cache_dir(settings) / "default-random" / "model.onnx"
    if not path.exists():
        _export_random(cfg, path, log)
    log(
        "  no published deep model found: using the default DCNv2 architecture with random "
        "weights (same cost as a trained one)"
    )
    return BenchModel(
        "default-dcn", "published-missing:random-weights", path, cfg["num_embeddings"], config=cfg
    )


def find_published(settings: Settings) -> Path | None:
    """Newest ``model.onnx`` with a deep (DCN) graph, benchmark models excluded."""
    cands: list[Path] = []
    repo = settings.triton.model_repository
    if repo.is_dir():
        cands += [
            p
            for p in repo.glob("*/*/model.onnx")
            if not p.parent.parent.name.startswith(BENCH_PREFIX)
        ]
    models_dir = settings.data_dir / "models"
    if models_dir.is_dir():
        cands += list(models_dir.rglob("*.onnx"))
    for p in sorted(cands, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            if onnx_cost(p)["n_matmul"] >= 3:  # a deep model; the LR baseline has one
                return p.resolve()
        except Exception:  # noqa: BLE001 - unreadable file: skip it
            continue
    return None


def _table_rows(path: Path) -> int:
    return onnx_cost(path)["table_rows"]


# --------------------------------------------------------------------------- cost per row


def onnx_cost(path: Path) -> dict:
    """What one row costs, read from the graph: multiply-add FLOPs of every Gemm/MatMul
    against a weight, embedding bytes gathered, and the bytes of the (dense) weights read
    once per batch."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    inits = {i.name: tuple(i.dims) for i in g.initializer}
    n_matmul, flops_row, dense_param_bytes = 0, 0, 0
    table_rows, table_dim, gather_bytes = 0, 0, 0
    for node in g.node:
        if node.op_type in ("Gemm", "MatMul"):
            w = next((inits[i] for i in node.input[1:2] if i in inits), None)
            if w is not None and len(w) == 2:
                n_matmul += 1
                flops_row += 2 * w[0] * w[1]
                dense_param_bytes += w[0] * w[1] * 4
        elif node.op_type == "Gather" and node.input[0] in inits and len(inits[node.input[0]]) == 2:
            rows, dim = inits[node.input[0]]
            if rows * dim > table_rows * max(table_dim, 1):
                table_rows, table_dim = rows, dim
    n_sparse = (
        next(
            (
                d.dim_value
                for i in g.input
                if i.name == "sparse_ids"
                for d in i.type.tensor_type.shape.dim[1:2]
            ),
            N_SPARSE,
        )
        or N_SPARSE
    )
    n_dense = (
        next(
            (
                d.dim_value
                for i in g.input
                if i.name == "dense"
                for d in i.type.tensor_type.shape.dim[1:2]
            ),
            N_DENSE,
        )
        or N_DENSE
    )
    external = sorted(
        {
            e.value
            for i in g.initializer
            if i.data_location == onnx.TensorProto.EXTERNAL
            for e in i.external_data
            if e.key == "location"
        }
    )
    gather_bytes = n_sparse * table_dim * 4
    io_bytes = n_sparse * 8 + n_dense * 4 + 4
    return dict(
        n_matmul=n_matmul,
        flops_per_row=flops_row,
        dense_param_bytes=dense_param_bytes,
        table_rows=table_rows,
        embed_dim=table_dim,
        table_bytes=table_rows * table_dim * 4,
        gather_bytes_per_row=gather_bytes,
        io_bytes_per_row=io_bytes,
        n_sparse=n_sparse,
        n_dense=n_dense,
        external_files=external,
    )


def batch_cost(cost: dict, batch: int) -> tuple[float, float]:
    """(FLOPs, bytes moved) of one batch: every row's matmuls; the dense weights once, each
    row's gathered embeddings and its inputs/output."""
    flops = float(cost["flops_per_row"]) * batch
    nbytes = float(cost["dense_param_bytes"]) + batch * float(
        cost["gather_bytes_per_row"] + cost["io_bytes_per_row"]
    )
    return flops, nbytes


# --------------------------------------------------------------------------- Triton configs


def triton_variant_name(model: BenchModel, backend: str, dyn_batching: bool) -> str:
    safe = re.sub(r"[^a-zA-Z0-9]+", "_", model.name).strip("_").lower()
    return (
        f"{BENCH_PREFIX}{safe}_{'py' if backend == 'python' else 'ort'}_"
        f"{'db' if dyn_batching else 'nodb'}"
    )


_DYN_BLOCK = re.compile(r"^dynamic_batching \{.*?^\}\n", re.S | re.M)


def variant_config(
    name: str,
    backend: str,
    dyn_batching: bool,
    n_sparse: int,
    n_dense: int,
    max_batch_size: int,
    threads: int,
    queue_delay_us: int,
) -> str:
    """``ctrstream.models.publish.model_config`` (the production configuration of each flavour), with
    its ``dynamic_batching`` block removed for the "off" variant."""
    from ctrstream.models.publish import model_config

    text = model_config(
        name,
        "python" if backend == "python" else "onnxruntime",
        None,
        n_sparse,
        n_dense,
        max_batch_size=max_batch_size,
        max_queue_delay_us=queue_delay_us,
        intra_op_threads=threads,
    )
    if not dyn_batching:
        text, n = _DYN_BLOCK.subn("", text)
        if n != 1:
            raise RuntimeError(f"could not remove dynamic_batching from the config of {name}")
    return text


def write_variant(
    repo: Path,
    model: BenchModel,
    backend: str,
    dyn_batching: bool,
    max_batch_size: int,
    threads: int,
    queue_delay_us: int = 500,
) -> str:
    """Write one benchmark model into the repository ``repo`` and return its name.

    ``backend="python"``: ``models/triton_model.py`` running the ONNX file with ONNX Runtime
    (the local Triton's only backend); ``"onnxruntime"``: Triton's ONNX Runtime backend
    (NVIDIA's container). The ONNX file and its external-data files are hard-linked (copied
    only across file systems)."""
    name = triton_variant_name(model, backend, dyn_batching)
    mdir = repo / name
    shutil.rmtree(mdir, ignore_errors=True)
    vdir = mdir / "1"
    vdir.mkdir(parents=True)
    _link_or_copy(model.onnx_path, vdir / "model.onnx")
    for rel in model.cost.get("external_files", []):
        _link_or_copy(model.onnx_path.parent / rel, vdir / rel)
    if backend == "python":
        from ctrstream.models.publish import TRITON_MODEL_PY

        shutil.copyfile(TRITON_MODEL_PY, vdir / "model.py")
    (mdir / "config.pbtxt").write_text(
        variant_config(
            name,
            backend,
            dyn_batching,
            model.cost["n_sparse"],
            model.cost["n_dense"],
            max_batch_size,
            threads,
            queue_delay_us,
        )
    )
    return name


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (instant, and unlike a symlink it resolves inside a container that mounts
    the repository), or a copy across file systems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def remove_variants(repo: Path, names: list[str]) -> None:
    for n in names:
        if n.startswith(BENCH_PREFIX):
            shutil.rmtree(repo / n, ignore_errors=True)
