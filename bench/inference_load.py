"""Load generators of ``ctrstream bench inference``: closed-loop clients that keep
``concurrency`` requests of ``batch`` rows in flight for a fixed time and record every
request's latency.

* :func:`run_triton` - Triton over gRPC (``tritonclient.grpc.aio``, one event loop, one
  coroutine per outstanding request), with the tensors either in the gRPC message
  (``transport="grpc"``), in POSIX **system shared memory** registered with the server
  (``"system_shm"``), or in **CUDA shared memory** on the GPU (``"cuda_shm"``).
* :func:`run_inprocess` - the same model in this process with ONNX Runtime: ``concurrency``
  threads share one session (``Run`` releases the GIL), the lower bound on Triton's overhead.

Both return a :class:`CellResult` (rows/s over the timed window, latency percentiles).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np

from ctrstream.features import INPUT_DENSE, INPUT_SPARSE, OUTPUT_PROB


@dataclass
class CellResult:
    requests: int
    rows: int
    seconds: float
    latencies_ms: np.ndarray
    total_rows: int = 0  # every row answered during the cell, warm-up included

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        lat = self.latencies_ms
        return {
            "requests": self.requests,
            "rows_per_s": round(self.rows_per_s, 1),
            "req_per_s": round(self.requests / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else None,
            "mean_ms": round(float(lat.mean()), 3) if len(lat) else None,
        }


def make_inputs(
    batch: int, n_copies: int, num_embeddings: int, n_sparse: int, n_dense: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_copies`` distinct random request payloads ``(sparse_ids, dense)`` of ``batch`` rows
    (``ctrstream.models.onnx_runtime.random_inputs``: contract-shaped ids and realistic dense values)."""
    from ctrstream.models.onnx_runtime import random_inputs

    out = []
    for k in range(n_copies):
        x = random_inputs(batch, seed + k, num_embeddings, n_sparse, n_dense)
        out.append((np.ascontiguousarray(x[INPUT_SPARSE]), np.ascontiguousarray(x[INPUT_DENSE])))
    return out


MIN_REQUESTS = 3  # a cell's window stays open until this many timed requests started


def _timed_window(latencies: list[tuple[float, float, int]], t_start: float) -> CellResult:
    """The requests that started in the timed window (at or after ``t_start``; workers stop
    starting new ones at the window's end, once ``MIN_REQUESTS`` have started), from the first
    one's start to the last one's end. Warm-up requests are not counted or timed."""
    kept = [(s, e, n) for s, e, n in latencies if s >= t_start]
    total = sum(n for _, _, n in latencies)
    if not kept:
        return CellResult(0, 0, 0.0, np.array([]), total)
    span = max(e for _, e, _ in kept) - min(s for s, _, _ in kept)
    lat = np.array([(e - s) * 1e3 for s, e, _ in kept])
    return CellResult(len(kept), sum(n for _, _, n in kept), span, lat, total)


class _Window:
    """Shared stop condition of a cell's workers."""

    def __init__(self, warmup_s: float, duration_s: float):
        t0 = time.perf_counter()
        self.t_start, self.t_end = t0 + warmup_s, t0 + warmup_s + duration_s
        self.started = 0  # timed requests started (a GIL-protected int is enough here)

    def begin(self) -> float | None:
        """The start time of the next request, or None when the worker should stop."""
        s = time.perf_counter()
        if s >= self.t_end and self.started >= MIN_REQUESTS:
            return None
        if s >= self.t_start:
            self.started += 1
        return s


# --------------------------------------------------------------------------- CPU accounting


