"""The scoring job's Ray engine against the local engine, on a local Ray this module starts (two CPUs,
usage stats off, no dashboard): the same file bit for bit, bad input refused before any output, a
failing actor leaving no output, and no connection beyond this machine."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
import ray
from onnx import TensorProto, helper

from bench.processes import descendants
from model_export.__main__ import main
from model_export.data import DataError
from model_export.partition import SpillScorer, score_partition
from model_export.ray_engine import score_log_ray
from model_export.score import (
    ScoreReport,
    open_model,
    parse_as_of,
    partition_of,
    score_log,
    session_settings,
)
from tests.conftest import TinyModel
from tests.service.fakes import make_metadata
from tests.service.onnx_models import write_model

HEADER = "user_id,timestamp,amount,quantity\n"
BATCH_USERS = 4  # many batches per block, odd tails: the padded paths too


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    env = pytest.MonkeyPatch()
    env.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2, object_store_memory=256 << 20, include_dashboard=False, logging_level=logging.WARNING
    )
    try:
        yield
    finally:
        ray.shutdown()  # no raylet outlives the module
        env.undo()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    meta = make_metadata(threshold=0.45)  # both answers of will_purchase occur
    return write_model(tmp_path_factory.mktemp("model") / "model.onnx", metadata=meta)


def _log(path: Path) -> Path:
    """700 users over 3,000 rows in no order, with rows training drops and one user with only those."""
    rng = np.random.default_rng(0)
    users = rng.integers(0, 700, size=3000)
    days = pd.Timestamp("2023-06-01") + pd.to_timedelta(rng.integers(0, 200, size=3000), unit="D")
    body = "".join(
        f"user-{u},{d:%Y-%m-%d},{rng.integers(1, 90)}.25,{rng.integers(1, 4)}\n"
        for u, d in zip(users, days, strict=True)
    )
    path.write_text(HEADER + body + "user-5,,3,1\nuser-dropped,2023-07-01,-1,1\n,2023-07-01,1,1\n")
    return path


def _same_report(ours: ScoreReport, local: ScoreReport) -> None:
    keep = ("model_version", "as_of", "users", "users_without_history", "rows_after_as_of", "counts")
    assert {k: getattr(ours, k) for k in keep} == {k: getattr(local, k) for k in keep}


def _address(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host (little-endian) order."""
    raw = b"".join(bytes.fromhex(hex_ip[i : i + 8])[::-1] for i in range(0, len(hex_ip), 8))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _foreign_peers() -> set[str]:
    """The peers of TCP sockets held by this process and its descendants (Ray's raylet, GCS and
    workers) that are not this machine: empty when every connection stayed on it."""
    tree = [os.getpid(), *descendants(os.getpid())]
    sockets: set[str] = set()
    for pid in tree:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        sockets |= {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}
    ours, peers = set(), set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in sockets:
                ours.add(_address(fields[1].split(":")[0]))
                peers.add(_address(fields[2].split(":")[0]))
    assert ours, "no socket found: the check would pass vacuously"
    return {str(p) for p in peers - ours if not (p.is_loopback or p.is_unspecified)}


@pytest.mark.slow  # a Ray cluster: seconds to start, seconds per actor pool
def test_the_ray_engine_writes_the_local_engines_file(tmp_path: Path, model: Path, cluster: None) -> None:
    log = _log(tmp_path / "log.csv")
    as_of = parse_as_of("2023-11-30")  # some rows lie after it
    local = score_log(
        open_model(model, batch_users=BATCH_USERS),
        log,
        tmp_path / "local.parquet",
        as_of=as_of,
        chunk_rows=600,
    )
    ours = score_log_ray(
        model, log, tmp_path / "ray.parquet", as_of=as_of, chunk_rows=600, batch_users=BATCH_USERS, actors=2
    )
    _same_report(ours, local)
    assert (ours.engine, ours.workers, ours.partitions) == ("ray", 2, local.partitions)
    assert ours.rows_after_as_of > 0
    assert ours.users_without_history > 0
    assert ours.counts.rows_kept < ours.counts.rows_read
    a, b = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert b.schema.equals(a.schema, check_metadata=True)
    assert b.equals(a)  # the same spill files: the same order too
    probabilities = b.column("probability").to_numpy()
    assert probabilities.view(np.int32).tolist() == a.column("probability").to_numpy().view(np.int32).tolist()
    assert len(set(b.column("will_purchase").to_pylist())) == 2
    assert pq.ParquetFile(tmp_path / "ray.parquet").metadata.num_row_groups == ours.partitions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.parquet", "log.csv", "ray.parquet"]
    assert not _foreign_peers()


@pytest.mark.slow  # a Ray cluster: seconds to start, seconds per actor pool
def test_partitions_are_rounded_up_to_a_multiple_of_the_actors(
    tmp_path: Path, model: Path, cluster: None
) -> None:
    log = _log(tmp_path / "log.csv")
    local = score_log(open_model(model, batch_users=BATCH_USERS), log, tmp_path / "local.parquet")
    ours = score_log_ray(model, log, tmp_path / "ray.parquet", batch_users=BATCH_USERS, actors=2)
    _same_report(ours, local)
    assert (local.partitions, ours.partitions) == (1, 2)  # so both actors score
    a = pq.read_table(tmp_path / "local.parquet")
    b = pq.read_table(tmp_path / "ray.parquet")
    assert b.sort_by("user_id").equals(a)
    # one row group per partition, in partition order, each sorted by user id
    file = pq.ParquetFile(tmp_path / "ray.parquet")
    for i in range(file.metadata.num_row_groups):
        users = file.read_row_group(i).column("user_id").combine_chunks()
        assert (partition_of(users, ours.partitions) == i).all()
        assert users.to_pylist() == sorted(users.to_pylist())


