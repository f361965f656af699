"""The training loop: AdamW with a one-cycle or cosine schedule, early stopping, checkpoints
that resume, seeds, and on CUDA bf16 autocast, pinned memory and non-blocking copies.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from tasks.errors import ParameterError
from training.augment import mixup, spec_augment
from training.heap import reused_heap
from training.models import Tagger, forward_batches, inference_batch_size


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (logged to MLflow with the model config)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    schedule: str = "onecycle"  # or "cosine"
    patience: int = 6
    seed: int = 0
    crop_frames: int | None = None
    specaugment: bool = False
    mixup_alpha: float = 0.0
    balance: bool = False  # weight the loss by inverse class frequency (rare classes count)
    num_workers: int | None = None  # default: 0 on CPU, 4 on CUDA
    max_steps: int | None = None  # stop early (smoke tests, benchmarks)
    device: str | None = None  # default: cuda when available

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields."""
        return asdict(self)


@dataclass
class TrainResult:
    """Best weights and what happened on the way."""

    state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    segments_per_s: float = 0.0
    data_wait_share: float = 0.0
    steps: int = 0


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - third-party code may use the legacy global RNG
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given, else CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def loss_fn(logits: torch.Tensor, target: torch.Tensor, multi_label: bool,
            class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Soft-target cross entropy (single label) or binary cross entropy (multi-label).

    ``class_weights`` ``(n_classes,)`` weight each example by its (soft) target's classes, or
    each class's positives for multi-label (see :func:`balanced_weights`).
    """
    logits = logits.float()
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=class_weights)
    if class_weights is None:
        return F.cross_entropy(logits, target)
    per_example = -(target * F.log_softmax(logits, dim=-1)).sum(-1)
    weight = target @ class_weights
    return (per_example * weight).sum() / weight.sum().clamp_min(1e-12)


def balanced_weights(targets: np.ndarray, *, multi_label: bool, cap: float = 10.0
                     ) -> torch.Tensor:
    """Class weights from training targets ``(n, n_classes)``.

    Single label: ``n / (n_classes * count)``, so every class weighs the same in the loss;
    multi-label: positives weighted ``negatives / positives``. Capped at ``cap``; classes
    absent from training get weight 1.
    """
    counts = targets.sum(0).astype(np.float64)
    n, k = targets.shape
    if multi_label:
        w = np.where(counts > 0, (n - counts) / np.maximum(counts, 1), 1.0)
    else:
        w = np.where(counts > 0, n / (k * np.maximum(counts, 1e-12)), 1.0)
    return torch.tensor(np.clip(w, 1.0 / cap, cap), dtype=torch.float32)


@dataclass
class _Run:
    """What one :func:`train_network` call sets up once: device, data order, optimiser."""

    device: torch.device
    generator: torch.Generator
    loader: DataLoader
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    multi_label: bool
    class_weights: torch.Tensor | None

    @property
    def cuda(self) -> bool:
        """Whether the run is on a CUDA device."""
        return self.device.type == "cuda"


@dataclass
class _State:
    """Where a run stands after an epoch: what a checkpoint saves and a resume restores."""

    epoch: int = -1  # the last finished epoch
    best: float = -math.inf
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    step: int = 0


@dataclass
class _Clock:
    """Segments trained on, seconds computing and seconds waiting for data."""

    seen: int = 0
    busy: float = 0.0
    wait: float = 0.0


def train_network(model: Tagger, train_ds: Dataset, valid_ds: Dataset, config: TrainConfig, *,
                  multi_label: bool, score: Callable[[Tagger], float],
                  class_weights: torch.Tensor | None = None,
                  checkpoint_dir: str | None = None, resume: bool = True,
                  on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                  keep_last: bool = False) -> TrainResult:
    """Train ``model``; keep the weights with the best ``score`` (higher is better), or with
    ``keep_last`` those of the last epoch (a refit with a fixed epoch count).

    Parameters
    ----------
    model : Tagger
    train_ds, valid_ds : Dataset
        ``(matrix, target)`` datasets.
    config : TrainConfig
    multi_label : bool
    score : callable
        Validation score of the model (e.g. track-level macro-F1), called once per epoch.
    checkpoint_dir : str, optional
        Where ``last.pt`` is written after every epoch; with ``resume`` an existing one is
        loaded and training continues from the epoch after it.
    on_epoch : callable, optional
        Receives ``(epoch, metrics)`` after each epoch.
    """
    run = _setup(model, train_ds, config, multi_label=multi_label, class_weights=class_weights)
    # on CPU, a step reuses the previous step's activation memory (decision 74)
    with reused_heap(run.device.type == "cpu"):
        ckpt = os.path.join(checkpoint_dir, "last.pt") if checkpoint_dir else None
        state = _restore(ckpt, model, run) if ckpt and resume and os.path.exists(ckpt) else _State()
        clock = _Clock()
        stale = 0 if state.best_epoch < 0 else (state.epoch - state.best_epoch)
        for epoch in range(state.epoch + 1, config.epochs):
            if hasattr(train_ds, "epoch"):
                train_ds.epoch = epoch
            losses = _run_epoch(model, run, config, state, clock)
            metrics = {"train_loss": float(np.mean(losses)) if losses else float("nan"),
                       "valid_score": score(model), "lr": float(run.opt.param_groups[0]["lr"])}
            state.history.append({"epoch": epoch, **metrics})
            if on_epoch:
                on_epoch(epoch, metrics)
            value = float(epoch) if keep_last else metrics["valid_score"]
            stale = 0 if _keep_if_best(model, state, epoch, value) else stale + 1
            state.epoch = epoch
            if ckpt:
                _save(ckpt, model, run, state)
            if stale >= config.patience or _out_of_steps(config, state.step):
                break
    if state.best_state is None:
        state.best_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model.load_state_dict(state.best_state)
    total = clock.busy + clock.wait
    return TrainResult(state.best_state, state.best_epoch, state.best, state.history,
                       segments_per_s=clock.seen / total if total else 0.0,
                       data_wait_share=clock.wait / total if total else 0.0, steps=state.step)


def _setup(model: Tagger, train_ds: Dataset, config: TrainConfig, *, multi_label: bool,
           class_weights: torch.Tensor | None) -> _Run:
    """Seed, move ``model`` to its device, and build the loader, optimiser and schedule."""
    generator = seed_everything(config.seed)
    device = pick_device(config.device)
    cuda = device.type == "cuda"
    model.place(device)
    weights = class_weights.to(device) if class_weights is not None else None
    workers = config.num_workers if config.num_workers is not None else (4 if cuda else 0)
    # a last batch of one segment cannot train the BatchNorm layers ("Expected more than 1
    # value per channel"): drop it (shuffled, so a different segment waits each epoch)
    one_left = len(train_ds) % config.batch_size == 1 and len(train_ds) > 1  # type: ignore[arg-type]
    loader = DataLoader(train_ds, batch_size=config.batch_size, shuffle=True, drop_last=one_left,
                        num_workers=workers, pin_memory=cuda, generator=generator,
                        persistent_workers=workers > 0)
    # the schedule spans every epoch; max_steps only stops the loop early, so an interrupted
    # run and its resumption follow the same schedule
    total_steps = max(1, len(loader)) * config.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return _Run(device, generator, loader, opt, _schedule(opt, config, total_steps),
                total_steps, multi_label, weights)


def _schedule(opt: torch.optim.Optimizer, config: TrainConfig, total_steps: int
              ) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle, or linear warm-up (5 % of the steps) then cosine decay."""
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=max(total_steps, 2), pct_start=0.2)
    warm = max(1, total_steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5
                                             * (1 + math.cos(math.pi * min(s, total_steps)
                                                             / max(1, total_steps))))


