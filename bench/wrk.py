"""Driving wrk: a Lua script for POST bodies, one bounded run, and a parser for its ``--latency`` report.

Latency percentiles are read from wrk's ``Latency Distribution`` block (printed by ``--latency``),
not from the ``Thread Stats`` line, whose columns are mean / stdev / max. wrk prints each value with
its own unit (``us``, ``ms``, ``s``, ``m``, ``h``), chosen per value, so every number is converted
to milliseconds through its unit; a value without a known unit is an error, not a guess.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Milliseconds per unit, for every unit wrk's ``format_time_us`` can print.
_TIME_UNITS_MS: dict[str, float] = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}

_NUMBER_UNIT = re.compile(r"^([0-9]*\.?[0-9]+)([a-z]+)$")
_PERCENTILE = re.compile(r"^\s*([0-9.]+)%\s+(\S+)\s*$")
_REQUESTS = re.compile(r"^\s*(\d+) requests in (\S+), (\S+) read\s*$")
_RATE = re.compile(r"^Requests/sec:\s+([0-9.]+)\s*$")
_SOCKET_ERRORS = re.compile(r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)\s*$")
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses: (\d+)\s*$")


class WrkError(RuntimeError):
    """wrk failed, or printed something this parser does not understand."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run. Latencies in milliseconds; ``percentiles_ms`` maps 50.0, 75.0, 90.0, 99.0."""

    requests: int
    duration_s: float
    requests_per_s: float
    percentiles_ms: dict[float, float]
    socket_errors: int
    non_2xx: int

    @property
    def p50_ms(self) -> float:
        return self.percentiles_ms[50.0]

    @property
    def p99_ms(self) -> float:
        return self.percentiles_ms[99.0]

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


def parse_time_ms(text: str) -> float:
    """``"54.00us"`` -> 0.054, ``"1.23ms"`` -> 1.23, ``"2.00s"`` -> 2000.0."""
    match = _NUMBER_UNIT.match(text.strip())
    if match is None or match.group(2) not in _TIME_UNITS_MS:
        raise WrkError(f"not a wrk time value: {text!r}")
    return float(match.group(1)) * _TIME_UNITS_MS[match.group(2)]


def parse_output(text: str) -> WrkResult:
    """Parse what ``wrk --latency`` prints; raises :class:`WrkError` if a needed part is missing."""
    lines = text.splitlines()
    percentiles: dict[float, float] = {}
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Latency Distribution")
    except StopIteration:
        raise WrkError("no 'Latency Distribution' block: was wrk run with --latency?") from None
    for line in lines[start + 1 :]:
        match = _PERCENTILE.match(line)
        if match is None:
            break
        percentiles[float(match.group(1))] = parse_time_ms(match.group(2))
    if 50.0 not in percentiles or 99.0 not in percentiles:
        raise WrkError(f"latency distribution without p50 and p99: {sorted(percentiles)}")

    requests = duration_s = rate = None
    socket_errors = non_2xx = 0
    for line in lines:
        if (m := _REQUESTS.match(line)) is not None:
            requests, duration_s = int(m.group(1)), parse_time_ms(m.group(2)) / 1e3
        elif (m := _RATE.match(line)) is not None:
            rate = float(m.group(1))
        elif (m := _SOCKET_ERRORS.match(line)) is not None:
            socket_errors = sum(int(g) for g in m.groups())
        elif (m := _NON_2XX.match(line)) is not None:
            non_2xx = int(m.group(1))
    if requests is None or duration_s is None or rate is None:
        raise WrkError("no 'N requests in T' or 'Requests/sec' line in wrk's output")
    return WrkResult(
        requests=requests,
        duration_s=duration_s,
        requests_per_s=rate,
        percentiles_ms=percentiles,
        socket_errors=socket_errors,
        non_2xx=non_2xx,
    )


def write_post_script(
    path: Path, body: Path, content_type: str = "application/json", headers: dict[str, str] | None = None
) -> Path:
    """A wrk Lua script that POSTs the bytes of ``body`` (as ``content_type``) on every request.

    The body is read once at start-up; no ``request``/``response`` callback is defined, so wrk sends
    one pre-built request and stays in C on the hot path.
    """
    quoted = str(body.resolve()).replace("\\", "\\\\").replace('"', '\\"')
    path.write_text(
        f'local file = assert(io.open("{quoted}", "rb"))\n'
        'wrk.method = "POST"\n'
        'wrk.body = file:read("*a")\n'
        "file:close()\n"
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
        + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
    )
    return path


def write_new_user_script(path: Path, body: Path, user_id: str) -> Path:
    """A wrk Lua script that POSTs ``body`` with ``user_id`` replaced by a new id on every request.

    For the monitoring phases: outcome recording keeps one prediction per user and day, so a load
    that repeats one user would write almost nothing. Ids are ``<thread>-<counter>``; the
    ``request`` callback costs wrk the same whichever server it loads.
    """
    quoted = str(body.resolve()).replace("\\", "\\\\").replace('"', '\\"')
    pattern = user_id.replace("-", "%-")
    path.write_text(
        f'local file = assert(io.open("{quoted}", "rb"))\n'
        'local body = file:read("*a")\n'
        "file:close()\n"
        f'local head, tail = body:match("^(.-){pattern}(.*)$")\n'
        'assert(head, "the body does not name the user")\n'
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        "local threads = 0\n"
        "function setup(thread)\n"
        "  threads = threads + 1\n"
        '  thread:set("tid", threads)\n'
        "end\n"
        "local n = 0\n"
        "function request()\n"
        "  n = n + 1\n"
        '  return wrk.format(nil, nil, nil, head .. "u" .. tid .. "-" .. n .. tail)\n'
        "end\n"
    )
    return path


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise WrkError("wrk not found on PATH: run scripts/system-deps.sh (Debian package 'wrk')")
    return path


def version() -> str:
    """wrk's own version line (``wrk -v`` prints it and exits 1)."""
    done = subprocess.run([wrk_binary(), "-v"], capture_output=True, text=True, timeout=10, check=False)
    first = (done.stdout or done.stderr).splitlines()
    return first[0].split(" Copyright", 1)[0].strip() if first else "unknown"


def run(
    url: str,
    *,
    script: Path,
    connections: int,
    duration_s: int,
    threads: int = 1,
    timeout_s: int = 10,
) -> WrkResult:
    """One closed-loop wrk run of ``duration_s`` whole seconds; killed if it overruns by 30 s."""
    command = [
        wrk_binary(),
        f"--threads={max(1, min(threads, connections))}",
        f"--connections={connections}",
        f"--duration={duration_s}s",
        f"--timeout={timeout_s}s",
        "--latency",
        f"--script={script}",
        url,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 30, check=False)
    except subprocess.TimeoutExpired:
        raise WrkError(f"wrk did not finish within {duration_s + 30}s: {' '.join(command)}") from None
    if done.returncode != 0:
        raise WrkError(f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse_output(done.stdout)
