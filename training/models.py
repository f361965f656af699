"""Models: a config dataclass per architecture, built by name from a registry.

Every model takes ``(batch, rows, frames)`` matrices (log-mel: rows = n_mels; MFCC: rows =
n_mfcc), standardises them with per-row statistics of the training set (stored as buffers, so
a saved model carries them), and returns **logits**; activations and losses live outside.
``embed`` returns the layer before the head (the embedding used for similarity search).
Sizes come from the config and the data, never hard-coded.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Fields shared by every neural model."""

    name: ClassVar[str] = ""
    input: ClassVar[str] = "logmel"
    dropout: float = 0.3
    embed_dim: int = 256

    def to_dict(self) -> dict[str, Any]:
        """Config fields plus ``name`` and ``input``."""
        return {"name": self.name, "input": self.input, **asdict(self)}


@dataclass(frozen=True)
class CNNConfig(ModelConfig):
    """2-D CNN on log-mel: conv-BN-ReLU-pool blocks, global avg+max pooling."""

    name: ClassVar[str] = "cnn"
    channels: tuple[int, ...] = (32, 64, 128, 128)


@dataclass(frozen=True)
class MFCCCNNConfig(ModelConfig):
    """The notebooks' three-conv CNN on MFCC matrices."""

    name: ClassVar[str] = "mfcc_cnn"
    input: ClassVar[str] = "mfcc"
    channels: tuple[int, ...] = (32, 64, 64)
    embed_dim: int = 128


@dataclass(frozen=True)
class CRNNConfig(ModelConfig):
    """Conv front end that pools frequency away, then a recurrent layer over time."""

    name: ClassVar[str] = "crnn"
    channels: tuple[int, ...] = (64, 128, 128)
    rnn: str = "gru"
    hidden: int = 128
    bidirectional: bool = True


@dataclass(frozen=True)
class ShortChunkResNetConfig(ModelConfig):
    """Won et al. (2020) short-chunk ResNet: 7 residual 3x3 blocks, global max pool."""

    name: ClassVar[str] = "short_chunk_resnet"
    channels: int = 128
    blocks: int = 7
    embed_dim: int = 512


@dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    """CNN front end, then a Transformer encoder over time (Won et al. 2020, CNN + self-attention).

    ``channels`` are conv-BN-ReLU-maxpool blocks; each halves the frequency axis, and the
    time axis by its entry of ``time_pool``. The remaining ``channels[-1] x frequency`` values
    of a time step are projected to ``d_model``. ``pooling``: ``"cls"`` (a learned [CLS]
    token) or ``"mean"`` over time steps. ``max_positions`` is the length of the learned
    positional table: a sequence of ``T`` steps uses its first ``T`` rows, a longer one the
    table resampled to ``T``. ``dropout`` is the embedding's, ``attention_dropout`` the
    encoder's.
    """

    name: ClassVar[str] = "transformer"
    channels: tuple[int, ...] = (32, 64, 128)
    time_pool: tuple[int, ...] = (2, 2, 1)
    d_model: int = 128
    heads: int = 4
    layers: int = 3
    ff_dim: int = 256
    attention_dropout: float = 0.1
    pooling: str = "cls"
    max_positions: int = 256

    def __post_init__(self) -> None:
        if len(self.time_pool) != len(self.channels):
            raise ValueError(f"time_pool {self.time_pool} needs one entry per block of "
                             f"channels {self.channels}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', not {self.pooling!r}")
        if self.max_positions < 1:
            raise ValueError("max_positions must be >= 1")


MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    c.name: c for c in (CNNConfig, MFCCCNNConfig, CRNNConfig, ShortChunkResNetConfig,
                        TransformerConfig)
}


