"""The peers ``make bench-peers`` measures, and how to start each (its venv, command, paths, body).

Every peer serves the same ONNX file through :class:`bench.peers.model.PeerModel` (BentoML through
its own service file) from its own venv ``bench/.venv-<venv>``; ports are chosen when the peer is
started, since only one server runs at a time. Versions are the Makefile's pins.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import processes

#: The body our ``/predict`` takes, or a V2 inference request carrying it as one BYTES element.
OURS_BODY = "ours"
V2_BODY = "v2"
_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    port: int
    ready_path: str
    predict_path: str
    body: str = OURS_BODY
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Peer:
    name: str
    #: ``bench/.venv-<venv>``
    venv: str
    launch: Callable[[Path, Path, Path], Launch]  # (venv, model, workdir)


def v2_body(body: bytes) -> bytes:
    """A V2 inference request whose input ``body`` is one row holding ``body``'s JSON text."""
    tensor = {"name": "body", "shape": [1, 1], "datatype": "BYTES", "data": [body.decode()]}
    return json.dumps({"inputs": [tensor]}).encode()


def _bentoml(workers: int) -> Callable[[Path, Path, Path], Launch]:
    def launch(venv: Path, model: Path, workdir: Path) -> Launch:
        port = processes.free_port()
        argv = [str(venv / "bin/bentoml"), "serve", "bench.peers.bentoml_service:PurchaseIntent"]
        argv += ["--host", processes.HOST, "--port", str(port), "--working-dir", str(_REPO)]
        env = {
            "BENTOML_HOME": str(workdir / "bentoml-home"),
            "BENTOML_DO_NOT_TRACK": "true",
            "PI_PEER_WORKERS": str(workers),
        }
        return Launch(argv, port, "/readyz", "/predict", env=env)

    return launch


def _mlserver(*, v2: bool, workers: int = 0) -> Callable[[Path, Path, Path], Launch]:
    """MLServer tuned: no gzip, no metrics endpoint, no debug; adaptive batching on the V2 path."""

    def launch(venv: Path, model: Path, workdir: Path) -> Launch:
        port = processes.free_port()
        folder = workdir / f"mlserver-{port}"
        folder.mkdir()
        settings = {
            "host": processes.HOST,
            "http_port": port,
            "grpc_port": processes.free_port(),
            "metrics_port": processes.free_port(),
            "parallel_workers": workers,
            "debug": False,
            "metrics_endpoint": None,
            "gzip_enabled": False,
        }
        model_settings: dict[str, object] = {
            "name": "purchase-intent",
            "implementation": "bench.peers.mlserver_runtime.PurchaseIntent",
            "parameters": {"uri": str(model)},
        }
        if v2:
            model_settings |= {"max_batch_size": 64, "max_batch_time": 0.001}
        (folder / "settings.json").write_text(json.dumps(settings))
        (folder / "model-settings.json").write_text(json.dumps(model_settings))
        path = "/v2/models/purchase-intent/infer" if v2 else "/predict"
        body = V2_BODY if v2 else OURS_BODY
        argv = [str(venv / "bin/mlserver"), "start", str(folder)]
        return Launch(argv, port, "/v2/models/purchase-intent/ready", path, body)

    return launch


def _kserve(workers: int) -> Callable[[Path, Path, Path], Launch]:
    def launch(venv: Path, model: Path, workdir: Path) -> Launch:
        port = processes.free_port()
        argv = [str(venv / "bin/python"), "-m", "bench.peers.kserve_service", "--http_port", str(port)]
        argv += ["--grpc_port", str(processes.free_port()), "--enable_grpc", "false"]
        argv += ["--enable_latency_logging", "false", "--workers", str(workers)]
        path = "/v1/models/purchase-intent"
        return Launch(argv, port, path, path + ":predict")

    return launch


def _pytriton(venv: Path, model: Path, workdir: Path) -> Launch:
    port = processes.free_port()
    argv = [str(venv / "bin/python"), "-m", "bench.peers.pytriton_service", "--http-port", str(port)]
    argv += ["--grpc-port", str(processes.free_port()), "--metrics-port", str(processes.free_port())]
    path = "/v2/models/purchase_intent"
    return Launch(
        argv, port, path + "/ready", path + "/infer", V2_BODY, {"LD_LIBRARY_PATH": libpython_dir(venv)}
    )


def libpython_dir(venv: Path) -> str:
    """Where the venv's interpreter keeps its libpython: Triton's python-backend stub links it, and
    must get the interpreter's own build (the system's ``libpython3.x`` is another one)."""
    done = subprocess.run(
        [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip()


def _litserve(*, workers: int, batch: int) -> Callable[[Path, Path, Path], Launch]:
    def launch(venv: Path, model: Path, workdir: Path) -> Launch:
        port = processes.free_port()
        argv = [str(venv / "bin/python"), "-m", "bench.peers.litserve_service", "--port", str(port)]
        argv += ["--workers", str(workers), "--max-batch-size", str(batch)]
        return Launch(argv, port, "/health", "/predict")

    return launch


def lineup() -> list[Peer]:
    """Every peer, one-worker modes first, each followed by its multi-worker or batching variants."""
    return [
        Peer("BentoML 1.4.40", "peers", _bentoml(1)),
        Peer("BentoML 1.4.40, 2 workers", "peers", _bentoml(2)),
        Peer("MLServer 1.7.1, custom handler", "mlserver", _mlserver(v2=False)),
        Peer("MLServer 1.7.1, V2 + adaptive batching", "mlserver", _mlserver(v2=True)),
        # Kept although it cannot answer: MLServer's parallel wrapper hides the handler's `request`
        # parameter from FastAPI, so every call is a 422; the run records that, not a timing.
        Peer(
            "MLServer 1.7.1, custom handler, 2 parallel workers", "mlserver", _mlserver(v2=False, workers=2)
        ),
        Peer(
            "MLServer 1.7.1, V2 + adaptive batching, 2 parallel workers",
            "mlserver",
            _mlserver(v2=True, workers=2),
        ),
        Peer("KServe 0.21.0", "kserve", _kserve(1)),
        Peer("KServe 0.21.0, 2 workers", "kserve", _kserve(2)),
        Peer("PyTriton 0.7.0 (Triton 2.51), dynamic batching", "pytriton", _pytriton),
        Peer("LitServe 0.2.19", "litserve", _litserve(workers=1, batch=1)),
        Peer("LitServe 0.2.19, batching", "litserve", _litserve(workers=1, batch=16)),
        Peer("LitServe 0.2.19, 2 workers", "litserve", _litserve(workers=2, batch=1)),
        Peer("LitServe 0.2.19, batching, 2 workers", "litserve", _litserve(workers=2, batch=16)),
    ]
