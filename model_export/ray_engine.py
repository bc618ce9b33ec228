"""The scoring job on Ray Data (``--engine ray``, the ``ray`` extra): the local engine's output, with
pass 2 on a pool of actors that each hold one onnxruntime session.

Pass 1 runs on the driver exactly as in :func:`model_export.score.score_log` (one cleaning policy,
the same errors, nothing written on bad input) and writes its spill files, each holding all rows of
its users. The dataset is their paths, one block each; an actor (:class:`SpillScorer`) reads a file
and scores it. The driver writes the answers to ``<out>.partial`` in spill order, one row group per
file, and renames it: one Parquet file, as the local engine writes. Trade-offs: docs/scoring.md.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import ray
import ray.data

from model_export.partition import SpillScorer, read_spill
from model_export.score import (
    BATCH_USERS,
    CHUNK_ROWS,
    ScoreReport,
    Tally,
    atomic_parquet,
    default_as_of,
    output_schema,
    report,
    session_settings,
    spilled,
)
from service.predictor import load_predictor

#: The object store of a local cluster the job starts itself: only the answers pass through it
#: (the actors read the spill files from disk), so a modest one leaves the memory to the job.
LOCAL_OBJECT_STORE_BYTES = 1 << 30


def connect(*, num_cpus: int | None = None) -> bool:
    """Join the cluster ``RAY_ADDRESS`` names, or else start a local one (``num_cpus``, default all
    of this machine's; no dashboard). True if this call started Ray: the caller shuts it down.
    Does nothing if Ray is already initialised in this process."""
    if ray.is_initialized():
        return False
    # a scoring job may run where nothing outside should be reached: Ray's usage report stays off
    # unless the user turns it on
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    return True


def cluster_cpus() -> int:
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return max(1, int(resources.get("CPU", 1)))


def score_log_ray(
    model: Path,
    source: str | Path,
    out: Path,
    *,
    as_of: int | None = None,
    columns: Mapping[str, str] | None = None,
    chunk_rows: int = CHUNK_ROWS,
    batch_users: int = BATCH_USERS,
    cpus_per_actor: int = 1,
    actors: int | None = None,
    spill_dir: Path | None = None,
    progress: bool = False,
) -> ScoreReport:
    """:func:`model_export.score.score_log` on the Ray cluster this process is connected to
    (:func:`connect`): ``actors`` actors (default: as many as the cluster's CPUs allow) of
    ``cpus_per_actor`` CPUs each, whose onnxruntime sessions get as many intra-op threads.

    The model is loaded and checked here first, so a bad model or a log it cannot read fails before
    any Ray work; the same :class:`~model_export.data.DataError` as the local engine's for bad input.
    """
    settings = session_settings(batch_users=batch_users, threads=cpus_per_actor)
    predictor = load_predictor(settings, model)
    pool = actors if actors is not None else max(1, cluster_cpus() // cpus_per_actor)
    started = time.perf_counter()
    with spilled(
        predictor,
        source,
        out,
        columns=columns,
        chunk_rows=chunk_rows,
        spill_dir=spill_dir,
        progress=progress,
        partitions_multiple_of=pool,  # every actor gets as many blocks
    ) as (log_file, spill):
        as_of = as_of if as_of is not None else default_as_of(log_file)
        # the actors read the spill files themselves: no copy through the object store, and each
        # holds one file at a time, as the local engine does
        data = ray.data.from_items([{"path": str(p)} for p in spill.paths], override_num_blocks=spill.k)
        # the output's row groups in spill order, as the local engine writes them: the same log
        # gives the same file on every run
        data.context.execution_options.preserve_order = True
        data.context.enable_progress_bars = progress
        data.context.print_on_execution_start = progress
        scored = data.map_batches(
            SpillScorer,
            batch_size=1,  # one spill file a call: all of its users' rows, and only theirs
            batch_format="pyarrow",
            # an actor is handed its next spill file when it finishes one, so a slower node or a
            # busier core takes fewer, instead of each actor being sent several up front
            compute=ray.data.ActorPoolStrategy(size=pool, max_tasks_in_flight_per_actor=1),
            num_cpus=cpus_per_actor,
            fn_constructor_kwargs={
                "model": model.read_bytes(),
                "settings": settings,
                "as_of": as_of,
                "batch_users": batch_users,
            },
        )
        schema = output_schema(predictor, as_of)
        tally = Tally()
        uncounted = iter(spill.paths)
        with atomic_parquet(out, schema) as writer:
            for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
                table: pa.Table = batch
                writer.write_table(table.cast(schema), max(table.num_rows, 1))
                # the report's counts, a spill file per answer, while the actors score the rest
                for path in itertools.islice(uncounted, 1):
                    tally.add(read_spill(path), as_of)
        for path in uncounted:
            tally.add(read_spill(path), as_of)
    seconds = time.perf_counter() - started
    return report(predictor, source, log_file, spill, out, as_of, tally, seconds, engine="ray", workers=pool)
