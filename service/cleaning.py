"""What counts as one purchase: the rule training, serving and the event store share.

Identical rows of one user (same timestamp second, amount and quantity) are one purchase logged
twice, so they count once; rows of one user on one UTC day are one purchase day, their amounts and
quantities summed. :func:`service.features.encode_batch` applies both to whatever it is given
(training's cleaned log, inline events, stored histories), so a raw log and its cleaned version
encode alike; ``model_export.data`` counts its drops with :func:`exact_duplicates` and compaction
folds by the same rule. Which rows are *invalid* differs by path: docs/model.md, "Data and cleaning".
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def exact_duplicates(
    user: ArrayLike, timestamps: ArrayLike, amounts: ArrayLike, quantities: ArrayLike
) -> NDArray[np.bool_]:
    """True for every row that repeats an earlier row exactly: same user, second, amount, quantity.

    ``user`` is any integer code per row (an index, a factorised id). The first of each group of
    identical rows stays False, so ``rows[~exact_duplicates(...)]`` keeps one of each, in order.
    """
    # one float64 row per column, so sorting and comparing are a few calls whatever the size:
    # integer codes and epoch seconds are exact in float64 (below 2**53)
    columns = np.array(
        [np.ravel(quantities), np.ravel(amounts), np.ravel(timestamps), np.ravel(user)], dtype=np.float64
    )
    repeated = np.zeros(columns.shape[1], dtype=np.bool_)
    if repeated.size < 2:
        return repeated
    # lexsort's last row is its primary key; it is stable, so the earliest of a group comes first
    order = np.lexsort(columns)
    ordered = columns[:, order]
    same = (ordered[:, 1:] == ordered[:, :-1]).all(axis=0)
    repeated[order[1:][same]] = True
    return repeated
