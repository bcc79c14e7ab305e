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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import nn

from ctrstream.metrics import log_loss
from ctrstream.models.nets import _CTRBase, build
from ctrstream.models.streaming_data import Moments, RowStream, ShuffleBuffer


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


def _hyperparameters(
    model: str,
    neg_downsample: float | None,
    epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    sparse_lr: float | None,
    emb_l2: float | None,
    model_args: dict | None,
) -> dict[str, Any]:
    """The model kind's defaults overridden by the given values (checked)."""
    if model not in DEFAULTS:
        raise TrainingError(f"unknown model {model!r}: use 'lr' or 'deep'")
    if neg_downsample is not None and not (0.0 < neg_downsample <= 1.0):
        raise TrainingError(f"neg_downsample must be in (0, 1], got {neg_downsample}")
    d = DEFAULTS[model]
    return dict(
        epochs=d["epochs"] if epochs is None else epochs,
        batch_size=batch_size or d["batch_size"],
        lr=lr or d["lr"],
        sparse_lr=sparse_lr or d["sparse_lr"],
        emb_l2=d["emb_l2"] if emb_l2 is None else emb_l2,
        model_args={**d["model_args"], **(model_args or {})},
    )


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # sparse ids, dense, labels (rows, 1)


def _fit(
    net: _CTRBase,
    model: str,
    hp: dict[str, Any],
    batches: Callable[[int], Iterable[Batch]],
    steps_per_epoch: int,
    val_logloss: Callable[[], float],
    neg_downsample: float | None,
    progress: bool,
) -> tuple[list[dict], float]:
    """The training loop both data paths share: ``hp["epochs"]`` passes over
    ``batches(epoch)`` (Adam on the dense parameters, SparseAdam on the embedding tables),
    the validation log loss after each; returns (per-epoch history, seconds)."""
    epochs, emb_l2 = hp["epochs"], hp["emb_l2"]
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(net.dense_parameters(), lr=hp["lr"])]
    if net.sparse_parameters():
        opts.append(torch.optim.SparseAdam(net.sparse_parameters(), lr=hp["sparse_lr"]))
    loss_fn = nn.BCEWithLogitsLoss()
    history: list[dict] = []
    t_start = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task(f"train {model}", total=steps_per_epoch * epochs, loss="-", rate="-")
        for epoch in range(epochs):
            ema, total, seen = None, 0.0, 0
            t_epoch = time.perf_counter()
            for step, (s_b, d_b, y_b) in enumerate(batches(epoch)):
                logit = net.logit_raw(s_b, d_b)
                loss = loss_fn(logit, y_b)
                if emb_l2:
                    loss = loss + emb_l2 * net.embedding_l2(s_b)
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in opts:
                    o.step()
                lv = float(loss.detach())
                total += lv * len(y_b)
                seen += len(y_b)
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
            history.append(
                dict(
                    epoch=epoch + 1,
                    train_logloss=total / max(seen, 1),
                    val_logloss=val_logloss(),
                )
            )
    train_seconds = time.perf_counter() - t_start
    net.set_negative_sampling_rate(neg_downsample)
    net.eval()
    return history, train_seconds


