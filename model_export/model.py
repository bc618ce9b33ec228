"""The correlation-learning network (CLN).

Shape walk-through for one batch: ``x [B, T, C]`` (encoder output, raw) -> normalise with the
training set's per-channel mean/std (baked into the graph) -> ``[B, C, T]`` -> 1-D convolutions
over time (kernel 3, same padding) -> feature maps ``F [B, K, T]`` -> three poolings side by side:

- correlation pooling: centre each map over time, covariance ``F Fᵀ / (T - 1)``, normalise to a
  correlation matrix (``+ eps`` on the variances so flat maps stay finite), keep the strict upper
  triangle: ``K (K - 1) / 2`` numbers that say which temporal patterns move together;
- mean pooling: ``K`` numbers, the average level of each pattern;
- the last time step: ``K`` numbers, the state "now" (recency lives here);

then an MLP to one logit. Correlation pooling is scale-free by construction, so it cannot carry
levels; that is why mean and last-step pooling sit next to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class CLNConfig:
    """Hyper-parameters of the network; checkpoints and the model file carry them."""

    n_channels: int
    lookback_bins: int
    conv_channels: int = 16
    conv_layers: int = 2
    kernel_size: int = 3
    hidden: int = 64
    dropout: float = 0.3
    corr_eps: float = 1e-4
    pool_last: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CorrelationPooling(nn.Module):
    """``[B, K, T] -> [B, K (K - 1) / 2]``: the upper triangle of each sample's correlation matrix."""

    triu_flat: torch.Tensor

    def __init__(self, n_maps: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        rows, cols = torch.triu_indices(n_maps, n_maps, offset=1)
        # flat positions into the [K * K] matrix: one Gather in the ONNX graph, no boolean masks
        self.register_buffer("triu_flat", rows * n_maps + cols, persistent=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        t = f.shape[-1]
        centred = f - f.mean(dim=-1, keepdim=True)  # [B, K, T]
        cov = centred @ centred.transpose(1, 2) / (t - 1)  # [B, K, K]
        std = torch.sqrt(torch.diagonal(cov, dim1=1, dim2=2) + self.eps)  # [B, K]
        corr = cov / (std.unsqueeze(2) * std.unsqueeze(1))  # [B, K, K]
        return corr.flatten(1).index_select(1, self.triu_flat)  # [B, K (K - 1) / 2]


class CLN(nn.Module):
    """One member of the ensemble: raw features in, one logit per user out."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, cfg: CLNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.zeros(cfg.n_channels))
        self.register_buffer("std", torch.ones(cfg.n_channels))
        layers: list[nn.Module] = []
        width = cfg.n_channels
        for _ in range(cfg.conv_layers):
            layers += [
                nn.Conv1d(width, cfg.conv_channels, cfg.kernel_size, padding=cfg.kernel_size // 2),
                nn.GELU(),
            ]
            width = cfg.conv_channels
        self.conv = nn.Sequential(*layers)
        self.corr = CorrelationPooling(cfg.conv_channels, cfg.corr_eps)
        k = cfg.conv_channels
        head_in = k * (k - 1) // 2 + k + (k if cfg.pool_last else 0)
        self.head = nn.Sequential(
            nn.Linear(head_in, cfg.hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, 1),
        )

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = ((x - self.mean) / self.std).transpose(1, 2)  # [B, C, T]
        f = self.conv(z)  # [B, K, T]
        pooled = [self.corr(f), f.mean(dim=-1)]
        if self.cfg.pool_last:
            pooled.append(f[:, :, -1])
        logit: torch.Tensor = self.head(torch.cat(pooled, dim=1))  # [B, 1]
        return logit.squeeze(-1)  # [B]


class Ensemble(nn.Module):
    """The exported graph: the mean probability of N seed members; ``[B, T, C] -> [B]``."""

    def __init__(self, members: list[CLN]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        probs = [torch.sigmoid(m(features)) for m in self.members]
        return torch.stack(probs, dim=0).mean(dim=0)  # [B]


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
