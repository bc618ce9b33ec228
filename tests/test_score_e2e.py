"""The scoring job end to end: the real CLI on the whole CDNOW log with a real exported model gives,
for every customer, the answer a real server gives on ``/predict/batch``, bit for bit; on the
training slice at the training cutoff it gives training's ``scores.csv``."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from model_export.data import CDNOW_COLUMNS, cdnow_path, read_raw
from service.bulk import ARROW_MEDIA_TYPE
from service.config import Settings
from tests.conftest import TinyModel, run_cli
from tests.service.processes import running_service

MAX_USERS = Settings().max_batch_users  # one request: the most users a server takes (PI_MAX_BATCH_USERS)


def _arrow_request(users: pa.Array, as_of: pa.Scalar, rows: pd.DataFrame, offsets: np.ndarray) -> bytes:
    events = pa.StructArray.from_arrays(
        [
            pa.array(rows["timestamp"].to_numpy(), pa.int64()).cast(pa.timestamp("s", tz="UTC")),
            pa.array(rows["amount"].to_numpy(), pa.float64()),
            pa.array(rows["quantity"].to_numpy(), pa.int64()),
        ],
        names=["timestamp", "amount", "quantity"],
    )
    table = pa.table(
        {
            "user_id": users,
            "as_of": pa.repeat(as_of, len(users)),
            "events": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), events),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


@pytest.mark.slow
def test_every_cdnow_user_scored_by_the_job_equals_the_service(
    tiny_model_dir: TinyModel, tmp_path: Path
) -> None:
    out = tmp_path / "scores.parquet"
    proc = run_cli(
        "score", "--model", str(tiny_model_dir.model), "--data", "cdnow", "--out", str(out), "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    job = pq.read_table(out)
    assert job.num_rows == 23_570
    assert job.schema.metadata[b"as_of"] == b"1998-06-30T23:59:59Z"  # the end of the log's last day
    as_of = job.column("as_of")[0].cast(pa.timestamp("s", tz="UTC"))

    # every raw row of the file, as a client would send it: a user's rows in the file's order
    frame, _ = read_raw(cdnow_path(), CDNOW_COLUMNS)
    rows = pd.DataFrame(
        {
            "user_id": frame["user_id"].str.strip(),
            "timestamp": pd.to_datetime(frame["timestamp"], format="%Y%m%d", utc=True)
            .dt.as_unit("s")
            .astype("int64"),
            "amount": frame["amount"].astype(float),
            "quantity": frame["quantity"].astype(int),
        }
    ).sort_values("user_id", kind="stable")
    ends = np.cumsum(rows.groupby("user_id", sort=True).size().to_numpy())
    ids = np.sort(rows["user_id"].unique())
    by_user = dict(zip(ids, zip(np.concatenate([[0], ends[:-1]]), ends, strict=True), strict=True))

    order = job.column("user_id").to_pylist()  # the job's order: users are sent in it
    probabilities: list[pa.Array] = []
    decisions: list[pa.Array] = []
    with (
        running_service(tiny_model_dir.model, tmp_path / "service.log") as server,
        httpx.Client(base_url=server.url, timeout=120) as client,
    ):
        for start in range(0, len(order), MAX_USERS):
            users = order[start : start + MAX_USERS]
            spans = [by_user[u] for u in users]
            picked = np.concatenate([np.arange(a, b) for a, b in spans])
            offsets = np.concatenate([[0], np.cumsum([b - a for a, b in spans])])
            body = _arrow_request(pa.array(users), as_of, rows.iloc[picked], offsets)
            r = client.post("/predict/batch", content=body, headers={"Content-Type": ARROW_MEDIA_TYPE})
            assert r.status_code == 200, r.text[:500]
            answer = pa.ipc.open_stream(r.content).read_all()
            assert answer.column("user_id").to_pylist() == users
            probabilities.append(answer.column("probability").combine_chunks())
            decisions.append(answer.column("will_purchase").combine_chunks())
    served = pa.concat_arrays(probabilities).to_numpy()
    ours = job.column("probability").to_numpy()
    assert served.dtype == ours.dtype == np.float32
    differ = np.flatnonzero(served.view(np.int32) != ours.view(np.int32))
    assert differ.size == 0, f"{differ.size} users differ, first {order[differ[0]]}"
    assert pa.concat_arrays(decisions).to_pylist() == job.column("will_purchase").to_pylist()


@pytest.mark.slow
def test_the_job_gives_training_scores_at_the_training_cutoff(
    tiny_model_dir: TinyModel, tmp_path: Path
) -> None:
    offline = pd.read_csv(tiny_model_dir.scores, dtype={"user_id": str})
    (as_of,) = offline["as_of"].unique()
    out = tmp_path / "scores.parquet"
    proc = run_cli(
        "score",
        "--model", str(tiny_model_dir.model),
        "--data", str(tiny_model_dir.raw),
        "--as-of", as_of,
        "--out", str(out),
        "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = pq.read_table(out).to_pandas().set_index("user_id")
    got = job.loc[offline["user_id"], "probability"].to_numpy(np.float64)
    want = offline["probability"].to_numpy(np.float64)
    # training scored its cleaned rows (a day's rows summed first) in one onnxruntime call; the job
    # scores the raw rows, whose sums may round differently in the last bit
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    exact = float(np.mean(np.float32(got) == np.float32(want)))
    assert exact > 0.99, f"only {exact:.1%} float32-identical"