def _info(net: _CTRBase, model: str, seed: int, hp: dict, **rest: Any) -> dict:
    return dict(
        kind=model,
        seed=seed,
        epochs=hp["epochs"],
        batch_size=hp["batch_size"],
        lr=hp["lr"],
        sparse_lr=hp["sparse_lr"],
        emb_l2=hp["emb_l2"],
        threads=rest.pop("threads"),
        neg_downsample=rest.pop("neg_downsample"),
        model_config=dict(net.config),
        **rest,
        parameters=int(sum(p.numel() for p in net.parameters())),
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
    hp = _hyperparameters(
        model, neg_downsample, epochs, batch_size, lr, sparse_lr, emb_l2, model_args
    )
    missing = {"event_time_ms", "label", "dense", "sparse"} - set(dataset)
    if missing:
        raise TrainingError(f"dataset lacks {sorted(missing)}")
    batch_size = hp["batch_size"]

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
    net = build(model, dense_mean=mean, dense_std=std, **hp["model_args"])
    net.train()

    s_t = torch.from_numpy(np.ascontiguousarray(sparse_all[fit_idx]))
    d_t = torch.from_numpy(np.ascontiguousarray(dense_fit))
    y_t = torch.from_numpy(np.ascontiguousarray(y_all[fit_idx])).reshape(-1, 1)
    n = len(fit_idx)
    if y_t.sum() == 0:
        raise TrainingError("the training rows contain no clicks")

    def batches(epoch: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            bi = perm[i : i + batch_size]
            yield s_t[bi], d_t[bi], y_t[bi]

    def val_logloss() -> float:
        return log_loss(predict(net, sparse_all[val_idx], dense_all[val_idx]), y_all[val_idx])

    history, train_seconds = _fit(
        net,
        model,
        hp,
        batches,
        math.ceil(n / batch_size),
        val_logloss,
        neg_downsample,
        progress,
    )
    val_probs = predict(net, sparse_all[val_idx], dense_all[val_idx])

    info = _info(
        net,
        model,
        seed,
        hp,
        threads=threads,
        neg_downsample=neg_downsample,
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
        val_index=val_idx,
        val_probs=val_probs,
        val_labels=y_all[val_idx].astype(np.int8),
    )
    return net, info


# --------------------------------------------------------------------------- streamed

SHUFFLE_ROWS = 1 << 18  # rows in the shuffle buffer: ~120 MB with 96 dense and 10 sparse


class _Span:
    """Count, clicks and event-time range of a set of rows, accumulated batch by batch."""

    def __init__(self) -> None:
        self.rows, self.clicks = 0, 0
        self.t_min: int | None = None
        self.t_max: int | None = None

    def add(self, t: np.ndarray, y: np.ndarray) -> None:
        if len(t) == 0:
            return
        self.rows += len(t)
        self.clicks += int(y.sum())
        lo, hi = int(t.min()), int(t.max())
        self.t_min = lo if self.t_min is None else min(self.t_min, lo)
        self.t_max = hi if self.t_max is None else max(self.t_max, hi)

    @property
    def window(self) -> list[int]:
        return [int(self.t_min or 0), int(self.t_max or 0)]


def _first_time_from(stream: RowStream, start_ms: int | None) -> int | None:
    """The earliest event time ``>= start_ms`` in the stream (None when there is none)."""
    if start_ms is None:
        return int(stream.t_min) if stream.rows else None
    for piece in stream.pieces:
        if piece.t_max < start_ms:
            continue
        for b in stream.read(piece, ["event_time_ms"]):
            t = b["event_time_ms"]
            t = t[t >= start_ms]
            if len(t):
                return int(t.min())
    return None


def _keep(rng: np.random.Generator, y: np.ndarray, neg_downsample: float | None) -> np.ndarray:
    """Rows kept for fitting: every positive, negatives with probability ``neg_downsample``."""
    if neg_downsample is None or neg_downsample >= 1.0:
        return np.ones(len(y), dtype=bool)
    return (y > 0) | (rng.random(len(y)) < neg_downsample)


def train_streamed(
    stream: RowStream,
    model: str = "deep",
    seed: int = 0,
    epochs: int | None = None,
    neg_downsample: float | None = None,
    progress: bool = True,
    *,
    start_ms: int | None = None,
    val_fraction: float = 0.1,
    batch_size: int | None = None,
    lr: float | None = None,
    sparse_lr: float | None = None,
    emb_l2: float | None = None,
    model_args: dict | None = None,
    threads: int = THREADS,
    shuffle_rows: int = SHUFFLE_ROWS,
) -> tuple[_CTRBase, dict]:
    """:func:`train` over a training set that is read, never held: ``stream`` is a
    :class:`~ctrstream.models.streaming_data.RowStream` (``ctrstream.batch.shards.open_shards``
    of a shard directory). Memory holds the shuffle buffer (``shuffle_rows`` rows), one read
    batch and the validation rows' predictions, whatever the set's size.

    * Rows before ``start_ms`` are skipped (the warm-up: feature history only).
    * The split is :func:`time_split`'s: validation = the last ``val_fraction`` of the
      event-time span of the rows from ``start_ms`` on (its first time found by reading the
      times of the first pieces, its last from the stream's metadata); a piece that
      straddles the split is split by row.
    * The dense normalization is fitted in one pass over the training rows
      (:class:`~ctrstream.models.streaming_data.Moments`: exact mean and population std).
    * Each epoch reads the training pieces in a seeded random order through a seeded
      :class:`~ctrstream.models.streaming_data.ShuffleBuffer`; negatives are down-sampled
      with a generator seeded per piece (the same rows every epoch).
    * Evaluation streams the validation rows in time order.

    ``info`` is :func:`train`'s with ``val_ids`` (the validation rows' impression ids, a
    pyarrow array) in place of ``val_index``; the same seed and data give the same weights.
    """
    import pyarrow as pa

    hp = _hyperparameters(
        model, neg_downsample, epochs, batch_size, lr, sparse_lr, emb_l2, model_args
    )
    batch_size = hp["batch_size"]
    torch.set_num_threads(threads)
    torch.manual_seed(seed)

    t0 = _first_time_from(stream, start_ms)
    if t0 is None:
        raise TrainingError("the training set is empty")
    lo, t1 = t0, int(stream.t_max)
    cut = t0 + int(math.ceil((t1 - t0) * (1.0 - val_fraction)))
    pieces = [p for p in stream.pieces if p.t_max >= lo]
    train_pieces = [(i, p) for i, p in enumerate(pieces) if p.t_min < cut]
    val_pieces = [p for p in pieces if p.t_max >= cut]

    def keep_rng(i: int) -> np.random.Generator:
        return np.random.default_rng([seed, i])

    # one pass: the normalization, the split's counts and windows, the fitted rows
    train_span, val_span = _Span(), _Span()
    fit_rows, fit_clicks = 0, 0
    moments_ = None
    for i, p in train_pieces:
        rng = keep_rng(i)
        for b in stream.read(p, ["event_time_ms", "label", "dense"]):
            t, y, d = b["event_time_ms"], b["label"], b["dense"]
            kept = _keep(rng, y, neg_downsample)
            m = (t >= lo) & (t < cut)
            if moments_ is None:
                moments_ = Moments(d.shape[1])
            moments_.add(d[m])
            train_span.add(t[m], y[m])
            fit_rows += int((m & kept).sum())
            fit_clicks += int(y[m & kept].sum())
    for p in val_pieces:
        for b in stream.read(p, ["event_time_ms", "label"]):
            m = b["event_time_ms"] >= cut
            val_span.add(b["event_time_ms"][m], b["label"][m])
    if train_span.rows == 0 or val_span.rows == 0:
        raise TrainingError(
            f"time split at {cut} leaves an empty side "
            f"({train_span.rows} train / {val_span.rows} validation rows)"
        )
    if fit_clicks == 0:
        raise TrainingError("the training rows contain no clicks")
    assert moments_ is not None
    net = build(model, dense_mean=moments_.mean, dense_std=moments_.std, **hp["model_args"])
    net.train()

    def batches(epoch: int) -> Iterator[Batch]:
        order = np.random.default_rng([seed, epoch, 0]).permutation(len(train_pieces))
        buf = ShuffleBuffer(shuffle_rows, batch_size, np.random.default_rng([seed, epoch, 1]))
        cols = ["event_time_ms", "label", "dense", "sparse"]

        def tensors(arrays: tuple[np.ndarray, ...]) -> Batch:
            s, d, y = arrays
            return (
                torch.from_numpy(np.ascontiguousarray(s)),
                torch.from_numpy(np.ascontiguousarray(d)),
                torch.from_numpy(y.astype(np.float32)).reshape(-1, 1),
            )

        for k in order:
            i, p = train_pieces[k]
            rng = keep_rng(i)
            for b in stream.read(p, cols):
                t, y = b["event_time_ms"], b["label"]
                m = (t >= lo) & (t < cut) & _keep(rng, y, neg_downsample)
                for out in buf.push((b["sparse"][m], b["dense"][m], y[m])):
                    yield tensors(out)
        for out in buf.drain():
            yield tensors(out)

    def validate(with_ids: bool) -> tuple[np.ndarray, np.ndarray, Any]:
        cols = ["event_time_ms", "label", "dense", "sparse"] + (["impression_id"] * with_ids)
        probs, labels, ids = [], [], []
        for p in val_pieces:
            for b in stream.read(p, cols):
                m = b["event_time_ms"] >= cut
                if not m.any():
                    continue
                probs.append(predict(net, b["sparse"][m], b["dense"][m]))
                labels.append(b["label"][m].astype(np.int8))
                if with_ids:
                    ids.append(b["impression_id"].filter(pa.array(m)))
        val_ids = pa.chunked_array(ids, type=pa.string()) if with_ids else None
        return np.concatenate(probs), np.concatenate(labels), val_ids

    def val_logloss() -> float:
        probs, labels, _ = validate(False)
        return log_loss(probs, labels.astype(np.float32))

    history, train_seconds = _fit(
        net,
        model,
        hp,
        batches,
        math.ceil(fit_rows / batch_size),
        val_logloss,
        neg_downsample,
        progress,
    )
    val_probs, val_labels, val_ids = validate(True)
    info = _info(
        net,
        model,
        seed,
        hp,
        threads=threads,
        neg_downsample=neg_downsample,
        val_fraction=val_fraction,
        split_time_ms=int(cut),
        train_window_ms=train_span.window,
        val_window_ms=val_span.window,
        train_rows=train_span.rows,
        fit_rows=fit_rows,
        val_rows=val_span.rows,
        train_ctr=train_span.clicks / train_span.rows,
        val_ctr=val_span.clicks / val_span.rows,
        train_seconds=round(train_seconds, 2),
        history=history,
        streamed=dict(pieces=len(pieces), shuffle_rows=int(shuffle_rows)),
        val_ids=val_ids,
        val_probs=val_probs,
        val_labels=val_labels,
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
    "train_streamed",
]
