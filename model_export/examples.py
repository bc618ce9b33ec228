"""Training examples: a customer at a cutoff, with the label and the whole-history summary; the
features are encoded from the log when they are needed, a slice at a time.

An example is its user's index, its cutoff, its label and its summary: the ``[lookback_bins,
channels]`` tensor is never held for a whole set. Training batches, the normalisation statistics
and every prediction encode the rows they use. The encoder works user by user, so a user's
features do not depend on the slice they are encoded in (docs/model.md, "Memory").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from model_export.data import Transactions, user_rows
from service.features import FeatureSpec, UserSummary, encode_batch, summarise

SECONDS_PER_WEEK = 7 * 86_400
#: Users per encoder call: its float64 temporaries (a few KB a user) stay small and cached; larger
#: calls are no faster per user.
ENCODE_USERS = 1024
#: Examples per slice when a whole set is encoded in turn (statistics, predictions).
SLICE_ROWS = 4096

_SUMMARY_FIELDS = ("purchase_days", "first_age_days", "last_age_days", "total_amount", "total_quantity")


@dataclass(frozen=True)
class Examples:
    """Customers known at their cutoff, with labels and summaries; :meth:`encode` gives features."""

    tx: Transactions = field(repr=False)
    users: NDArray[np.int64]  # [N] index into tx.user_ids
    at: NDArray[np.int64]  # [N] each example's cutoff, epoch seconds
    as_of: int  # the latest cutoff (stacked origins: the training cutoff)
    y: NDArray[np.int64]  # [N]
    summary: UserSummary  # [N] each
    spec: FeatureSpec

    def __len__(self) -> int:
        return int(self.users.size)

    @property
    def user_ids(self) -> NDArray[np.str_]:
        return self.tx.user_ids[self.users]

    def take(self, idx: NDArray[np.int64]) -> Examples:
        s = self.summary
        return Examples(
            tx=self.tx,
            users=self.users[idx],
            at=self.at[idx],
            as_of=self.as_of,
            y=self.y[idx],
            summary=UserSummary(*(getattr(s, f)[idx] for f in _SUMMARY_FIELDS)),
            spec=self.spec,
        )

    def encode(self, rows: NDArray[np.int64] | slice | None = None) -> NDArray[np.float32]:
        """Features of these examples (all by default), in that order: ``float32 [n, T, C]``."""
        users = self.users if rows is None else self.users[rows]
        at = self.at if rows is None else self.at[rows]
        tx = self.tx
        out = np.empty((users.size, *self.spec.shape), dtype=np.float32)
        for start in range(0, users.size, ENCODE_USERS):
            part = slice(start, start + ENCODE_USERS)
            events, offsets = user_rows(tx.offsets, users[part])
            out[part] = encode_batch(
                tx.timestamps[events], tx.amounts[events], tx.quantities[events], offsets, at[part], self.spec
            )
        return out

    def slices(self, size: int = SLICE_ROWS) -> Iterator[NDArray[np.float32]]:
        """All features in order, ``size`` examples at a time."""
        for start in range(0, len(self), size):
            yield self.encode(slice(start, start + size))


def build_examples(tx: Transactions, as_of: int, horizon_weeks: int, spec: FeatureSpec) -> Examples:
    """Customers known at ``as_of``; label: a purchase in ``(as_of, as_of + horizon]``.

    Leakage guard: the encoder itself drops every event after an example's cutoff, so label-window
    events cannot reach the features whatever the caller passes.
    """
    n = tx.n_users
    summary = summarise(tx.timestamps, tx.amounts, tx.quantities, tx.offsets, as_of)
    known = np.flatnonzero(summary.purchase_days > 0)
    user = np.repeat(np.arange(n), np.diff(tx.offsets))
    in_label = (tx.timestamps > as_of) & (tx.timestamps <= as_of + horizon_weeks * SECONDS_PER_WEEK)
    y = (np.bincount(user[in_label], minlength=n) > 0).astype(np.int64)
    everybody = Examples(tx, np.arange(n), np.full(n, as_of, dtype=np.int64), as_of, y, summary, spec)
    return everybody.take(known)


def stack(parts: list[Examples]) -> Examples:
    """Examples of several origins as one training set (``as_of`` is the first part's)."""
    first = parts[0]
    return Examples(
        tx=first.tx,
        users=np.concatenate([p.users for p in parts]),
        at=np.concatenate([p.at for p in parts]),
        as_of=first.as_of,
        y=np.concatenate([p.y for p in parts]),
        summary=UserSummary(
            *(np.concatenate([getattr(p.summary, f) for p in parts]) for f in _SUMMARY_FIELDS)
        ),
        spec=first.spec,
    )


def normalisation(ex: Examples) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Per-channel mean and std of the examples' features, equal bit for bit to
    ``X.reshape(-1, C).astype(np.float64)`` then ``.mean(axis=0)`` and ``.std(axis=0)``, without X.

    numpy reduces a C-ordered ``[rows, C]`` array over axis 0 row after row, so each slice's sum
    continues from the last one's when that is added to the slice's first row. Two passes, as numpy's
    ``std`` makes: the mean, then the squared deviations from it.
    """
    total, count = None, 0
    for x in ex.slices():
        flat = x.reshape(-1, x.shape[-1]).astype(np.float64)  # [n * T, C]
        total = _continue_sum(total, flat)
        count += flat.shape[0]
    if total is None:
        raise ValueError("no examples to normalise over")
    mean = total / count
    squares = None
    for x in ex.slices():
        deviation = x.reshape(-1, x.shape[-1]).astype(np.float64) - mean
        np.multiply(deviation, deviation, out=deviation)
        squares = _continue_sum(squares, deviation)
    assert squares is not None
    std = np.sqrt(squares / count)
    std = np.where(std < 1e-6, 1.0, std)  # a constant channel passes through centred, not divided by 0
    return mean.astype(np.float32), std.astype(np.float32)


def _continue_sum(total: NDArray[np.float64] | None, rows: NDArray[np.float64]) -> NDArray[np.float64]:
    if total is not None:
        rows[0] += total  # (total + r0) + r1 + ...: the running sum, carried on in the same order
    summed: NDArray[np.float64] = np.add.reduce(rows, axis=0)
    return summed
