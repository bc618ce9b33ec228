"""Facts about the machine a run happened on, recorded with every result (numbers without them mean
little). The load average before and after says whether something else was running."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

_PACKAGES = ("onnxruntime", "fastapi", "starlette", "uvicorn", "pydantic", "pydantic-core", "numpy")
_OPTIONAL = ("uvloop", "httptools", "orjson")


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    logical_cpus: int
    usable_cpus: int
    memory_gib: float
    kernel: str
    python: str
    onnxruntime: str
    onnxruntime_providers: list[str]
    packages: dict[str, str]
    load_average: tuple[float, float, float]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return (round(one, 2), round(five, 2), round(fifteen, 2))


def describe() -> Machine:
    return Machine(
        cpu_model=_cpu_model(),
        logical_cpus=os.cpu_count() or 0,
        usable_cpus=len(os.sched_getaffinity(0)),
        memory_gib=_memory_gib(),
        kernel=platform.release(),
        python=platform.python_version(),
        onnxruntime=ort.__version__,
        onnxruntime_providers=list(ort.get_available_providers()),
        packages={name: _version(name) for name in (*_PACKAGES, *_OPTIONAL)},
        load_average=load_average(),
    )


def write_run(
    kind: str,
    started: str,
    path: Path | None,
    host: Machine,
    load: tuple[tuple[float, float, float], tuple[float, float, float]],
    record: dict[str, Any],
) -> Path:
    """A bench's JSON record: ``path``, or ``bench/results/<kind>-<started>.json``; the machine and
    the load average before and after go first. Prints where it went."""
    out = (
        path
        or Path(__file__).resolve().parents[1]
        / "bench"
        / "results"
        / f"{kind}-{started.replace(':', '')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    head = {
        "started": started,
        "machine": asdict(host),
        "load_average": {"before": load[0], "after": load[1]},
    }
    out.write_text(json.dumps({**head, **record}, indent=2))
    print(f"\nJSON: {out}")
    return out
