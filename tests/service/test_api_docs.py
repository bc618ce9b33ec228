"""``/docs`` and ``/redoc`` work with no network beyond the service: every asset the pages reference
comes from the service itself, and a real headless Chromium that can resolve no other host renders
every operation of the served OpenAPI document."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.service.onnx_models import write_model
from tests.service.processes import ServiceProcess, require_binary, running_service

PAGES = ("/docs", "/redoc")


class _References(HTMLParser):
    """Every URL a page makes the browser load: scripts, stylesheets, icons, ReDoc's spec."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is not None and (name in {"src", "href", "spec-url"}):
                self.urls.append(value)


def _references(html: str) -> list[str]:
    parser = _References()
    parser.feed(html)
    # Swagger UI takes the document's URL in its inline start-up script, not in an attribute
    parser.urls.extend(re.findall(r"\burl:\s*'([^']+)'", html))
    return parser.urls


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("api-docs")
    with running_service(write_model(tmp / "model.onnx"), tmp / "service.log") as proc:
        yield proc


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_every_asset_a_docs_page_needs_is_served_by_the_service(server: ServiceProcess, page: str) -> None:
    answer = httpx.get(server.url + page, timeout=10)
    assert answer.status_code == 200
    urls = _references(answer.text)
    assert any(u.endswith(".js") for u in urls), urls
    assert "/openapi.json" in urls
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme, f"{page} loads {url} from another host"
        assert not parts.netloc, f"{page} loads {url} from another host"
        asset = httpx.get(server.url + url, timeout=10)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000, url  # a real bundle, not an empty placeholder
        kind = asset.headers["content-type"]
        expected = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "json"}
        assert expected[Path(parts.path).suffix] in kind, (url, kind)


@pytest.mark.slow
def test_an_unknown_asset_is_a_404_in_the_envelope(server: ServiceProcess) -> None:
    for name in ("missing.js", "..%2F..%2Fconfig.py", "__init__.py"):
        answer = httpx.get(f"{server.url}/docs/assets/{name}", timeout=10)
        assert answer.status_code == 404, name
        assert answer.json()["error"] == "not_found"


def _render(chromium: str, url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, in a Chromium that can resolve only the loopback
    address: a CDN asset would fail to load and leave the page blank. The background-networking
    flags keep the browser's own update and sync calls out of the way."""
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            # virtual time runs ahead when the page is idle: the budget caps it, not the wall clock
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_a_headless_browser_renders_every_operation_offline(server: ServiceProcess, tmp_path: Path) -> None:
    chromium = require_binary("chromium", package="chromium")
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    operations = [
        # Swagger UI files an untagged operation under "default"
        (op.get("tags", ["default"])[0], op["operationId"])
        for path in spec["paths"].values()
        for op in path.values()
    ]
    assert len(operations) >= 7, operations
    swagger = _render(chromium, server.url + "/docs", tmp_path / "swagger")
    redoc = _render(chromium, server.url + "/redoc", tmp_path / "redoc")
    for tag, operation_id in operations:
        assert f'id="operations-{tag}-{operation_id}"' in swagger, operation_id
        assert f'id="operation/{operation_id}"' in redoc, operation_id
    assert spec["info"]["title"] in swagger
