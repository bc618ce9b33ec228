"""``python -m bench.gpu_check --model PATH`` (``make gpu-check``): prove the service really runs on
the GPU, and measure it there. Meant for a machine with an NVIDIA GPU and ``make gpu-env`` done.

1. onnxruntime offers ``CUDAExecutionProvider``, else it stops naming the fix.
2. Placement: a session on CUDA runs a batch with onnxruntime's profiler on; every node of the
   profile must have run on CUDA (copies between host and device aside). A node onnxruntime put
   on the CPU is listed and fails the check: a "GPU" service that computes on the CPU is the
   silent failure this exists to catch.
3. Answers: the same batch on a CPU session and on the CUDA one agree within 1e-5.
4. The service: ``python -m service`` with ``PI_PROVIDERS=cuda`` and ``PI_REQUIRE_GPU=true``
   reports CUDA in ``/readyz``, and its ``/predict/batch`` answers equal a CPU service's within
   1e-5 for the bench's 1,000-user body.
5. ``python -m bench`` against the GPU service's settings; its table is appended to
   bench/README.md ("GPU runs") with the device's name, unless ``--no-readme``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from bench import bodies, processes
from bench.harness import REPO
from service.artifact import ModelMetadata

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
TOLERANCE = 1e-5
#: Profile entries that are not the model's computation: transfers onnxruntime inserts.
_COPIES = ("MemcpyToHost", "MemcpyFromHost")


class CheckError(RuntimeError):
    """A check failed; the message says which and what was seen."""


@dataclass(frozen=True)
class Placement:
    by_provider: dict[str, int]  # nodes run, by execution provider
    elsewhere: list[str]  # "op (node name) on provider" for every node not on the wanted provider


def features(model: Path, users: int, seed: int = 0) -> NDArray[np.float32]:
    """A batch shaped as the model reads it, values like the encoder's (non-negative, mostly small)."""
    session = ort.InferenceSession(str(model), providers=[CPU])
    meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    rng = np.random.default_rng(seed)
    shape = (users, *meta.feature_spec.shape)
    return (rng.exponential(0.5, size=shape) * (rng.random(shape) < 0.2)).astype(np.float32)


def session(model: Path, provider: str, *, profile_dir: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_dir / "profile")
    providers = [provider] if provider == CPU else [provider, CPU]
    return ort.InferenceSession(str(model), sess_options=options, providers=providers)


def run(sess: ort.InferenceSession, batch: NDArray[np.float32]) -> NDArray[np.float32]:
    name = sess.get_inputs()[0].name
    return np.asarray(sess.run(None, {name: batch})[0], dtype=np.float32)


def profile(model: Path, provider: str, batch: NDArray[np.float32]) -> list[dict[str, Any]]:
    """onnxruntime's profile of one inference on a session for ``provider``."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        sess = session(model, provider, profile_dir=Path(scratch))
        run(sess, batch)
        events: list[dict[str, Any]] = json.loads(Path(sess.end_profiling()).read_text())
    return events


def placed(events: list[dict[str, Any]], provider: str) -> Placement:
    """Where each node of a profile ran, judged against ``provider``."""
    counts: Counter[str] = Counter()
    elsewhere = []
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or "provider" not in args or not event["name"].endswith("_kernel_time"):
            continue
        op = str(args.get("op_name", "?"))
        if op in _COPIES:
            continue
        counts[args["provider"]] += 1
        if args["provider"] != provider:
            elsewhere.append(f"{op} ({event['name'].removesuffix('_kernel_time')}) on {args['provider']}")
    if not counts:
        raise CheckError("the profile lists no node: cannot tell where the model ran")
    return Placement(dict(counts), elsewhere)


def placement(model: Path, provider: str, batch: NDArray[np.float32]) -> Placement:
    return placed(profile(model, provider, batch), provider)


def max_difference(model: Path, provider: str, batch: NDArray[np.float32]) -> float:
    cpu = run(session(model, CPU), batch)
    other = run(session(model, provider), batch)
    return float(np.max(np.abs(cpu - other)))


def _service(name: str, model: Path, workdir: Path, env: dict[str, str]) -> processes.Server:
    env = {"PI_STORE_BACKEND": "none", **env}
    return processes.start_service(name, model, workdir, env, cwd=REPO, ready_timeout=180)


GPU_ENV = {"PI_PROVIDERS": "cuda", "PI_REQUIRE_GPU": "true"}


def service_check(model: Path, workdir: Path, gpu_env: dict[str, str] = GPU_ENV) -> tuple[str, float]:
    """The GPU service's reported provider, and its answers' largest difference from a CPU service's."""
    body = bodies.batch_body()
    answers = []
    provider = ""
    for name, env in (("gpu", gpu_env), ("cpu", {"PI_PROVIDERS": "cpu"})):
        server = _service(name, model, workdir, env)
        try:
            status, ready = processes.post(server.url + "/predict/batch", body)
            if status != 200:
                raise CheckError(f"{name} service: /predict/batch answered {status}: {ready[:300]!r}")
            answers.append(np.array([r["probability"] for r in json.loads(ready)["predictions"]]))
            if name == "gpu":
                # http://127.0.0.1: a server this check started
                with urllib.request.urlopen(server.url + "/readyz", timeout=5) as r:  # nosec B310
                    provider = str(json.loads(r.read())["provider"])
        finally:
            server.stop()
    return provider, float(np.max(np.abs(answers[0] - answers[1])))


