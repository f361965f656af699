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
from training.models import Tagger


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


def train_network(model: Tagger, train_ds: Dataset, valid_ds: Dataset, config: TrainConfig, *,
          multi_label: bool, score: Callable[[Tagger], float],
          class_weights: torch.Tensor | None = None,
          checkpoint_dir: str | None = None, resume: bool = True,
          on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``model``; keep the weights with the best ``score`` (higher is better).

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
    generator = seed_everything(config.seed)
    device = pick_device(config.device)
    cuda = device.type == "cuda"
    model.to(device)
    weights = class_weights.to(device) if class_weights is not None else None
    workers = config.num_workers if config.num_workers is not None else (4 if cuda else 0)
    loader = DataLoader(train_ds, batch_size=config.batch_size, shuffle=True, drop_last=False,
                        num_workers=workers, pin_memory=cuda, generator=generator,
                        persistent_workers=workers > 0)
    steps_per_epoch = max(1, len(loader))
    # the schedule spans every epoch; max_steps only stops the loop early, so an interrupted
    # run and its resumption follow the same schedule
    total_steps = steps_per_epoch * config.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.schedule == "onecycle":
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=max(total_steps, 2), pct_start=0.2)
    else:
        warm = max(1, total_steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5
                                                  * (1 + math.cos(math.pi * min(s, total_steps)
                                                                  / max(1, total_steps))))
    start_epoch, best, best_epoch, best_state, history, step = 0, -math.inf, -1, None, [], 0
    ckpt = os.path.join(checkpoint_dir, "last.pt") if checkpoint_dir else None
    if ckpt and resume and os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state.get("total_steps") != total_steps:
            raise ParameterError(
                f"checkpoint {ckpt} was made for {state.get('total_steps')} steps, this run "
                f"plans {total_steps}: resume with the same epochs, batch size and data, or "
                "use another work folder")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
        best_state, history, step = state["best_state"], state["history"], state["step"]
        generator.set_state(state["generator"])
        _set_rng_states(state["rng"])
    seen, busy, wait = 0, 0.0, 0.0
    stale = 0 if best_epoch < 0 else (start_epoch - 1 - best_epoch)
    for epoch in range(start_epoch, config.epochs):
        if hasattr(train_ds, "epoch"):
            train_ds.epoch = epoch
        model.train()
        losses = []
        tick = time.perf_counter()
        for x, y in loader:
            got = time.perf_counter()
            wait += got - tick
            x = x.to(device, non_blocking=cuda)
            y = y.to(device, non_blocking=cuda)
            if config.specaugment:
                x = spec_augment(x, generator=generator)
            x, y = mixup(x, y, config.mixup_alpha, generator=generator)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(x)
            loss = loss_fn(logits, y, multi_label, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step < total_steps - 1 or config.schedule != "onecycle":
                sched.step()
            losses.append(float(loss.detach()))
            step += 1
            seen += x.shape[0]
            if cuda:
                torch.cuda.synchronize()
            tick = time.perf_counter()
            busy += tick - got
            if config.max_steps and step >= config.max_steps:
                break
        value = score(model)
        metrics = {"train_loss": float(np.mean(losses)) if losses else float("nan"),
                   "valid_score": value, "lr": float(opt.param_groups[0]["lr"])}
        history.append({"epoch": epoch, **metrics})
        if on_epoch:
            on_epoch(epoch, metrics)
        if value > best:
            best, best_epoch, stale = value, epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in
                                        model.state_dict().items()})
        else:
            stale += 1
        if ckpt:
            os.makedirs(checkpoint_dir, exist_ok=True)  # type: ignore[arg-type]
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "epoch": epoch, "best": best,
                        "best_epoch": best_epoch, "best_state": best_state,
                        "history": history, "step": step, "total_steps": total_steps,
                        "generator": generator.get_state(), "rng": _rng_states()},
                       ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
        if stale >= config.patience or (config.max_steps and step >= config.max_steps):
            break
    if best_state is None:
        best_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    total = busy + wait
    return TrainResult(best_state, best_epoch, best, history,
                       segments_per_s=seen / total if total else 0.0,
                       data_wait_share=wait / total if total else 0.0, steps=step)


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


@torch.inference_mode()
def predict(model: Tagger, dataset: Dataset, *, batch_size: int = 256,
            device: torch.device | None = None, embeddings: bool = False
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (softmax or sigmoid applied here) and optionally embeddings."""
    device = device or next(model.parameters()).device
    model.eval()
    multi = getattr(model, "multi_label", False)
    probs, embs = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, _ in loader:
        x = x.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            e = model.embed(x)
            logits = model.head(e).float()
        probs.append((torch.sigmoid(logits) if multi else torch.softmax(logits, -1)).cpu())
        if embeddings:
            embs.append(e.float().cpu())
    p = torch.cat(probs).numpy() if probs else np.zeros((0, model.n_classes), np.float32)
    return p, (torch.cat(embs).numpy() if embeddings and embs else None)
