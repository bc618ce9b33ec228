"""One user-partitioned chunk of a log scored: the unit every engine of the scoring job maps.

:func:`score_frame` gives each user of a chunk the service's answer; :func:`score_partition` adds
the output file's columns; :class:`SpillScorer` holds one onnxruntime session and scores spill files
by path (a worker of Ray's actor pool). Nothing here imports pandas or the log reader, so a process
that only scores starts light.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
from numpy.typing import NDArray

from service.columns import EventColumns
from service.config import Settings
from service.features import encode_batch
from service.predictor import Predictor, load_predictor

AS_OF_TYPE = pa.timestamp("ms", tz="UTC")  # Parquet has no seconds unit: it would store ms anyway


def read_spill(path: Path) -> pa.Table:
    """One spill file of pass 1 (Arrow IPC, :data:`model_export.reader.EVENTS` rows)."""
    with pa.OSFile(str(path)) as source:
        return ipc.open_stream(source).read_all()


def _slice(columns: EventColumns, start: int, stop: int) -> EventColumns:
    first, last = int(columns.offsets[start]), int(columns.offsets[stop])
    return EventColumns(
        timestamps=columns.timestamps[first:last],
        amounts=columns.amounts[first:last],
        quantities=columns.quantities[first:last],
        offsets=columns.offsets[start : stop + 1] - first,
        as_of=columns.as_of[start:stop],
    )


def _predict(predictor: Predictor, features: NDArray[np.float32]) -> NDArray[np.float32]:
    if features.shape[0] == 1:
        # onnxruntime computes a batch of one on another kernel path, whose sums can differ from a
        # larger batch's in the last bit: a lone user is scored beside a zero row, as /predict/batch
        # would score them among others
        return predictor.predict(np.concatenate([features, np.zeros_like(features)]))[:1]
    return predictor.predict(features)


def score_frame(chunk: pa.Table, predictor: Predictor, as_of: int, *, batch_users: int) -> pa.Table:
    """Every user of ``chunk`` scored at ``as_of``: ``user_id, probability (float32), will_purchase``,
    sorted by user id.

    ``chunk`` holds :data:`model_export.reader.EVENTS` rows and *all* rows of each of its users (a
    user-partitioned chunk); a row without a timestamp only names its user. Users are encoded with
    the shared encoder ``batch_users`` at a time, as the service encodes a ``/predict/batch``
    request, and scored by ``predictor``: the answers are the service's, bit for bit.
    """
    users = chunk.column("user_id").combine_chunks()
    encoded = users.dictionary_encode()
    ids = encoded.dictionary
    by_id = pc.sort_indices(ids).to_numpy()
    rank = np.empty(len(ids), dtype=np.int64)
    rank[by_id] = np.arange(len(ids))
    user = rank[encoded.indices.to_numpy(zero_copy_only=False)]  # per row, the user's place by id
    n = len(ids)

    stamps = chunk.column("timestamp").combine_chunks()
    event = ~np.asarray(stamps.is_null().to_numpy(zero_copy_only=False), dtype=np.bool_)
    # stable: each user's events stay in the log's order, the order the service is sent them in,
    # so the encoder's float sums run in the same order
    rows = np.flatnonzero(event)[np.argsort(user[event], kind="stable")]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(user[event], minlength=n), out=offsets[1:])

    def _column(array: pa.Array, dtype: type[np.generic]) -> NDArray[Any]:
        return np.asarray(array.fill_null(0).to_numpy(zero_copy_only=False), dtype=dtype)[rows]

    columns = EventColumns(
        timestamps=_column(stamps, np.int64),
        amounts=_column(chunk.column("amount").combine_chunks(), np.float64),
        quantities=_column(chunk.column("quantity").combine_chunks(), np.float64),
        offsets=offsets,
        as_of=np.full(n, as_of, dtype=np.int64),
    )
    meta = predictor.metadata
    probabilities = np.empty(n, dtype=np.float32)
    for start in range(0, n, batch_users):
        stop = min(n, start + batch_users)
        part = _slice(columns, start, stop)
        features = encode_batch(
            part.timestamps, part.amounts, part.quantities, part.offsets, part.as_of, meta.feature_spec
        )
        probabilities[start:stop] = _predict(predictor, features)
    if not np.all(np.isfinite(probabilities)):
        raise RuntimeError("the model returned a non-finite probability")  # as the service refuses
    return pa.table(
        {
            "user_id": ids.take(pa.array(by_id)),
            "probability": pa.array(probabilities, type=pa.float32()),
            # the service's rule: the float32 probability widened to float64, then compared
            "will_purchase": pa.array(probabilities.astype(np.float64) >= meta.threshold),
        }
    )


def score_partition(chunk: pa.Table, predictor: Predictor, as_of: int, *, batch_users: int) -> pa.Table:
    """:func:`score_frame` with the output file's columns (:func:`output_schema`, without its
    metadata): the rows one user-partitioned chunk adds to the output, whatever the engine."""
    scores = score_frame(chunk, predictor, as_of, batch_users=batch_users)
    n = scores.num_rows
    scores = scores.add_column(1, "as_of", pa.repeat(pa.scalar(as_of * 1000, type=AS_OF_TYPE), n))
    return scores.append_column("model_version", pa.repeat(pa.scalar(predictor.metadata.model_version), n))


class SpillScorer:
    """One worker's onnxruntime session, loaded from the model file's bytes with the driver's
    settings (checked and warmed up as the service loads it), scoring spill files named by path."""

    def __init__(self, model: bytes, settings: Settings, as_of: int, batch_users: int) -> None:
        # the bytes, not the driver's path: a node of a real cluster need not see the driver's disk
        with tempfile.TemporaryDirectory(prefix="pi-model-") as scratch:
            path = Path(scratch) / "model.onnx"
            path.write_bytes(model)
            self._predictor = load_predictor(settings, path)
        self._as_of = as_of
        self._batch_users = batch_users

    def __call__(self, batch: pa.Table) -> pa.Table:
        """``batch``: a ``path`` column of spill files -> their users' rows of the output."""
        tables = []
        for name in batch.column("path").to_pylist():
            try:
                chunk = read_spill(Path(name))
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"spill file {name} not found on this node: on a cluster of several machines, "
                    "--spill-dir must be a directory every node mounts"
                ) from None
            tables.append(score_partition(chunk, self._predictor, self._as_of, batch_users=self._batch_users))
        return pa.concat_tables(tables)
