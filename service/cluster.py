"""Worker processes of one service (``--workers N``): what they share and how they agree.

The parent (``service/workers.py``) binds the socket, creates the shared cells below and a private
run directory, and starts the workers; each worker is a whole service (its own event loop,
micro-batcher, onnxruntime session) that also listens on a Unix socket in the run directory,
``worker-<i>.sock``, for its siblings' calls (one JSON line in, one out):

- ``stage`` / ``drop``: plan an admin change of the models and keep it for a commit
  (:meth:`Cluster.commit`, the two-phase swap behind ``/admin/reload`` and the rollout routes);
- ``sync``: switch to the committed models now and report them;
- ``metrics``: the worker's own registry and drift windows, so any worker can answer a scrape for
  all of them (:func:`merge`: counters and histograms summed, gauges by their declared mode;
  ``siblings.scrape`` recomputes PSI, KS and the shadow's mean over all workers' data);
- ``forget``: drop a user's predictions buffered for recording (erasure).

Shared memory holds three kinds of int64 cells: the committed model generation, the last ticket
handed out, and each worker's readiness. The run directory also holds ``models.json``, the
committed models' files, which a restarted worker loads instead of the configured ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import anyio.to_thread
from prometheus_client.core import Metric
from prometheus_client.samples import Sample

from service.errors import ModelRejectedError, NoCanaryError, NotReadyError, ServiceError

logger = logging.getLogger(__name__)

GENERATION, TICKET, READY = 0, 1, 2  # cell offsets; READY + i is worker i's readiness

#: How a gauge's values from the workers become one: ``sum`` (a quantity each worker holds a part
#: of), ``min`` / ``max``, ``leader`` (worker 0's: it alone runs the store's periodic jobs).
GaugeMode = Literal["sum", "min", "max", "leader"]

#: A sibling that takes longer than this to answer a call is treated as not running.
CALL_TIMEOUT_SECONDS = 5.0
#: A stage loads and warms up a model file: allow for a large one on a busy machine.
STAGE_TIMEOUT_SECONDS = 300.0


class Cells(Protocol):
    """A ``multiprocessing`` ``RawArray("q", ...)``: int64 cells in memory every worker maps."""

    def __getitem__(self, index: int) -> int: ...

    def __setitem__(self, index: int, value: int) -> None: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Shared:
    """What the parent hands each worker (picklable when the worker is spawned)."""

    run_dir: Path
    size: int
    cells: Cells


class GenerationCell:
    """The committed model generation, read by :class:`~service.lifecycle.ModelSlot` per read."""

    def __init__(self, cells: Cells) -> None:
        self._cells = cells

    @property
    def value(self) -> int:
        return int(self._cells[GENERATION])


class Handler(Protocol):
    """What a worker does for its siblings' calls (``service/cluster_ops.py`` builds it)."""

    async def __call__(self, message: dict[str, Any]) -> dict[str, Any]: ...