@pytest.mark.slow  # a Ray cluster: seconds to start, seconds per actor pool
def test_bad_input_fails_before_any_ray_work_or_output(tmp_path: Path, model: Path, cluster: None) -> None:
    log = tmp_path / "log.csv"
    log.write_text(HEADER + "a,2024-01-01,1,1\nb,2024-01-02,ten,1\n")
    out = tmp_path / "s.parquet"
    out.write_bytes(b"yesterday's scores")
    with pytest.raises(DataError, match=r"column 'amount' has a non-numeric value on line 3: 'ten'"):
        score_log_ray(model, log, out)
    assert out.read_bytes() == b"yesterday's scores"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "s.parquet"], "no .partial, no spill"


def _nan_model(path: Path) -> Path:
    """0.5 for a user without events (so warm-up on zeros passes), NaN for everyone else."""
    meta = make_metadata()
    bins, channels = meta.feature_spec.shape
    scalar = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("zero", 0.0), ("half", 0.5))]
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["axes"], value_ints=[1, 2]),
            helper.make_node("ReduceSum", ["features", "axes"], ["per_user"], keepdims=0),
            helper.make_node("Equal", ["per_user", "zero"], ["empty"]),
            helper.make_node("Div", ["zero", "zero"], ["nan"]),
            helper.make_node("Where", ["empty", "half", "nan"], ["probability"]),
        ],
        "nan",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", bins, channels])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch"])],
        initializer=scalar,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx_model.ir_version = 9
    helper.set_model_props(onnx_model, meta.to_props())
    onnx.save(onnx_model, str(path))
    return path


@pytest.mark.slow  # a Ray cluster: seconds to start, seconds per actor pool
def test_a_failing_actor_leaves_no_output_and_the_old_file_intact(tmp_path: Path, cluster: None) -> None:
    model = _nan_model(tmp_path / "nan.onnx")
    log = _log(tmp_path / "log.csv")
    out = tmp_path / "s.parquet"
    out.write_bytes(b"yesterday's scores")
    with pytest.raises(Exception, match="the model returned a non-finite probability"):
        score_log_ray(model, log, out, chunk_rows=500, actors=2)
    assert out.read_bytes() == b"yesterday's scores"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "nan.onnx", "s.parquet"]


@pytest.mark.slow  # a Ray cluster: seconds to start, seconds per actor pool
def test_cli_engine_ray(
    tmp_path: Path, model: Path, cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _log(tmp_path / "log.csv")
    out, summary = tmp_path / "s.parquet", tmp_path / "report.json"
    args = ["score", "--model", str(model), "--data", str(log), "--out", str(out), "--no-progress"]
    assert main([*args, "--engine", "ray", "--actors", "1", "--report", str(summary)]) == 0
    assert "wrote" in capsys.readouterr().out
    report = json.loads(summary.read_text())
    assert (report["engine"], report["workers"], report["partitions"]) == ("ray", 1, 1)
    assert ray.is_initialized(), "a Ray the caller started is the caller's to shut down"
    local = tmp_path / "local.parquet"
    assert main([*args[:6], str(local), "--no-progress"]) == 0
    assert pq.read_table(out).equals(pq.read_table(local))
    assert main([*args, "--actors", "2"]) == 2  # the local engine has no actors
    assert "--actors is for --engine ray" in capsys.readouterr().err


@pytest.mark.slow  # a Ray cluster: seconds to start, seconds per actor pool
def test_every_cdnow_user_scored_by_ray_as_by_the_local_engine(
    tiny_model_dir: TinyModel, tmp_path: Path, cluster: None
) -> None:
    """The real (tiny) network: other partitions, other batch compositions, the same bits."""
    local = score_log(open_model(tiny_model_dir.model), "cdnow", tmp_path / "local.parquet")
    ours = score_log_ray(tiny_model_dir.model, "cdnow", tmp_path / "ray.parquet", chunk_rows=20_000)
    _same_report(ours, local)
    assert (local.partitions, ours.partitions) == (1, 4)
    a = pq.read_table(tmp_path / "local.parquet")
    b = pq.read_table(tmp_path / "ray.parquet").sort_by("user_id")
    assert a.num_rows == 23_570
    assert b.equals(a)
    assert b.column("probability").type == pa.float32()


def test_a_spill_scorer_scores_files_by_path_and_names_a_missing_one(tmp_path: Path, model: Path) -> None:
    """The actor's class without Ray: a spill file's users, as score_partition scores them."""
    chunk = pa.table(
        {
            "user_id": ["b", "a", "b"],
            "timestamp": [86_400, 0, None],
            "amount": [1.0, 2.0, 0.0],
            "quantity": [1.0] * 3,
        }
    )
    path = tmp_path / "part-00000.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, chunk.schema) as writer:
        writer.write_table(chunk)
    settings = session_settings(batch_users=BATCH_USERS)
    scorer = SpillScorer(model.read_bytes(), settings, 10 * 86_400, BATCH_USERS)
    want = score_partition(
        chunk, open_model(model, batch_users=BATCH_USERS), 10 * 86_400, batch_users=BATCH_USERS
    )
    assert scorer(pa.table({"path": [str(path), str(path)]})).equals(pa.concat_tables([want, want]))
    with pytest.raises(FileNotFoundError, match="--spill-dir must be a directory every node mounts"):
        scorer(pa.table({"path": [str(tmp_path / "gone.arrow")]}))
