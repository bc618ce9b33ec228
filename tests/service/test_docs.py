"""The README stays true: its curl examples run, its tables list every setting and metric."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.config import Settings
from service.errors import REJECT_REASONS
from service.lifecycle import ModelSlot
from service.metrics import Metrics
from service.monitor import Monitor
from service.shadow import ShadowScorer
from service.store.metrics import StoreMetrics
from tests.service.onnx_models import write_model
from tests.service.processes import ServiceProcess, running_service

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED_URL = "http://127.0.0.1:8000"


README = ROOT / "README.md"


def _curl_commands(text: str) -> list[str]:
    """Each ``curl`` command in the bash blocks, with its continuation lines (quoted JSON included)."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        current: list[str] = []
        for line in block.splitlines():
            starts_new = line.startswith(("curl ", "#", ".venv", "make ", "docker ")) or not line.strip()
            if starts_new and current:
                commands.append("\n".join(current))
                current = []
            if line.startswith("curl ") or current:
                current.append(line)
        if current:
            commands.append("\n".join(current))
    return commands


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("docs")
    with running_service(write_model(tmp / "model.onnx"), tmp / "service.log") as proc:
        yield proc


@pytest.mark.slow
def test_curl_examples_work_as_written(server: ServiceProcess) -> None:
    commands = _curl_commands(README.read_text())
    assert len(commands) >= 6, commands
    answers: list[str] = []
    for command in commands:
        assert DOCUMENTED_URL in command
        proc = subprocess.run(
            ["bash", "-c", "set -o pipefail; " + command.replace(DOCUMENTED_URL, server.url)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, f"{command}\n{proc.stderr}"
        assert proc.stdout.strip(), command
        answers.append(proc.stdout)
    parsed = [json.loads(a) for a in answers if a.lstrip().startswith("{")]
    assert any("probability" in a for a in parsed)
    assert any("predictions" in a for a in parsed)
    assert any(a.get("ready") is True for a in parsed)
    errors = [a for a in parsed if "error" in a]
    assert errors, "the documented bad request should answer with an error body"
    assert {d["field"] for d in errors[0]["detail"]} == {"events[0].timestamp", "events[0].amount"}
    assert any(a.startswith("purchase_intent_users_scored_total") for a in answers)


def test_every_setting_is_documented() -> None:
    text = README.read_text()
    for name in Settings.model_fields:
        assert f"| `PI_{name.upper()}` |" in text, name


def test_every_metric_is_documented() -> None:
    text = README.read_text()
    registry = CollectorRegistry()
    Metrics(registry, latency_buckets=(0.1,), reject_reasons=REJECT_REASONS, process_metrics=False)
    StoreMetrics(registry, latency_buckets=(0.1,))
    Monitor(Settings(), registry)  # every family is collected, with or without samples
    ShadowScorer(ModelSlot(), registry, queue_size=1)
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"| `{name}` |" in text, name
    for reason in REJECT_REASONS:
        assert f"`{reason}`" in text, reason


def _python_block(text: str, after: str) -> str:
    block = re.search(r"```python\n(.*?)```", text.split(after, 1)[1], flags=re.S)
    assert block is not None, after
    return block.group(1)


@pytest.mark.slow
def test_the_client_and_v2_examples_run_as_written(
    server: ServiceProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """README's Python client example and docs/v2.md's tritonclient and curl examples, against a
    real server: what they print is what the text says they print."""
    client_example = _python_block(README.read_text(), "### Python client")
    exec(client_example.replace(DOCUMENTED_URL, server.url), {})
    printed = capsys.readouterr().out
    assert "422 invalid_input ['events[0].timestamp', 'events[0].amount']" in printed
    v2 = (ROOT / "docs" / "v2.md").read_text()
    triton_example = _python_block(v2, "## Examples")
    exec(
        triton_example.replace(DOCUMENTED_URL.removeprefix("http://"), server.url.removeprefix("http://")), {}
    )
    probability, will_purchase = capsys.readouterr().out.strip().split("] [")
    assert len(probability.strip("[").split()) == 2
    assert len(will_purchase.strip("]").split()) == 2
    (curl_block,) = re.findall(r"```bash\n(.*?)```", v2, flags=re.S)
    commands = _curl_commands(f"```bash\n{curl_block}```")
    answers = [
        json.loads(
            subprocess.run(
                ["bash", "-c", "set -o pipefail; " + c.replace(DOCUMENTED_URL, server.url)],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout
        )
        for c in commands
    ]  # fmt: skip
    assert answers[0]["inputs"][0]["name"] == "user_id"
    assert answers[1]["id"] == "r-1"
    assert [o["name"] for o in answers[1]["outputs"]] == ["probability", "will_purchase"]
