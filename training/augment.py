"""Batch augmentations as pure tensor functions: SpecAugment masks and mixup."""

from __future__ import annotations

import torch


def spec_augment(x: torch.Tensor, *, freq_masks: int = 2, freq_width: int = 12,
                 time_masks: int = 2, time_width: int = 16,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask random row bands and frame bands of ``x`` ``(batch, rows, frames)`` with its mean.

    Returns a new tensor; ``x`` is unchanged.
    """
    out = x.clone()
    b, rows, frames = x.shape
    fill = x.mean(dim=(1, 2), keepdim=True)
    device = x.device
    for count, width, size, axis in ((freq_masks, freq_width, rows, 1),
                                     (time_masks, time_width, frames, 2)):
        for _ in range(count):
            w = torch.randint(0, width + 1, (b,), generator=generator).to(device)
            start = (torch.rand(b, generator=generator).to(device) * (size - w).clamp_min(1)).long()
            pos = torch.arange(size, device=device).view(1, -1)
            mask = (pos >= start.view(-1, 1)) & (pos < (start + w).view(-1, 1))
            mask = mask.unsqueeze(2 if axis == 1 else 1)
            out = torch.where(mask, fill, out)
    return out


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Convex combinations of shuffled pairs (Zhang et al. 2018); ``alpha <= 0`` is a no-op."""
    if alpha <= 0:
        return x, y
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