class CpuMeter:
    """How busy the whole machine was during a cell, and how much of that was not us (this
    process, Triton and its backend stubs): on a shared machine ``other_cpu_pct`` says how
    far a cell's numbers can be trusted. Linux ``/proc`` only; elsewhere it reports None."""

    def __init__(self, server_pid: int | None = None):
        self.server_pid = server_pid
        self.ncpu = os.cpu_count() or 1
        self._t0: tuple[int, int, int, int] | None = None  # _machine() + _ours() at start

    @staticmethod
    def _machine() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v[:8]), sum(v[:8]) - idle

    @staticmethod
    def _jiffies(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime + stime, all threads
        except (OSError, ValueError, IndexError):
            return 0

    def _server_pids(self) -> set[int]:
        if not self.server_pid:
            return set()
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(d))
                except (OSError, ValueError, IndexError):
                    continue
        pids, todo = {self.server_pid}, [self.server_pid]
        while todo:  # tritonserver and its backend stub processes
            for c in children.get(todo.pop(), []):
                if c not in pids:
                    pids.add(c)
                    todo.append(c)
        return pids

    def _ours(self) -> tuple[int, int]:
        """(this process's jiffies, the server tree's jiffies)."""
        return (self._jiffies(os.getpid()), sum(self._jiffies(p) for p in self._server_pids()))

    def start(self) -> None:
        try:
            self._t0 = (*self._machine(), *self._ours())
        except OSError:
            self._t0 = None

    def stop(self) -> dict:
        """Machine busy % and other processes' % over the cell, and the CPU seconds this
        process (the client, or in-process inference) and the server used."""
        if self._t0 is None:
            return {
                "busy_cpu_pct": None,
                "other_cpu_pct": None,
                "client_cpu_s": None,
                "server_cpu_s": None,
            }
        total1, busy1 = self._machine()
        me1, srv1 = self._ours()
        total0, busy0, me0, srv0 = self._t0
        dt = max(total1 - total0, 1)
        ours = max(0, me1 - me0) + max(0, srv1 - srv0)
        tck = os.sysconf("SC_CLK_TCK")
        return {
            "busy_cpu_pct": round(100.0 * (busy1 - busy0) / dt, 1),
            # clamp at 0: a stub that ended meanwhile takes its jiffies with it
            "other_cpu_pct": round(max(0.0, 100.0 * ((busy1 - busy0) - ours) / dt), 1),
            "client_cpu_s": round(max(0, me1 - me0) / tck, 3),
            "server_cpu_s": round(max(0, srv1 - srv0) / tck, 3),
        }


# --------------------------------------------------------------------------- in-process ORT


def run_inprocess(
    session, inputs, concurrency: int, duration_s: float, warmup_s: float
) -> CellResult:
    """``concurrency`` threads calling ``session.run`` back to back on one shared session."""
    win = _Window(warmup_s, duration_s)
    records: list[list[tuple[float, float, int]]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        sparse, dense = inputs[k % len(inputs)]
        feeds = {INPUT_SPARSE: sparse, INPUT_DENSE: dense}
        rec = records[k]
        n = len(sparse)
        try:
            while (s := win.begin()) is not None:
                session.run([OUTPUT_PROB], feeds)
                rec.append((s, time.perf_counter(), n))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return _timed_window([r for rec in records for r in rec], win.t_start)


# --------------------------------------------------------------------------- Triton over gRPC


class _ShmSlot:
    """One client slot's shared memory: inputs region [sparse | dense] and output region
    [prob] (system shm: one region, output at an offset; CUDA shm: two device regions, so
    reading the output copies only the output back to the host)."""

    def __init__(self, kind: str, sparse: np.ndarray, dense: np.ndarray, device_id: int = 0):
        self.kind = kind
        self.batch = len(sparse)
        tag = f"ctrbench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sparse_bytes, self.dense_bytes, self.out_bytes = (
            sparse.nbytes,
            dense.nbytes,
            self.batch * 4,
        )
        self.in_bytes = self.sparse_bytes + self.dense_bytes
        self.device_id = device_id
        if kind == "system_shm":
            import tritonclient.utils.shared_memory as shm

            self._mod = shm
            self.in_name = self.out_name = tag
            self.out_offset = self.in_bytes
            self.regions = {
                tag: (
                    shm.create_shared_memory_region(tag, "/" + tag, self.in_bytes + self.out_bytes),
                    self.in_bytes + self.out_bytes,
                )
            }
            shm.set_shared_memory_region(self.regions[tag][0], [sparse, dense])
        elif kind == "cuda_shm":
            import tritonclient.utils.cuda_shared_memory as cshm

            self._mod = cshm
            self.in_name, self.out_name, self.out_offset = tag + "-in", tag + "-out", 0
            self.regions = {
                self.in_name: (
                    cshm.create_shared_memory_region(self.in_name, self.in_bytes, device_id),
                    self.in_bytes,
                ),
                self.out_name: (
                    cshm.create_shared_memory_region(self.out_name, self.out_bytes, device_id),
                    self.out_bytes,
                ),
            }
            cshm.set_shared_memory_region(self.regions[self.in_name][0], [sparse, dense])
        else:
            raise ValueError(kind)

    async def register(self, client) -> None:
        for name, (handle, size) in self.regions.items():
            if self.kind == "system_shm":
                await client.register_system_shared_memory(name, "/" + name, size)
            else:
                await client.register_cuda_shared_memory(
                    name, self._mod.get_raw_handle(handle), self.device_id, size
                )

    async def unregister(self, client) -> None:
        for name, (handle, _) in self.regions.items():
            try:
                if self.kind == "system_shm":
                    await client.unregister_system_shared_memory(name)
                else:
                    await client.unregister_cuda_shared_memory(name)
            finally:
                self._mod.destroy_shared_memory_region(handle)

    def bind(self, i_sparse, i_dense, out) -> None:
        i_sparse.set_shared_memory(self.in_name, self.sparse_bytes, 0)
        i_dense.set_shared_memory(self.in_name, self.dense_bytes, self.sparse_bytes)
        out.set_shared_memory(self.out_name, self.out_bytes, self.out_offset)

    def read_output(self) -> np.ndarray:
        handle = self.regions[self.out_name][0]
        if self.kind == "system_shm":
            return self._mod.get_contents_as_numpy(
                handle, np.float32, [self.batch, 1], offset=self.out_offset
            )
        return self._mod.get_contents_as_numpy(handle, np.float32, [self.batch, 1])


