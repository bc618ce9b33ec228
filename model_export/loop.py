"""The training loop of one ensemble member: AdamW on BCE, early stopping on validation log loss."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from model_export import metrics
from model_export.config import TrainConfig
from model_export.examples import Examples
from model_export.model import CLN, CLNConfig


@dataclass(frozen=True)
class MemberResult:
    model: CLN
    seed: int
    epochs_run: int
    best_epoch: int
    val_loss: float
    val_auc: float


def predict(model: torch.nn.Module, ex: Examples) -> NDArray[np.float64]:
    """The model's output for every example, a slice at a time (a whole set's activations would be
    many times its features)."""
    model.eval()
    out = []
    with torch.no_grad():
        for x in ex.slices():
            out.append(model(torch.from_numpy(x)).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _sigmoid(z: NDArray[np.float64]) -> NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-z))


def train_member(
    cfg: TrainConfig,
    net_cfg: CLNConfig,
    train: Examples,
    validation: Examples,
    mean: NDArray[np.float32],
    std: NDArray[np.float32],
    seed: int,
) -> MemberResult:
    """One seed on ``train``: AdamW on BCE, early stopping on the validation log loss (a proper
    score, so the probabilities stay calibrated), the best epoch's weights restored. Each batch is
    encoded when it is drawn."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = CLN(net_cfg)
    model.set_normalisation(torch.from_numpy(mean), torch.from_numpy(std))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    y_tr = torch.from_numpy(train.y.astype(np.float32))
    y_va = validation.y
    best_loss, best_auc, best_epoch, bad = float("inf"), float("nan"), 0, 0
    best_state = copy.deepcopy(model.state_dict())
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"seed {seed}", disable=not cfg.progress, leave=True)
    epoch = 0
    for epoch in bar:
        model.train()
        order = rng.permutation(len(train))
        total, count = 0.0, 0
        for i in range(0, order.size, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            xb = torch.from_numpy(train.encode(idx))
            if cfg.crop_share > 0 and rng.random() < cfg.crop_share:
                # the latest L bins are exactly the encoding with an L-bin window: every channel
                # of a bin depends only on events up to it and the whole-history summaries
                keep = int(rng.integers(cfg.crop_min_bins, xb.shape[1]))
                xb = xb[:, -keep:, :]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), y_tr[torch.from_numpy(idx)])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.size
            count += idx.size
        p_va = _sigmoid(predict(model, validation))
        val_loss = metrics.binary_metrics(y_va, p_va, 0.5).log_loss
        val_auc = metrics.roc_auc(y_va, p_va)
        bar.set_postfix(
            loss=f"{total / max(count, 1):.4f}", val_loss=f"{val_loss:.4f}", val_auc=f"{val_auc:.4f}"
        )
        if val_loss < best_loss - 1e-5:
            best_loss, best_auc, best_epoch, bad = val_loss, val_auc, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return MemberResult(model, seed, epoch, best_epoch, best_loss, best_auc)