class Standardize(nn.Module):
    """``(x - mean) / std`` per input row, statistics fixed from the training set."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(rows, 1))
        self.register_buffer("std", torch.ones(rows, 1))

    def set(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-row statistics (shape ``(rows,)``)."""
        self.mean.copy_(mean.reshape(-1, 1))
        self.std.copy_(std.clamp_min(1e-3).reshape(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Tagger(nn.Module):
    """Standardise → backbone (→ embedding) → linear head giving logits."""

    def __init__(self, config: ModelConfig, rows: int, n_classes: int) -> None:
        super().__init__()
        self.config, self.rows, self.n_classes = config, rows, n_classes
        self.standardize = Standardize(rows)
        self.backbone = _build_backbone(config, rows)
        self.head = nn.Linear(config.embed_dim, n_classes)
        self.channels_last = False

    def place(self, device: torch.device) -> Tagger:
        """Move to ``device`` in the layout that runs fastest there (decision 72): on CPU the
        convolution weights, and the backbone's input, channels-last (the same outputs,
        1.2-3x faster inference and 1.3-2.6x faster training steps); elsewhere the default
        layout (channels-last not measured on a GPU).
        """
        cpu = device.type == "cpu"
        layout = torch.channels_last if cpu else torch.contiguous_format
        # memory_format is a keyword of Module.to that torch's stubs do not list
        self.to(device, memory_format=layout)  # type: ignore[call-overload]
        self.channels_last = cpu
        return self

    def folded(self) -> Tagger:
        """A twin of this model for inference, each batch norm folded into the convolution or
        linear layer before it (decision 73): the same outputs to float rounding, 1.0-1.3x
        faster forward passes on CPU (CRNN 2.1-2.5x).

        The twin shares this model's input statistics and head (and their hooks); its
        backbone is a folded copy, on this model's device and layout. This model is left as
        it is (what is saved and trained); the twin's weights do not follow later changes.
        """
        if self.training:
            raise RuntimeError("fold an evaluation-mode model (batch norm folds its running "
                               "statistics)")
        twin = Tagger.__new__(Tagger)
        nn.Module.__init__(twin)
        twin.config, twin.rows, twin.n_classes = self.config, self.rows, self.n_classes
        twin.channels_last = self.channels_last
        twin.standardize, twin.head = self.standardize, self.head
        twin.backbone = fold_batch_norm(copy.deepcopy(self.backbone))
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        device = next(self.head.parameters()).device
        twin.backbone.to(device, memory_format=layout)  # type: ignore[call-overload]
        return twin.eval()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding ``(batch, embed_dim)`` of ``x`` ``(batch, rows, frames)``."""
        z = self.standardize(x).unsqueeze(1)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.backbone(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every batch norm that directly follows a ``Conv2d`` (``BatchNorm2d``)
    or a ``Linear`` (``BatchNorm1d``) in an ``nn.Sequential`` folded into that layer (children
    are replaced in place; a Sequential that folds is returned anew). Evaluation mode only:
    the running statistics become weights.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    for name, child in list(module.named_children()):
        setattr(module, name, fold_batch_norm(child))
    if not isinstance(module, nn.Sequential):
        return module
    layers: list[nn.Module] = []
    for layer in module:
        prev = layers[-1] if layers else None
        if isinstance(layer, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d):
            layers[-1] = fuse_conv_bn_eval(prev, layer)
        elif isinstance(layer, nn.BatchNorm1d) and isinstance(prev, nn.Linear):
            layers[-1] = fuse_linear_bn_eval(prev, layer)
        else:
            layers.append(layer)
    return nn.Sequential(*layers) if len(layers) < len(module) else module


def build_model(config: ModelConfig, rows: int, n_classes: int) -> Tagger:
    """Build the model for ``config`` with ``rows`` input rows and ``n_classes`` outputs."""
    return Tagger(config, rows, n_classes)


# Inference batches (decision 71). On CPU a batch's activations are kept small: a batch of
# 256 MFCC matrices (or of 64 log-mel ones) makes activations of tens of MB that glibc serves
# by mmap and returns each batch, so every batch page-faults its
# memory in again (1.8 M faults and half the throughput on philharmonia-dev's mfcc_cnn).
# 2**17 input values a batch (512 KiB: 50 MFCC rows, 7 log-mel ones) was at or next to the
# fastest batch for every family measured; a GPU takes large batches.
CPU_BATCH_VALUES = 2**17
CPU_BATCH_RANGE = (4, 256)
GPU_BATCH = 2048


def inference_batch_size(row_values: int, device_type: str) -> int:
    """Rows a forward pass takes at once when the caller does not say: ``GPU_BATCH`` on a
    GPU, else ``CPU_BATCH_VALUES // row_values`` clamped to ``CPU_BATCH_RANGE``.

    ``row_values``: the number of values in one input row (``rows * frames``).
    """
    if device_type == "cuda":
        return GPU_BATCH
    low, high = CPU_BATCH_RANGE
    return max(low, min(high, CPU_BATCH_VALUES // max(1, row_values)))


@torch.inference_mode()
def forward_batches(model: Tagger, batches: Iterable[torch.Tensor], device: torch.device, *,
                    multi_label: bool, scale: float | None = 1.0, embeddings: bool = False
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """The one batched forward pass of inference (a :class:`training.artifact.Predictor`'s
    and the training loop's validation): each batch moved to ``device`` and run in bf16
    autocast on CUDA; returns probabilities ``(n, n_classes)`` (sigmoid for ``multi_label``,
    else softmax, of the logits times ``scale``), or with ``scale`` None the logits, and with
    ``embeddings`` the layer before the head (float32 arrays).
    """
    cuda = device.type == "cuda"
    outs: list[np.ndarray] = []
    embs: list[np.ndarray] = []
    for batch in batches:
        x = batch.to(device, non_blocking=cuda)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            e = model.embed(x)
            logits = model.head(e).float()
        if scale is not None:
            logits = logits * scale if scale != 1.0 else logits
            logits = torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)
        outs.append(logits.cpu().numpy())
        if embeddings:
            embs.append(e.float().cpu().numpy())
    out = np.concatenate(outs) if outs else np.zeros((0, model.n_classes), np.float32)
    return out, (np.concatenate(embs) if embeddings and embs else None)


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of :meth:`ModelConfig.to_dict`."""
    data = dict(data)
    cls = MODEL_CONFIGS[data.pop("name")]
    data.pop("input", None)
    for key, value in list(data.items()):
        if isinstance(value, list):
            data[key] = tuple(value)
    return cls(**data)


# ----------------------------------------------------------------------------------------
def _conv_block(c_in: int, c_out: int, pool: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True),
        nn.MaxPool2d(pool, ceil_mode=True),
    )


class _GlobalPool(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        if self.mode == "max":
            return flat.amax(-1)
        return torch.cat([flat.mean(-1), flat.amax(-1)], dim=1)


def _embedding(c_in: int, dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, dim), nn.BatchNorm1d(dim), nn.ReLU(True),
                         nn.Dropout(dropout))


class _Recurrent(nn.Module):
    def __init__(self, config: CRNNConfig, c_in: int) -> None:
        super().__init__()
        rnn = nn.GRU if config.rnn == "gru" else nn.LSTM
        self.rnn = rnn(c_in, config.hidden, batch_first=True,
                       bidirectional=config.bidirectional)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.amax(dim=2).transpose(1, 2)  # (B, C, F', T') -> (B, T', C)
        out, _ = self.rnn(seq)
        return torch.cat([out.mean(1), out.amax(1)], dim=1)


class _Res2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.skip = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        ) if (stride != 1 or c_in != c_out) else nn.Identity()
        self.act = nn.ReLU(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class _TimeTransformer(nn.Module):
    """``(B, C, F', T')`` conv features → one ``d_model`` vector per segment.

    Each time step's ``C x F'`` values are projected to ``d_model``, a learned positional
    embedding is added (the first ``T'`` rows of the table; the table resampled to ``T'`` when
    the sequence is longer), then a pre-norm Transformer encoder; the output is the [CLS]
    token or the mean over time steps.
    """

    def __init__(self, config: TransformerConfig, c_in: int, freq: int) -> None:
        super().__init__()
        d = config.d_model
        self.cls_token = config.pooling == "cls"
        self.project = nn.Linear(c_in * freq, d)
        self.positions = nn.Parameter(torch.zeros(1, config.max_positions, d))
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.trunc_normal_(self.positions, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d, config.heads, config.ff_dim, config.attention_dropout, activation="gelu",
            batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, norm=nn.LayerNorm(d),
                                             enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.project(x.flatten(1, 2).transpose(1, 2))  # (B, C, F', T') -> (B, T', d)
        steps = seq.shape[1]
        table: torch.Tensor = self.positions
        if steps > table.shape[1]:  # longer than the table: resample it to the sequence
            table = nn.functional.interpolate(table.transpose(1, 2), size=steps,
                                              mode="linear", align_corners=False
                                              ).transpose(1, 2)
        seq = seq + table[:, :steps]
        if self.cls_token:
            seq = torch.cat([self.cls.expand(seq.shape[0], -1, -1), seq], dim=1)
        out = self.encoder(seq)
        return out[:, 0] if self.cls_token else out.mean(1)


def _pooled(size: int, pool: int, blocks: int) -> int:
    """Length of an axis of ``size`` after ``blocks`` ceil-mode max pools of ``pool``."""
    for _ in range(blocks):
        size = -(-size // pool)
    return size


def _build_backbone(config: ModelConfig, rows: int) -> nn.Module:
    if isinstance(config, (CNNConfig, MFCCCNNConfig)):
        layers: list[nn.Module] = []
        c_in = 1
        for c in config.channels:
            layers.append(_conv_block(c_in, c, (2, 2)))
            c_in = c
        return nn.Sequential(*layers, _GlobalPool("avgmax"),
                             _embedding(2 * c_in, config.embed_dim, config.dropout))
    if isinstance(config, CRNNConfig):
        layers, c_in = [], 1
        for i, c in enumerate(config.channels):
            layers.append(_conv_block(c_in, c, (4, 2) if i < 2 else (2, 1)))
            c_in = c
        width = config.hidden * (2 if config.bidirectional else 1) * 2
        return nn.Sequential(*layers, _Recurrent(config, c_in),
                             _embedding(width, config.embed_dim, config.dropout))
    if isinstance(config, ShortChunkResNetConfig):
        n = config.channels
        widths = [n, n, 2 * n, 2 * n, 2 * n, 2 * n, 4 * n][: config.blocks]
        widths += [4 * n] * (config.blocks - len(widths))
        blocks, c_in = [], 1
        for w in widths:
            blocks.append(_Res2d(c_in, w))
            c_in = w
        return nn.Sequential(*blocks, _GlobalPool("max"),
                             _embedding(c_in, config.embed_dim, config.dropout))
    if isinstance(config, TransformerConfig):
        layers, c_in = [], 1
        for c, t in zip(config.channels, config.time_pool, strict=True):
            layers.append(_conv_block(c_in, c, (2, t)))
            c_in = c
        freq = _pooled(rows, 2, len(config.channels))
        return nn.Sequential(*layers, _TimeTransformer(config, c_in, freq),
                             _embedding(config.d_model, config.embed_dim, config.dropout))
    raise ValueError(f"no backbone for {type(config).__name__}")


__all__ = ["MODEL_CONFIGS", "ModelConfig", "Tagger", "build_model", "config_from_dict", "field",
           "fold_batch_norm", "forward_batches"]
