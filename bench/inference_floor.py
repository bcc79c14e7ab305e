"""The hardware floor of one batch on a GPU: the time its FLOPs take at the measured matmul
rate and the time its bytes take at the measured copy bandwidth, both measured here with
PyTorch on the device. ``max(compute, memory)`` is the fastest one batch can possibly run;
each benchmark row reports how close it came (``floor_pct`` = floor time / measured time
per batch at concurrency 1, or the floor's rows/s against measured rows/s).

On a machine without a CUDA device :func:`measure` returns ``None`` and the benchmark says
the floor was skipped.
"""

from __future__ import annotations

import time


def measure(device_index: int = 0, matmul_n: int = 8192, copy_mib: int = 1024) -> dict | None:
    """Measured FP32 matmul FLOP/s (TF32 off, as ONNX Runtime's default CUDA FP32 GEMMs) and
    device-to-device copy bandwidth, or ``None`` without a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda", device_index)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        flops = _matmul_rate(torch, dev, matmul_n)
        bw = _copy_rate(torch, dev, copy_mib)
        host = torch.empty(64 * 2**20 // 4, pin_memory=True)
        dbuf = torch.empty_like(host, device=dev)
        h2d = _best_rate(lambda: dbuf.copy_(host, non_blocking=True), host.numel() * 4.0, torch)
        return {
            "gpu": torch.cuda.get_device_name(dev),
            "matmul_flops": flops,
            "copy_bytes_per_s": bw,
            "h2d_bytes_per_s": h2d,
            "matmul_n": matmul_n,
            "copy_mib": copy_mib,
            "tf32": False,
        }
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
        torch.cuda.empty_cache()


def _matmul_rate(torch, dev, n: int) -> float:
    """FLOP/s of an n x n FP32 matmul (its operands are freed on return)."""
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    return _best_rate(lambda: a @ b, 2.0 * n**3, torch)


def _copy_rate(torch, dev, copy_mib: int) -> float:
    """Bytes/s of a device-to-device copy of ``copy_mib`` MiB (its buffers are freed on
    return)."""
    n = copy_mib * 2**20 // 4
    src = torch.empty(n, device=dev)
    dst = torch.empty_like(src)
    # a copy reads and writes every byte
    return _best_rate(lambda: dst.copy_(src), 2.0 * n * 4, torch)


def _best_rate(fn, work: float, torch, reps: int = 10, rounds: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
    return work / best


def floor_seconds(flops: float, nbytes: float, hw: dict) -> dict:
    """Compute and memory floor of one batch (seconds) and which one binds."""
    t_c = flops / hw["matmul_flops"]
    t_m = nbytes / hw["copy_bytes_per_s"]
    return {
        "compute_s": t_c,
        "memory_s": t_m,
        "floor_s": max(t_c, t_m),
        "bound": "compute" if t_c >= t_m else "memory",
    }
