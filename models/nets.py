"""The two CTR models: a hashed logistic-regression baseline and DCN-v2.

Both follow the model I/O contract of ``ctrstream.features``:

* input ``sparse_ids`` INT64 ``[batch, N_SPARSE]`` - hashed ids; field ``k`` lands in
  ``[k*HASH_BUCKETS, (k+1)*HASH_BUCKETS)``, so one table of ``N_SPARSE*HASH_BUCKETS`` rows
  holds every field;
* input ``dense`` FP32 ``[batch, N_DENSE]`` - ``features.dense_from_counts`` output, raw
  (each model normalizes it itself with a mean/std stored as buffers, so the ONNX file
  carries the normalization and serving never re-implements it);
* output ``prob`` FP32 ``[batch, 1]`` - the click probability.

Negative down-sampling correction lives in the model too: a buffer ``logit_offset``
(``log w`` for negatives kept at rate ``w``) is added to the logit, which is exactly the
standard re-calibration ``p / (p + (1 - p) / w)`` (odds are multiplied by ``w``).

``forward`` returns the probability (what is exported); ``logit_raw`` is the training-time
logit before the offset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ctrstream.features import HASH_BUCKETS, N_DENSE, N_SPARSE


def _inv_std(std: torch.Tensor) -> torch.Tensor:
    """1/std, except for features that were (nearly) constant in training (e.g. 7-day windows
    on a few hours of data): those are only centered, so that values seen later in serving
    are not blown up by a near-zero std."""
    return torch.where(std < 1e-3, torch.ones_like(std), 1.0 / std.clamp_min(1e-3))


class _CTRBase(nn.Module):
    """Dense normalization + down-sampling offset shared by both models."""

    config: dict[str, Any]  # the constructor's arguments and "kind": a checkpoint rebuilds from it
    # buffers (register_buffer), declared for the type checker
    dense_mean: torch.Tensor
    dense_inv_std: torch.Tensor
    logit_offset: torch.Tensor

    def __init__(self, n_dense: int, dense_mean=None, dense_std=None):
        super().__init__()
        mean = (
            torch.zeros(n_dense)
            if dense_mean is None
            else torch.as_tensor(np.asarray(dense_mean, dtype=np.float32))
        )
        std = (
            torch.ones(n_dense)
            if dense_std is None
            else torch.as_tensor(np.asarray(dense_std, dtype=np.float32))
        )
        self.register_buffer("dense_mean", mean.reshape(n_dense).float().clone())
        self.register_buffer("dense_inv_std", _inv_std(std.reshape(n_dense).float()))
        self.register_buffer("logit_offset", torch.zeros(()))

    def set_normalization(self, mean, std) -> None:
        self.dense_mean.copy_(torch.as_tensor(np.asarray(mean, dtype=np.float32)))
        self.dense_inv_std.copy_(_inv_std(torch.as_tensor(np.asarray(std, dtype=np.float32))))

    def set_negative_sampling_rate(self, w: float | None) -> None:
        """Negatives were kept with probability ``w`` during training: add ``log w``."""
        self.logit_offset.fill_(0.0 if not w or w >= 1.0 else math.log(w))

    def normalize(self, dense: torch.Tensor) -> torch.Tensor:
        return (dense - self.dense_mean) * self.dense_inv_std

    def logit_raw(self, sparse_ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, sparse_ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit_raw(sparse_ids, dense) + self.logit_offset)

    def embedding_l2(self, sparse_ids: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the squared norm of the looked-up embedding rows (the
        usual batch-wise L2 for hashed ids: frequent ids are regularized more often)."""
        tables = [m for m in self.modules() if isinstance(m, nn.Embedding)]
        return sum(t(sparse_ids).pow(2).sum() for t in tables) / sparse_ids.shape[0]

    def sparse_parameters(self) -> list[torch.Tensor]:
        """Parameters that receive sparse gradients (embedding tables)."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Embedding) and m.sparse]

    def dense_parameters(self) -> list[nn.Parameter]:
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]


class HashedLogisticRegression(_CTRBase):
    """Baseline: one weight per hashed sparse id + a linear layer on normalized dense inputs.

    ``logit = bias + sum_k w[sparse_ids[:, k]] + v . normalize(dense)``
    """

    def __init__(
        self,
        num_embeddings: int = N_SPARSE * HASH_BUCKETS,
        n_dense: int = N_DENSE,
        dense_mean=None,
        dense_std=None,
        sparse_grad: bool = True,
    ):
        super().__init__(n_dense, dense_mean, dense_std)
        self.config = dict(kind="lr", num_embeddings=num_embeddings, n_dense=n_dense)
        self.weights = nn.Embedding(num_embeddings, 1, sparse=sparse_grad)
        nn.init.zeros_(self.weights.weight)
        self.dense = nn.Linear(n_dense, 1)
        nn.init.zeros_(self.dense.weight)
        nn.init.constant_(self.dense.bias, math.log(0.02 / 0.98))

    def logit_raw(self, sparse_ids, dense):
        return self.weights(sparse_ids).sum(dim=1) + self.dense(self.normalize(dense))


class CrossLayerV2(nn.Module):
    """``x_{l+1} = x0 * (W x_l + b) + x_l`` (full rank), or with ``W = U V`` (low rank)."""

    def __init__(self, dim: int, low_rank: int | None = None):
        super().__init__()
        self.proj: nn.Module
        if low_rank:
            self.proj = nn.Sequential(
                nn.Linear(dim, low_rank, bias=False), nn.Linear(low_rank, dim)
            )
        else:
            self.proj = nn.Linear(dim, dim)
        for m in self.proj.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, gain=0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x0, xl):
        return x0 * self.proj(xl) + xl


class DCNv2(_CTRBase):
    """Deep & Cross Network v2 (Wang et al., 2021), parallel structure.

    Constructor arguments (all keyword-friendly; the defaults are the production model):

    * ``num_embeddings`` - rows of the one shared embedding table (``N_SPARSE*HASH_BUCKETS``
      for the contract's hashed ids; larger for benchmark models - table bytes are
      ``num_embeddings * embed_dim * 4``; ids must be ``< num_embeddings``);
    * ``n_sparse`` - sparse fields per example (columns of ``sparse_ids``);
    * ``n_dense`` - dense inputs per example;
    * ``embed_dim`` - embedding width per field;
    * ``cross_layers`` - number of cross layers (0 disables the cross tower);
    * ``low_rank`` - rank of each cross layer's matrix (``None``: full rank ``d x d``);
    * ``mlp_dims`` - widths of the deep tower's hidden layers (``()`` disables it);
    * ``dropout`` - dropout in the deep tower (training only);
    * ``dense_mean`` / ``dense_std`` - normalization of the dense inputs, stored as buffers;
    * ``sparse_grad`` - sparse gradients for the embedding table (use ``SparseAdam`` /
      ``Adagrad``); export is unaffected.

    ``x0 = [embeddings of the n_sparse ids (flattened), normalize(dense)]`` of width
    ``d = n_sparse*embed_dim + n_dense``; the cross tower and the deep tower both read
    ``x0`` and their outputs are concatenated into a final linear layer -> logit.
    """

    def __init__(
        self,
        num_embeddings: int = N_SPARSE * HASH_BUCKETS,
        n_sparse: int = N_SPARSE,
        n_dense: int = N_DENSE,
        embed_dim: int = 16,
        cross_layers: int = 3,
        low_rank: int | None = None,
        mlp_dims: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        dense_mean=None,
        dense_std=None,
        sparse_grad: bool = True,
    ):
        super().__init__(n_dense, dense_mean, dense_std)
        self.config = dict(
            kind="deep",
            num_embeddings=num_embeddings,
            n_sparse=n_sparse,
            n_dense=n_dense,
            embed_dim=embed_dim,
            cross_layers=cross_layers,
            low_rank=low_rank,
            mlp_dims=list(mlp_dims),
            dropout=dropout,
        )
        self.embedding = nn.Embedding(num_embeddings, embed_dim, sparse=sparse_grad)
        nn.init.normal_(self.embedding.weight, std=0.01)
        d = n_sparse * embed_dim + n_dense
        self.cross = nn.ModuleList(CrossLayerV2(d, low_rank) for _ in range(cross_layers))
        layers: list[nn.Module] = []
        width = d
        for h in mlp_dims:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.deep = nn.Sequential(*layers)
        head_in = (d if cross_layers else 0) + (width if mlp_dims else 0)
        if head_in == 0:
            raise ValueError("DCNv2 needs a cross tower, a deep tower, or both")
        self.head = nn.Linear(head_in, 1)
        nn.init.constant_(self.head.bias, math.log(0.02 / 0.98))

    def logit_raw(self, sparse_ids, dense):
        emb = self.embedding(sparse_ids).flatten(1)
        x0 = torch.cat([emb, self.normalize(dense)], dim=1)
        parts = []
        if len(self.cross):
            x = x0
            for layer in self.cross:
                x = layer(x0, x)
            parts.append(x)
        if len(self.deep):
            parts.append(self.deep(x0))
        return self.head(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])


def build(kind: str, **kwargs) -> _CTRBase:
    """``build("lr" | "deep", **constructor args)``."""
    if kind == "lr":
        return HashedLogisticRegression(**kwargs)
    if kind == "deep":
        return DCNv2(**kwargs)
    raise ValueError(f"unknown model kind {kind!r}: use 'lr' or 'deep'")


__all__ = ["CrossLayerV2", "DCNv2", "HashedLogisticRegression", "build"]
