"""The shared cleaning rule: what counts as one purchase, the same for training and serving."""

from __future__ import annotations

import numpy as np
import pandas as pd

from service.cleaning import exact_duplicates


def test_only_rows_equal_in_every_field_are_duplicates_and_the_first_is_kept() -> None:
    #        first  twin   qty    user   second amount twin
    user = [0, 0, 0, 1, 0, 0, 0]
    ts = [5, 5, 5, 5, 6, 5, 5]
    amount = [1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0]
    quantity = [1, 1, 2, 1, 1, 1, 1]
    got = exact_duplicates(user, ts, amount, quantity)
    assert got.tolist() == [False, True, False, False, False, False, True]
    assert exact_duplicates([], [], [], []).tolist() == []
    assert exact_duplicates([3], [5], [1.0], [1]).tolist() == [False]


def test_it_drops_what_pandas_drop_duplicates_drops() -> None:
    """Training counts its drops with this rule; it must agree with the frame-level definition."""
    rng = np.random.default_rng(3)
    n = 5000
    frame = pd.DataFrame(
        {
            "user_id": rng.choice(["a", "b", "c", "d"], n),
            "timestamp": rng.integers(0, 30, n) * 3600,
            "amount": rng.choice([0.0, 1.5, 2.25, 10.0], n),
            "quantity": rng.integers(1, 3, n).astype(np.float64),
        }
    )
    repeated = exact_duplicates(
        pd.factorize(frame["user_id"])[0],
        frame["timestamp"].to_numpy(),
        frame["amount"].to_numpy(),
        frame["quantity"].to_numpy(),
    )
    assert 0 < repeated.sum() < n
    pd.testing.assert_frame_equal(frame[~repeated], frame.drop_duplicates())