async def _triton_cell(
    url: str,
    model: str,
    inputs,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    transport: str,
) -> CellResult:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    slots: list[_ShmSlot] = []
    try:
        if transport != "grpc":
            for k in range(concurrency):
                sparse, dense = inputs[k % len(inputs)]
                slot = _ShmSlot(transport, sparse, dense)
                slots.append(slot)
                await slot.register(client)
        win = _Window(warmup_s, duration_s)
        records: list[tuple[float, float, int]] = []

        async def worker(k: int) -> None:
            sparse, dense = inputs[k % len(inputs)]
            n = len(sparse)
            while (s := win.begin()) is not None:
                i_sp = grpcclient.InferInput(INPUT_SPARSE, list(sparse.shape), "INT64")
                i_de = grpcclient.InferInput(INPUT_DENSE, list(dense.shape), "FP32")
                out = grpcclient.InferRequestedOutput(OUTPUT_PROB)
                if transport == "grpc":
                    i_sp.set_data_from_numpy(sparse)
                    i_de.set_data_from_numpy(dense)
                    res = await client.infer(model, [i_sp, i_de], outputs=[out])
                    prob = res.as_numpy(OUTPUT_PROB)
                else:
                    slot = slots[k]
                    slot.bind(i_sp, i_de, out)
                    await client.infer(model, [i_sp, i_de], outputs=[out])
                    prob = slot.read_output()
                if prob.shape[0] != n:
                    raise RuntimeError(f"{model} returned {prob.shape[0]} rows for {n}")
                records.append((s, time.perf_counter(), n))

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return _timed_window(records, win.t_start)
    finally:
        for slot in slots:
            try:
                await slot.unregister(client)
            except Exception:  # noqa: BLE001 - best effort clean-up
                pass
        await client.close()


def run_triton(
    url: str,
    model: str,
    inputs,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    transport: str = "grpc",
) -> CellResult:
    if transport not in ("grpc", "system_shm", "cuda_shm"):
        raise ValueError(f"unknown transport {transport!r}")
    return asyncio.run(
        _triton_cell(url, model, inputs, concurrency, duration_s, warmup_s, transport)
    )
