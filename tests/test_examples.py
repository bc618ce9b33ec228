"""Training examples encoded on demand: any slice encodes as the whole set does, and the
normalisation computed slice by slice is the in-memory one, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_export import examples
from model_export.data import Transactions, end_of_day, load_transactions
from model_export.examples import build_examples, normalisation, stack
from service.features import ALL_CHANNELS, FeatureSpec, encode_batch
from tests.conftest import write_cdnow_slice


@pytest.fixture(scope="module")
def tx(tmp_path_factory: pytest.TempPathFactory) -> Transactions:
    return load_transactions(write_cdnow_slice(tmp_path_factory.mktemp("ex") / "slice.csv", 1500, seed=2))


def test_examples_encode_as_one_encoder_call_over_the_whole_log(tx: Transactions) -> None:
    """Features, labels and who counts as known: what encoding every user at once gives."""
    as_of = end_of_day("1997-02-15")  # CDNOW's cohort is still arriving: some are not customers yet
    spec = FeatureSpec(lookback_bins=26, channels=ALL_CHANNELS)
    ex = build_examples(tx, as_of, 13, spec)
    whole = encode_batch(tx.timestamps, tx.amounts, tx.quantities, tx.offsets, as_of, spec)
    assert (ex.summary.purchase_days > 0).all()
    assert 0 < len(ex) < tx.n_users
    np.testing.assert_array_equal(ex.encode(), whole[ex.users])
    np.testing.assert_array_equal(ex.user_ids, tx.user_ids[ex.users])
    frame = tx.frame
    later = frame[(frame["timestamp"] > as_of) & (frame["timestamp"] <= as_of + 13 * 7 * 86_400)]
    np.testing.assert_array_equal(ex.y, np.isin(ex.user_ids, later["user_id"]).astype(np.int64))


def test_any_slice_or_order_encodes_alike(tx: Transactions, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = FeatureSpec(lookback_bins=13)
    ex = stack([build_examples(tx, end_of_day(d), 13, spec) for d in ("1997-12-31", "1997-09-30")])
    whole = ex.encode()
    rows = np.random.default_rng(0).permutation(len(ex))[:700]
    np.testing.assert_array_equal(ex.encode(rows), whole[rows])
    np.testing.assert_array_equal(np.concatenate(list(ex.slices(333))), whole)
    monkeypatch.setattr(examples, "ENCODE_USERS", 7)  # many small encoder calls
    np.testing.assert_array_equal(ex.encode(rows), whole[rows])


def test_normalisation_by_slices_is_numpys_on_the_whole_array(
    tx: Transactions, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = FeatureSpec(lookback_bins=52, channels=ALL_CHANNELS)
    ex = stack([build_examples(tx, end_of_day(d), 13, spec) for d in ("1998-03-31", "1997-12-31")])
    flat = ex.encode().reshape(-1, spec.n_channels).astype(np.float64)
    std = flat.std(axis=0)
    want = flat.mean(axis=0).astype(np.float32), np.where(std < 1e-6, 1.0, std).astype(np.float32)
    monkeypatch.setattr(examples, "SLICE_ROWS", 97)  # many slices, the last one short
    mean, got_std = normalisation(ex)
    np.testing.assert_array_equal(mean, want[0])
    np.testing.assert_array_equal(got_std, want[1])


def test_the_log_round_trips_through_a_frame(tx: Transactions, tmp_path: Path) -> None:
    back = Transactions.from_frame(tx.frame.sample(frac=1.0, random_state=1), tx.report, tx.fingerprint)
    for name in ("user_ids", "offsets", "timestamps", "amounts", "quantities"):
        np.testing.assert_array_equal(getattr(back, name), getattr(tx, name), err_msg=name)
    some = np.array([0, 5, 17])
    part = tx.take(some)
    assert part.user_ids.tolist() == tx.user_ids[some].tolist()
    assert part.frame.equals(tx.frame[tx.frame["user_id"].isin(part.user_ids)].reset_index(drop=True))