def device_name() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown GPU (nvidia-smi not found)"
    try:
        done = subprocess.run(
            [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU (nvidia-smi failed)"
    return done.stdout.strip().splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument(
        "--provider", default=CUDA, help="the provider to prove (default CUDAExecutionProvider)"
    )
    parser.add_argument(
        "--bench-args", default="", help="extra arguments for python -m bench, e.g. '--duration 5s'"
    )
    parser.add_argument("--no-bench", action="store_true", help="the checks only")
    parser.add_argument("--no-readme", action="store_true", help="print the bench's table, do not append it")
    args = parser.parse_args(argv)
    available = ort.get_available_providers()
    if args.provider not in available:
        print(
            f"error: onnxruntime offers {available}, not {args.provider}: on a machine with an NVIDIA GPU, "
            "run `make gpu-env` (onnxruntime-gpu in place of the CPU wheel) first",
            file=sys.stderr,
        )
        return 2
    batch = features(args.model, 256)
    try:
        where = placement(args.model, args.provider, batch)
        print(f"placement: {where.by_provider}")
        if where.elsewhere:
            raise CheckError("nodes not on " + args.provider + ": " + "; ".join(where.elsewhere))
        diff = max_difference(args.model, args.provider, batch)
        print(f"onnxruntime {args.provider} vs CPU, 256 users: max |difference| {diff:.2e}")
        if diff > TOLERANCE:
            raise CheckError(f"answers differ from the CPU's by {diff:.2e} > {TOLERANCE:g}")
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
            provider, served = service_check(args.model, Path(scratch))
        print(
            f"service: /readyz provider {provider}; "
            f"/predict/batch vs a CPU service: max |difference| {served:.2e}"
        )
        if provider != args.provider or served > TOLERANCE:
            raise CheckError(f"the service runs on {provider} or differs from the CPU by {served:.2e}")
    except CheckError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    if args.no_bench:
        return 0
    env = {**os.environ, **GPU_ENV}
    command = [sys.executable, "-m", "bench", "--model", str(args.model), *args.bench_args.split()]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    print(done.stdout)
    if done.returncode not in (0, 1):  # 1: ran, some target missed; the table says which
        print(done.stderr[-3000:], file=sys.stderr)
        return done.returncode
    if not args.no_readme:
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        section = (
            f"\n### {when}, {device_name()} (`make gpu-check`)\n\n"
            f"Placement {where.by_provider}, every node on {args.provider}; answers within {diff:.1e} of "
            f"the CPU's (onnxruntime) and {served:.1e} (the service).\n\n"
            f"```text\n{done.stdout.strip()}\n```\n"
        )
        readme = REPO / "bench" / "README.md"
        text = readme.read_text()
        marker = "## GPU runs (`make gpu-check`)\n"
        if marker not in text:
            text += "\n" + marker
        readme.write_text(text.replace(marker, marker + section, 1))
        print(f"appended to {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
