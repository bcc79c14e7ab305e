"""Training of the LR baseline and the DCN-v2 model on a training set.

``train(dataset, model="deep")`` takes the dict of numpy arrays that
``ctrstream.batch.point_in_time.training_set`` returns (``impression_id``, ``event_time_ms``,
``label``, ``dense`` ``(rows, N_DENSE)`` float32, ``sparse`` ``(rows, N_SPARSE)`` int64) and
returns the trained module plus an ``info`` dict.

* **Time-based split**: the last ``val_fraction`` of the event-time span is validation
  (``split_time_ms`` in ``info``); the model never sees a validation example.
* **Negative down-sampling** (``neg_downsample=w``): training negatives are kept with
  probability ``w``; the model's ``logit_offset`` is then set to ``log w``, the standard
  re-calibration ``p / (p + (1-p)/w)``, so exported probabilities are on the true scale.
* **Reproducible**: ``torch.manual_seed(seed)``, a seeded ``torch.Generator`` for the data
  order of each epoch and a seeded numpy generator for down-sampling; same data + same seed
  -> same weights (on the same machine / thread count).
* Embedding tables use sparse gradients (``SparseAdam``); the rest uses ``Adam``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import nn

from ctrstream.metrics import log_loss
from ctrstream.models.nets import _CTRBase, build


# defaults per model kind; measured on the 2-core CPU (see the model card's train_seconds).
# The deep model's cross layers are low rank (W = U V, rank 16, instead of a full 176 x 176
# matrix): 8 of 10 measured (data set, data order) pairs got a lower NE gap, by 0.10 % on
# average, with 11.6k cross parameters instead of 62k (docs/training.md).
class Hyperparameters(TypedDict):
    epochs: int
    lr: float
    sparse_lr: float
    emb_l2: float
    batch_size: int
    model_args: dict[str, Any]


DEFAULTS: dict[str, Hyperparameters] = {
    "lr": dict(epochs=1, lr=0.01, sparse_lr=0.01, emb_l2=0.0, batch_size=4096, model_args={}),
    "deep": dict(
        epochs=1,
        lr=0.001,
        sparse_lr=0.003,
        emb_l2=0.0,
        batch_size=4096,
        model_args=dict(embed_dim=8, cross_layers=2, low_rank=16, mlp_dims=(256, 128)),
    ),
}
THREADS = 2


class TrainingError(ValueError):
    pass


def time_split(
    event_time_ms: np.ndarray, val_fraction: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Indices of training and validation rows (each in event-time order) and the split time:
    validation = the last ``val_fraction`` of the event-time span."""
    t = np.asarray(event_time_ms, dtype=np.int64)
    if len(t) == 0:
        raise TrainingError("the training set is empty")
    t0, t1 = int(t.min()), int(t.max())
    cut = t0 + int(math.ceil((t1 - t0) * (1.0 - val_fraction)))
    order = np.argsort(t, kind="stable")
    ts = t[order]
    k = int(np.searchsorted(ts, cut, side="left"))
    train_idx, val_idx = order[:k], order[k:]
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise TrainingError(
            f"time split at {cut} leaves an empty side "
            f"({len(train_idx)} train / {len(val_idx)} validation rows)"
        )
    return train_idx, val_idx, cut


