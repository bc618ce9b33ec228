"""CDNOW made N times larger, for the scoring benchmark: copy ``c`` of every customer is a new user
``c<cc>-<id>``, their dates shifted by a seeded 0-6 days (copy 0 unshifted, so 1x is CDNOW itself),
all rows in time order, as a log arrives. Written as Parquet: timestamps typed (UTC, whole seconds),
amounts float64, quantities int64, in row groups of a size a warehouse export would use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from model_export.data import CDNOW_COLUMNS, cdnow_path, read_raw

ROW_GROUP_ROWS = 128 * 1024
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class Replica:
    path: Path
    copies: int
    rows: int
    users: int


def replicate(copies: int, path: Path, *, seed: int = 0) -> Replica:
    """Write CDNOW ``copies`` times over to ``path`` (Parquet); reuse a file a former call wrote."""
    frame, _ = read_raw(cdnow_path(), CDNOW_COLUMNS)
    ids = frame["user_id"].str.strip().to_numpy(dtype=str)
    if path.is_file() and pq.ParquetFile(path).metadata.num_rows == copies * len(frame):
        return Replica(path, copies, copies * len(frame), copies * len(np.unique(ids)))
    stamps = pd.to_datetime(frame["timestamp"], format="%Y%m%d", utc=True).dt.as_unit("s").astype("int64")
    shifts = np.concatenate([[0], np.random.default_rng(seed).integers(0, 7, size=copies - 1)])
    users = np.concatenate([np.char.add(f"c{c:02d}-", ids) for c in range(copies)])
    seconds = np.concatenate([stamps.to_numpy() + s * SECONDS_PER_DAY for s in shifts])
    order = np.argsort(seconds, kind="stable")
    table = pa.table(
        {
            "user_id": pa.array(users[order], pa.string()),
            "timestamp": pa.array(seconds[order], pa.int64()).cast(pa.timestamp("s", tz="UTC")),
            "amount": np.tile(frame["amount"].astype(np.float64).to_numpy(), copies)[order],
            "quantity": np.tile(frame["quantity"].astype(np.int64).to_numpy(), copies)[order],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial, row_group_size=ROW_GROUP_ROWS)
    partial.replace(path)
    return Replica(path, copies, table.num_rows, copies * len(np.unique(ids)))
