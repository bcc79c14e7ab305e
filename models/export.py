"""ONNX export of a CTR model (PyTorch), with a parity check that fails the export.

``export_onnx(model, path)`` writes an ONNX file with the contract's names
(``sparse_ids`` INT64 ``[batch, n_sparse]``, ``dense`` FP32 ``[batch, n_dense]`` ->
``prob`` FP32 ``[batch, 1]``) and a dynamic batch dimension, then runs ONNX Runtime and
PyTorch on fresh random inputs (several batch sizes, realistic dense values built with
``features.dense_from_counts``) and raises ``ParityError`` - deleting the file - when the
largest absolute difference in probability exceeds ``atol`` (1e-5).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ctrstream import features
from ctrstream.models.onnx_runtime import ort_predict, ort_session, random_inputs

OPSET = 17  # supported by the ONNX Runtime of every Triton release this project targets
PARITY_ATOL = 1e-5


class ParityError(RuntimeError):
    pass


def _dims(model) -> tuple[int, int, int]:
    cfg = getattr(model, "config", {}) or {}
    return (
        int(cfg.get("num_embeddings", features.N_SPARSE * features.HASH_BUCKETS)),
        int(cfg.get("n_sparse", features.N_SPARSE)),
        int(cfg.get("n_dense", features.N_DENSE)),
    )


@torch.no_grad()
def torch_predict(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    model.eval()
    return model(
        torch.from_numpy(inputs[features.INPUT_SPARSE]),
        torch.from_numpy(inputs[features.INPUT_DENSE]),
    ).numpy()


def model_inputs(model, n: int, seed: int) -> dict[str, np.ndarray]:
    """Fresh random inputs in the model's own input distribution: sparse ids as in
    ``random_inputs``; dense values drawn from N(mean, std) of the model's stored
    normalization (the training distribution), when it has one."""
    ne, ns, nd = _dims(model)
    x = random_inputs(n, seed, ne, ns, nd)
    mean, inv = getattr(model, "dense_mean", None), getattr(model, "dense_inv_std", None)
    if mean is not None and inv is not None:
        rng = np.random.default_rng(seed + 1)
        m, s = mean.detach().numpy(), 1.0 / inv.detach().numpy()
        x[features.INPUT_DENSE] = (m + s * rng.standard_normal((n, nd))).astype(np.float32)
    return x


def check_parity(
    model,
    path: str | Path,
    seed: int = 12345,
    atol: float = PARITY_ATOL,
    batch_sizes=(1, 7, 1000, 4096),
) -> float:
    """Max |p_onnx - p_torch| over fresh random inputs (``model_inputs``); raises
    ``ParityError`` above ``atol`` (or when shapes differ). Returns the max difference."""
    sess = ort_session(path)
    worst = 0.0
    for i, n in enumerate(batch_sizes):
        x = model_inputs(model, n, seed + i)
        a, b = ort_predict(sess, x), torch_predict(model, x)
        if a.shape != (n, 1) or b.shape != (n, 1):
            raise ParityError(
                f"{path}: output shapes onnx {a.shape} / torch {b.shape}, expected {(n, 1)}"
            )
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        if not np.isfinite(diff):
            raise ParityError(f"{path}: non-finite outputs at batch size {n}")
        worst = max(worst, diff)
    if worst > atol:
        raise ParityError(
            f"{path}: ONNX Runtime and PyTorch disagree by {worst:.3g} in "
            f"probability (limit {atol:g}); the exported graph is not the model"
        )
    return worst


def export_onnx(
    model,
    path: str | Path,
    parity_check: bool = True,
    opset: int = OPSET,
    atol: float = PARITY_ATOL,
) -> dict:
    """Export ``model`` to ``path``; returns ``{"path", "parity_max_abs_diff", "bytes"}``.

    With ``parity_check`` (the default) a failed check deletes the file and raises
    ``ParityError``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ne, ns, nd = _dims(model)
    model.eval()
    x = random_inputs(2, 0, ne, ns, nd)
    args = (torch.from_numpy(x[features.INPUT_SPARSE]), torch.from_numpy(x[features.INPUT_DENSE]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[features.INPUT_SPARSE, features.INPUT_DENSE],
            output_names=[features.OUTPUT_PROB],
            dynamic_axes={
                features.INPUT_SPARSE: {0: "batch"},
                features.INPUT_DENSE: {0: "batch"},
                features.OUTPUT_PROB: {0: "batch"},
            },
            do_constant_folding=True,
        )
    diff = None
    if parity_check:
        try:
            diff = check_parity(model, path, atol=atol)
        except Exception:
            path.unlink(missing_ok=True)
            raise
    return dict(path=str(path), parity_max_abs_diff=diff, bytes=path.stat().st_size)


__all__ = [
    "OPSET",
    "PARITY_ATOL",
    "ParityError",
    "check_parity",
    "export_onnx",
    "model_inputs",
    "torch_predict",
]