@torch.no_grad()
def predict(
    model: nn.Module, sparse: np.ndarray, dense: np.ndarray, batch_size: int = 65536
) -> np.ndarray:
    """Probabilities (float64, 1-D) of ``model`` for numpy inputs, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    s = torch.as_tensor(np.ascontiguousarray(sparse, dtype=np.int64))
    d = torch.as_tensor(np.ascontiguousarray(dense, dtype=np.float32))
    for i in range(0, len(s), batch_size):
        out.append(model(s[i : i + batch_size], d[i : i + batch_size]).reshape(-1))
    model.train(was_training)
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>9} ex/s"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def train(
    dataset: dict,
    model: str = "deep",
    seed: int = 0,
    epochs: int | None = None,
    neg_downsample: float | None = None,
    progress: bool = True,
    *,
    val_fraction: float = 0.1,
    batch_size: int | None = None,
    lr: float | None = None,
    sparse_lr: float | None = None,
    emb_l2: float | None = None,
    model_args: dict | None = None,
    threads: int = THREADS,
) -> tuple[_CTRBase, dict]:
    """Train ``model`` ("lr" | "deep") on ``dataset``; returns ``(module, info)``.

    ``info`` holds the split (``split_time_ms``, ``train_window_ms``, ``val_window_ms``,
    row counts), the hyper-parameters, ``train_seconds``, the per-epoch training and
    validation log loss, and the validation rows' indices into ``dataset``
    (``val_index``) with the model's probabilities for them (``val_probs``) and the labels
    (``val_labels``) - what ``ctrstream.models.evaluation.evaluate`` needs next to the oracle.
    """
    if model not in DEFAULTS:
        raise TrainingError(f"unknown model {model!r}: use 'lr' or 'deep'")
    if neg_downsample is not None and not (0.0 < neg_downsample <= 1.0):
        raise TrainingError(f"neg_downsample must be in (0, 1], got {neg_downsample}")
    missing = {"event_time_ms", "label", "dense", "sparse"} - set(dataset)
    if missing:
        raise TrainingError(f"dataset lacks {sorted(missing)}")
    d = DEFAULTS[model]
    epochs = d["epochs"] if epochs is None else epochs
    batch_size = batch_size or d["batch_size"]
    lr = lr or d["lr"]
    sparse_lr = sparse_lr or d["sparse_lr"]
    emb_l2 = d["emb_l2"] if emb_l2 is None else emb_l2
    margs = {**d["model_args"], **(model_args or {})}

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    t = np.asarray(dataset["event_time_ms"], dtype=np.int64)
    y_all = np.asarray(dataset["label"]).astype(np.float32)
    sparse_all = np.asarray(dataset["sparse"], dtype=np.int64)
    dense_all = np.asarray(dataset["dense"], dtype=np.float32)
    train_idx, val_idx, cut = time_split(t, val_fraction)
    if neg_downsample is not None and neg_downsample < 1.0:
        keep = (y_all[train_idx] > 0) | (rng.random(len(train_idx)) < neg_downsample)
        fit_idx = train_idx[keep]
    else:
        fit_idx = train_idx

    # one copy of the training rows' dense inputs at a time (they are most of a large
    # training set's memory): the normalization is fitted on it, and it is what is fitted
    # on unless negatives are down-sampled
    dense_train = dense_all[train_idx]
    mean, std = dense_train.mean(axis=0), dense_train.std(axis=0)
    dense_fit = dense_train if fit_idx is train_idx else dense_all[fit_idx]
    del dense_train
    net = build(model, dense_mean=mean, dense_std=std, **margs)
    net.train()

    s_t = torch.from_numpy(np.ascontiguousarray(sparse_all[fit_idx]))
    d_t = torch.from_numpy(np.ascontiguousarray(dense_fit))
    y_t = torch.from_numpy(np.ascontiguousarray(y_all[fit_idx])).reshape(-1, 1)
    n = len(fit_idx)
    if y_t.sum() == 0:
        raise TrainingError("the training rows contain no clicks")

    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(net.dense_parameters(), lr=lr)]
    if net.sparse_parameters():
        opts.append(torch.optim.SparseAdam(net.sparse_parameters(), lr=sparse_lr))
    loss_fn = nn.BCEWithLogitsLoss()

    steps_per_epoch = math.ceil(n / batch_size)
    history: list[dict] = []
    t_start = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task(f"train {model}", total=steps_per_epoch * epochs, loss="-", rate="-")
        for epoch in range(epochs):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=gen)
            ema, total, seen = None, 0.0, 0
            t_epoch = time.perf_counter()
            for step in range(steps_per_epoch):
                bi = perm[step * batch_size : (step + 1) * batch_size]
                logit = net.logit_raw(s_t[bi], d_t[bi])
                loss = loss_fn(logit, y_t[bi])
                if emb_l2:
                    loss = loss + emb_l2 * net.embedding_l2(s_t[bi])
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in opts:
                    o.step()
                lv = float(loss.detach())
                total += lv * len(bi)
                seen += len(bi)
                ema = lv if ema is None else 0.95 * ema + 0.05 * lv
                if step % 5 == 0 or step == steps_per_epoch - 1:
                    el = time.perf_counter() - t_epoch
                    bar.update(
                        task,
                        completed=epoch * steps_per_epoch + step + 1,
                        loss=f"{ema:.4f}",
                        rate=f"{seen / max(el, 1e-9):,.0f}",
                        description=f"train {model} e{epoch + 1}/{epochs}",
                    )
            net.set_negative_sampling_rate(neg_downsample)
            vp = predict(net, sparse_all[val_idx], dense_all[val_idx])
            history.append(
                dict(
                    epoch=epoch + 1,
                    train_logloss=total / max(seen, 1),
                    val_logloss=log_loss(vp, y_all[val_idx]),
                )
            )
    train_seconds = time.perf_counter() - t_start
    net.set_negative_sampling_rate(neg_downsample)
    net.eval()
    val_probs = predict(net, sparse_all[val_idx], dense_all[val_idx])

    info = dict(
        kind=model,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        sparse_lr=sparse_lr,
        emb_l2=emb_l2,
        threads=threads,
        neg_downsample=neg_downsample,
        model_config=dict(net.config),
        val_fraction=val_fraction,
        split_time_ms=int(cut),
        train_window_ms=[int(t[train_idx].min()), int(t[train_idx].max())],
        val_window_ms=[int(t[val_idx].min()), int(t[val_idx].max())],
        train_rows=int(len(train_idx)),
        fit_rows=int(n),
        val_rows=int(len(val_idx)),
        train_ctr=float(y_all[train_idx].mean()),
        val_ctr=float(y_all[val_idx].mean()),
        train_seconds=round(train_seconds, 2),
        history=history,
        parameters=int(sum(p.numel() for p in net.parameters())),
        val_index=val_idx,
        val_probs=val_probs,
        val_labels=y_all[val_idx].astype(np.int8),
    )
    return net, info


def save_checkpoint(model: _CTRBase, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dict(model.config), "state_dict": model.state_dict()}, path)
    return path


def load_checkpoint(path: str | Path) -> _CTRBase:
    ck = torch.load(Path(path), map_location="cpu", weights_only=False)
    cfg = dict(ck["config"])
    kind = cfg.pop("kind")
    net = build(kind, **cfg)
    net.load_state_dict(ck["state_dict"])
    net.eval()
    return net


__all__ = [
    "DEFAULTS",
    "TrainingError",
    "load_checkpoint",
    "predict",
    "save_checkpoint",
    "time_split",
    "train",
]