def _run_epoch(model: Tagger, run: _Run, config: TrainConfig, state: _State, clock: _Clock
               ) -> list[float]:
    """One pass over the training data (ending early at ``config.max_steps``); batch losses."""
    model.train()
    losses = []
    tick = time.perf_counter()
    for x, y in run.loader:
        got = time.perf_counter()
        clock.wait += got - tick
        losses.append(_train_step(model, run, config, x, y, step=state.step))
        state.step += 1
        clock.seen += x.shape[0]
        if run.cuda:
            torch.cuda.synchronize()
        tick = time.perf_counter()
        clock.busy += tick - got
        if _out_of_steps(config, state.step):
            break
    return losses


def _train_step(model: Tagger, run: _Run, config: TrainConfig, x: torch.Tensor,
                y: torch.Tensor, *, step: int) -> float:
    """Augment one batch, take one optimiser and schedule step; return the batch loss."""
    x = x.to(run.device, non_blocking=run.cuda)
    y = y.to(run.device, non_blocking=run.cuda)
    if config.specaugment:
        x = spec_augment(x, generator=run.generator)
    x, y = mixup(x, y, config.mixup_alpha, generator=run.generator)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.cuda):
        logits = model(x)
    loss = loss_fn(logits, y, run.multi_label, run.class_weights)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    if step < run.total_steps - 1 or config.schedule != "onecycle":
        run.sched.step()
    return float(loss.detach())


