"""Running an exported model with ONNX Runtime, and inputs to run it on - no PyTorch.

Publishing checks a model on Triton against in-process ONNX Runtime with these, so it works
in an image built without the ``train`` extra (no torch); the export's parity check and
the inference benchmark use them too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctrstream import features


def random_inputs(
    n: int,
    seed: int = 0,
    num_embeddings: int | None = None,
    n_sparse: int = features.N_SPARSE,
    n_dense: int = features.N_DENSE,
) -> dict[str, np.ndarray]:
    """Fresh random model inputs in the contract's layout.

    Sparse ids: field ``k`` in its own hash range when the table has the contract's size,
    otherwise uniform over the table. Dense: ``dense_from_counts`` of random counts when
    ``n_dense`` is the contract's, otherwise standard normal."""
    rng = np.random.default_rng(seed)
    ne = num_embeddings or features.N_SPARSE * features.HASH_BUCKETS
    if n_sparse == features.N_SPARSE and ne == features.N_SPARSE * features.HASH_BUCKETS:
        sparse = (
            rng.integers(0, features.HASH_BUCKETS, (n, n_sparse))
            + np.arange(n_sparse) * features.HASH_BUCKETS
        ).astype(np.int64)
    else:
        sparse = rng.integers(0, ne, (n, n_sparse)).astype(np.int64)
    if n_dense == features.N_DENSE:
        imps = rng.poisson(rng.lognormal(2.0, 2.0, (n, len(features.ENTITIES), features.N_WINDOWS)))
        clicks = rng.binomial(imps, rng.beta(1, 30, imps.shape))
        dense = features.dense_from_counts(np.stack([imps, clicks], axis=-1))
    else:
        dense = rng.standard_normal((n, n_dense)).astype(np.float32)
    return {features.INPUT_SPARSE: sparse, features.INPUT_DENSE: dense}


def ort_session(path: str | Path, providers: list[str] | None = None, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(
        str(path), sess_options=so, providers=providers or ["CPUExecutionProvider"]
    )


def ort_predict(session, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return session.run([features.OUTPUT_PROB], inputs)[0]
