"""The correlation-learning network (CLN).

``x [B, T, C]`` (raw encoder output) -> normalise (the training set's per-channel mean/std, baked
into the graph) -> ``[B, C, T]`` -> 1-D convolutions over time -> feature maps ``F [B, K, T]`` ->
three poolings side by side: the strict upper triangle of the maps' correlation matrix over time
(``K (K - 1) / 2`` numbers: which patterns move together), the mean of each map (``K``) and its
last time step (``K``, the state "now") -> MLP -> one logit. Correlation pooling is scale-free by
construction, so it cannot carry levels: that is why mean and last-step pooling sit next to it.
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
    # a linear term on the last time step's normalised channels (the RFM summaries live there),
    # added to the MLP's logit: a logistic regression inside the graph, next to the deep part
    wide: bool = False

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
        self.wide = nn.Linear(cfg.n_channels, 1) if cfg.wide else None

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
        if self.wide is not None:
            logit = logit + self.wide(z[:, :, -1])  # [B, 1]
        return logit.squeeze(-1)  # [B]


class Ensemble(nn.Module):
    """The mean probability of N seed members, ``[B, T, C] -> [B]``: what training evaluates and
    checkpoints; the exported graph is the same function as :class:`FusedEnsemble`."""

    def __init__(self, members: list[CLN]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        probs = [torch.sigmoid(m(features)) for m in self.members]
        return torch.stack(probs, dim=0).mean(dim=0)  # [B]


class FusedEnsemble(nn.Module):
    """The served form of a trained :class:`Ensemble`: the same function, one wide graph.

    Exported member by member, N seeds give N copies of ~40 small nodes, and onnxruntime pays a
    fixed cost for each; at batch 1 that overhead is most of the time. Here the members' weights
    are stacked once, so each step runs for all members in one node: the first convolution is one
    dense ``C -> N*K`` convolution when the members share their normalisation (they do, it comes
    from one training set; otherwise each member normalises its own copy of the input and the
    convolution is grouped), later convolutions are grouped (``groups=N``), the pooling works on
    ``[B, N, K, T]``, and the heads are batched matmuls over ``[N, B, ...]``.

    The first head layer reads the strict upper triangle of each correlation matrix. Instead of a
    Gather of those positions and a Concat with the other poolings, its weights are laid out over
    the whole ``K x (K + 2)`` block ``[corr | mean | last]`` of each map, with zero rows for the
    diagonal and the lower triangle: at batch 64 and above the extra multiply-adds cost less than the
    Gather did (docs/model.md, "The served graph").

    Training and evaluation never use this module; the exporter builds it from trained weights and
    checks it against the original :class:`Ensemble` (``export.parity``).
    """

    mean: torch.Tensor
    std: torch.Tensor
    diagonal: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    w_wide: torch.Tensor
    b_wide: torch.Tensor

    def __init__(self, ensemble: Ensemble) -> None:
        super().__init__()
        members = [m for m in ensemble.members if isinstance(m, CLN)]
        if len(members) != len(ensemble.members):
            raise TypeError("every ensemble member must be a CLN")
        cfg = members[0].cfg
        if any(m.cfg != cfg for m in members):
            raise ValueError("members with different hyper-parameters cannot be fused")
        if cfg.conv_layers < 1:
            raise ValueError("the fused form needs at least one convolution")
        n, k = len(members), cfg.conv_channels
        self.n_members, self.k, self.eps, self.pool_last = n, k, cfg.corr_eps, cfg.pool_last

        first = members[0]
        shared = all(torch.equal(m.mean, first.mean) and torch.equal(m.std, first.std) for m in members)
        # one normalisation for all (the input is read once) or one per member (an N-fold copy)
        self.n_copies = 1 if shared else n
        norm = members[:1] if shared else members
        self.register_buffer("mean", torch.cat([m.mean for m in norm]).unsqueeze(1))  # [copies * C, 1]
        self.register_buffer("std", torch.cat([m.std for m in norm]).unsqueeze(1))

        member_convs = [[layer for layer in m.conv if isinstance(layer, nn.Conv1d)] for m in members]
        layers: list[nn.Module] = []
        for i, stack in enumerate(zip(*member_convs, strict=True)):
            groups = self.n_copies if i == 0 else n
            conv = nn.Conv1d(
                stack[0].in_channels * groups,
                n * k,
                cfg.kernel_size,
                padding=cfg.kernel_size // 2,
                groups=groups,
            )
            conv.weight = nn.Parameter(torch.cat([c.weight.detach() for c in stack]))  # [N*K, in, kernel]
            conv.bias = nn.Parameter(torch.cat([_bias(c) for c in stack]))
            layers += [conv, nn.GELU()]
        self.conv = nn.Sequential(*layers)

        rows, cols = torch.triu_indices(k, k, offset=1)
        n_tri = rows.numel()
        width = k + (2 if cfg.pool_last else 1)  # per map: its correlation row, its mean, its last step
        linears = [[layer for layer in m.head if isinstance(layer, nn.Linear)] for m in members]
        heads = []
        for first_layer, _ in linears:
            w = first_layer.weight.detach().t()  # [head_in, hidden]: triangle, mean, last
            block = torch.zeros(k, width, cfg.hidden)
            block[rows, cols] = w[:n_tri]
            block[:, k] = w[n_tri : n_tri + k]
            if cfg.pool_last:
                block[:, k + 1] = w[n_tri + k :]
            heads.append(block.reshape(k * width, cfg.hidden))
        self.register_buffer("w1", torch.stack(heads))  # [N, K * width, hidden]
        self.register_buffer("b1", torch.stack([_bias(a) for a, _ in linears]).unsqueeze(1))  # [N, 1, hidden]
        self.register_buffer("w2", torch.stack([b.weight.detach().t() for _, b in linears]))  # [N, hidden, 1]
        self.register_buffer("b2", torch.stack([_bias(b) for _, b in linears]).unsqueeze(1))  # [N, 1, 1]
        self.wide = cfg.wide
        if cfg.wide:
            wides = [m.wide for m in members if m.wide is not None]
            self.register_buffer("w_wide", torch.stack([w.weight.detach()[0] for w in wides]))  # [N, C]
            self.register_buffer("b_wide", torch.stack([_bias(w) for w in wides]))  # [N, 1]
        # the variances are the diagonal of the [K * K] covariance: a Gather, as in CorrelationPooling
        self.register_buffer("diagonal", torch.arange(k) * (k + 1), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = features.transpose(1, 2)  # [B, C, T]
        if self.n_copies > 1:
            z = z.repeat(1, self.n_copies, 1)  # [B, N*C, T]
        # normalised after the transpose: the mean and std broadcast over time, a cheap inner loop
        z = (z - self.mean) / self.std  # [B, copies*C, T]
        f = self.conv(z)  # [B, N*K, T]
        batch, t = f.shape[0], f.shape[-1]
        f = f.reshape(batch, self.n_members, self.k, t)  # [B, N, K, T]
        mu = f.mean(dim=-1, keepdim=True)  # [B, N, K, 1]
        centred = f - mu
        cov = centred @ centred.transpose(2, 3) / (t - 1)  # [B, N, K, K]
        var = cov.reshape(batch, self.n_members, self.k * self.k).index_select(2, self.diagonal)
        std = torch.sqrt(var + self.eps)  # [B, N, K]
        corr = cov / (std.unsqueeze(3) * std.unsqueeze(2))  # [B, N, K, K]
        pooled = [corr, mu, f[..., -1:]] if self.pool_last else [corr, mu]
        h = torch.cat(pooled, dim=3).reshape(batch, self.n_members, -1).transpose(0, 1)  # [N, B, K * width]
        h = nn.functional.gelu(h @ self.w1 + self.b1)  # [N, B, hidden]
        logit = (h @ self.w2 + self.b2).squeeze(-1)  # [N, B]
        if self.wide:
            last = z[:, :, -1].reshape(batch, self.n_copies, -1)  # [B, copies, C]
            logit = logit + ((last * self.w_wide).sum(dim=-1).transpose(0, 1) + self.b_wide)  # [N, B]
        return torch.sigmoid(logit).mean(dim=0)  # [B]


def _bias(layer: nn.Conv1d | nn.Linear) -> torch.Tensor:
    if layer.bias is None:  # CLN builds every layer with a bias; a checkpoint that lacks one is not a CLN
        raise ValueError(f"{type(layer).__name__} without a bias")
    return layer.bias.detach()


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