class Cluster:
    """One worker's view of the others; see the module docstring."""

    def __init__(self, shared: Shared, index: int) -> None:
        self.shared = shared
        self.index = index
        self.size = shared.size
        self.generation = GenerationCell(shared.cells)
        self._server: asyncio.AbstractServer | None = None

    @property
    def leader(self) -> bool:
        """Worker 0 runs the store's periodic jobs (compaction, settling outcomes): once per service."""
        return self.index == 0

    def socket_path(self, index: int) -> Path:
        return self.shared.run_dir / f"worker-{index}.sock"

    @property
    def state_path(self) -> Path:
        return self.shared.run_dir / "models.json"

    # ---- readiness ----------------------------------------------------------------------------

    def set_ready(self, ready: bool) -> None:
        """Plain store into shared memory: safe from a signal handler."""
        self.shared.cells[READY + self.index] = 1 if ready else 0

    def workers_ready(self) -> int:
        cells = self.shared.cells
        return sum(1 for i in range(self.size) if cells[READY + i] == 1)

    # ---- the control socket ---------------------------------------------------------------------

    async def serve(self, handler: Handler) -> None:
        path = self.socket_path(self.index)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by this worker's previous life

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                line = await reader.readline()
                if not line:
                    return
                try:
                    answer = await handler(json.loads(line))
                except Exception:
                    logger.exception("worker call failed")
                    answer = {"ok": False, "status": 500, "code": "internal", "message": "internal error"}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        self._server = await asyncio.start_unix_server(on_connect, path=str(path), limit=1 << 26)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.CancelledError):
                await self._server.wait_closed()
            self._server = None

    async def call(
        self, index: int, message: dict[str, Any], *, timeout: float = CALL_TIMEOUT_SECONDS
    ) -> dict[str, Any]:
        """Worker ``index``'s answer; :class:`NotReadyError` when it does not answer in time."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(
                    str(self.socket_path(index)), limit=1 << 26
                )
                try:
                    writer.write(json.dumps(message).encode() + b"\n")
                    await writer.drain()
                    line = await reader.readline()
                finally:
                    writer.close()
                    with contextlib.suppress(ConnectionError):
                        await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            raise NotReadyError(
                f"worker process {index} of {self.size} is not answering ({type(exc).__name__}); retry"
            ) from None
        if not line:
            raise NotReadyError(f"worker process {index} of {self.size} closed the call; retry")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def call_others(
        self, message: dict[str, Any], *, timeout: float = CALL_TIMEOUT_SECONDS
    ) -> dict[int, dict[str, Any] | BaseException]:
        """Every other worker's answer (or the error calling it), by worker index."""
        others = [i for i in range(self.size) if i != self.index]
        results = await asyncio.gather(
            *(self.call(i, message, timeout=timeout) for i in others), return_exceptions=True
        )
        return dict(zip(others, results, strict=True))

    # ---- one admin change at a time, in every worker -------------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """An advisory lock on the run directory: changes from two workers never interleave."""
        fd = os.open(self.shared.run_dir / "changes.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await anyio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def next_ticket(self) -> int:
        """A generation number never used before (call it under :meth:`exclusive`)."""
        cells = self.shared.cells
        ticket = max(cells[TICKET], cells[GENERATION]) + 1
        cells[TICKET] = ticket
        return ticket

    def commit_generation(self, ticket: int) -> None:
        """The commit point: from this store on, every worker's next model read sees ``ticket``."""
        self.shared.cells[GENERATION] = ticket

    def write_state(self, state: dict[str, Any]) -> None:
        """The committed models' files, for a worker started later (written atomically)."""
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_path)

    def read_state(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        return state


def raise_refusal(answer: dict[str, Any], index: int) -> None:
    """Re-raise a sibling's refusal as the error the client would have had from it."""
    code, message = answer.get("code"), str(answer.get("message", ""))
    errors: dict[str, type[ServiceError]] = {"model_rejected": ModelRejectedError, "no_canary": NoCanaryError}
    error = errors.get(str(code))
    if error is not None:
        raise error(message)
    raise NotReadyError(f"worker process {index} refused the change: {message}")


def refusal(exc: ServiceError) -> dict[str, Any]:
    return {"ok": False, "status": exc.status_code, "code": exc.code, "message": str(exc)}


# ---- metrics across processes ------------------------------------------------------------------


def families_to_json(families: Iterable[Metric]) -> list[dict[str, Any]]:
    return [
        {
            "name": m.name,
            "type": m.type,
            "help": m.documentation,
            "unit": m.unit,
            "samples": [[s.name, s.labels, _number(s.value)] for s in m.samples],
        }
        for m in families
    ]


def families_from_json(data: Sequence[dict[str, Any]]) -> list[Metric]:
    out = []
    for item in data:
        metric = Metric(item["name"], item["help"], item["type"], item["unit"])
        for name, labels, value in item["samples"]:
            metric.add_sample(name, labels, float(value))
        out.append(metric)
    return out


def _number(value: float) -> float | str:
    # JSON has no NaN or infinities; float("nan") / float("inf") read the strings back
    return value if math.isfinite(value) else repr(float(value))


def merge(per_worker: Sequence[Sequence[Metric]], modes: dict[str, GaugeMode]) -> list[Metric]:
    """One exposition from the workers' families (worker ``i``'s at position ``i``): counter,
    histogram and summary samples are summed (``_created`` takes the earliest); a gauge's by its
    declared mode. A gauge without one raises: the tests scrape every metric to catch it."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for worker, families in enumerate(per_worker):
        for family in families:
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            seen = values[family.name]
            mode: GaugeMode | None = None
            if family.type == "gauge":
                mode = modes.get(family.name)
                if mode is None:
                    raise KeyError(f"gauge {family.name} declares no mode for merging across workers")
                if mode == "leader" and worker != 0:
                    continue
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                before = seen.get(key)
                if before is None:
                    seen[key] = sample.value
                elif sample.name.endswith("_created") or mode == "min":
                    seen[key] = min(before, sample.value)
                elif mode == "max":
                    seen[key] = max(before, sample.value)
                else:  # counters, histograms, summaries, and gauges that add up
                    seen[key] = before + sample.value
    out = []
    for name, target in merged.items():
        for (sample_name, labels), value in values[name].items():
            target.samples.append(Sample(sample_name, dict(labels), value))
        out.append(target)
    return out


class MergedCollector:
    """Hands a merged exposition to ``generate_latest``."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families