def _out_of_steps(config: TrainConfig, step: int) -> bool:
    return bool(config.max_steps and step >= config.max_steps)


def _keep_if_best(model: Tagger, state: _State, epoch: int, value: float) -> bool:
    """Keep a copy of the weights if ``value`` beats the best so far; say whether it did."""
    if not value > state.best:  # a NaN score never wins
        return False
    state.best, state.best_epoch = value, epoch
    state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in
                                      model.state_dict().items()})
    return True


def _save(path: str, model: Tagger, run: _Run, state: _State) -> None:
    """Write the checkpoint atomically (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": run.opt.state_dict(),
                "scheduler": run.sched.state_dict(), "epoch": state.epoch, "best": state.best,
                "best_epoch": state.best_epoch, "best_state": state.best_state,
                "history": state.history, "step": state.step, "total_steps": run.total_steps,
                "generator": run.generator.get_state(), "rng": _rng_states()},
               path + ".tmp")
    os.replace(path + ".tmp", path)


def _restore(path: str, model: Tagger, run: _Run) -> _State:
    """Load model, optimiser, schedule and RNG states from a checkpoint; return its state."""
    saved = torch.load(path, map_location=run.device, weights_only=False)
    if saved.get("total_steps") != run.total_steps:
        raise ParameterError(
            f"checkpoint {path} was made for {saved.get('total_steps')} steps, this run "
            f"plans {run.total_steps}: resume with the same epochs, batch size and data, or "
            "use another work folder")
    model.load_state_dict(saved["model"])
    run.opt.load_state_dict(saved["optimizer"])
    run.sched.load_state_dict(saved["scheduler"])
    run.generator.set_state(saved["generator"])
    _set_rng_states(saved["rng"])
    return _State(epoch=saved["epoch"], best=saved["best"], best_epoch=saved["best_epoch"],
                  best_state=saved["best_state"], history=saved["history"], step=saved["step"])


def _rng_states() -> dict[str, Any]:
    """Global RNG states (dropout, augmentation) so a resumed run continues the same draws."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),  # noqa: NPY002
                              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])  # noqa: NPY002
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def predict(model: Tagger, dataset: Dataset, *, batch_size: int | None = None,
            device: torch.device | None = None, embeddings: bool = False,
            logits: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (softmax or sigmoid applied here; with ``logits`` the raw logits) and
    optionally embeddings. ``batch_size``: by default :func:`training.models.inference_batch_size`
    of a row's size and the device.
    """
    device = device or next(model.parameters()).device
    multi = bool(getattr(model, "multi_label", False))
    model = model.eval().folded()  # batch norms folded (decision 73); the model is unchanged
    if batch_size is None:
        row_values = int(np.prod(np.shape(dataset[0][0]))) if len(dataset) else 1  # type: ignore[arg-type]
        batch_size = inference_batch_size(row_values, device.type)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return forward_batches(model, (x for x, _ in loader), device, multi_label=multi,
                           scale=None if logits else 1.0, embeddings=embeddings)
