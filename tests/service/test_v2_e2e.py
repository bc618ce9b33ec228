"""The Open Inference Protocol (V2) against a real server process, driven by two real clients.

``tritonclient.http`` (JSON with ``binary_data=False``, Triton's binary extension with ``True``) and
plain ``httpx`` following the protocol's text. Every answer is compared with what the columnar
``/predict/batch`` answers for the same users: the same float32, bit for bit.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from service.features import FeatureSpec, encode_batch
from tests.service.onnx_models import write_model
from tests.service.processes import ServiceProcess, running_service

pytestmark = pytest.mark.slow

HISTORIES = "purchase-intent"
FEATURES = "purchase-intent-features"
MAX_USERS = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("v2")
    env = {"PI_MAX_BATCH_USERS": str(MAX_USERS)}
    with running_service(write_model(tmp / "model.onnx"), tmp / "service.log", env=env) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServiceProcess) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def served(server: ServiceProcess) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/v1/model").json())


def _histories(seed: int, n: int) -> dict[str, NDArray[Any]]:
    """``n`` users with 0 to 30 events in 1996-1997, epoch seconds; some share an id."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 31, n)
    counts[0] = 0  # a user with no events at all
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    m = int(offsets[-1])
    return {
        "user_id": np.array([f"u-{i % (n - 2)}".encode() for i in range(n)], dtype=np.object_),
        "offsets": offsets,
        "timestamp": rng.integers(820_454_400, 883_612_800, m).astype(np.int64),
        "amount": np.round(rng.gamma(2.0, 15.0, m), 2),
        "quantity": rng.integers(1, 6, m).astype(np.int64),
        "as_of": rng.integers(875_000_000, 884_000_000, n).astype(np.int64),
    }


_DATATYPES = {"user_id": "BYTES", "offsets": "INT64", "timestamp": "INT64", "amount": "FP64"}


def _inputs(columns: dict[str, NDArray[Any]], binary: bool) -> list[triton.InferInput]:
    inputs = []
    for name, values in columns.items():
        tensor = triton.InferInput(name, list(values.shape), _DATATYPES.get(name, "INT64"))
        tensor.set_data_from_numpy(values, binary_data=binary)
        inputs.append(tensor)
    return inputs


def _batch_answer(server: ServiceProcess, columns: dict[str, NDArray[Any]]) -> dict[str, Any]:
    body = {
        "columns": {k: [u.decode() for u in v] if k == "user_id" else v.tolist() for k, v in columns.items()}
    }
    r = httpx.post(f"{server.url}/predict/batch", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json()["columns"])


def _bits(values: Any) -> NDArray[np.uint32]:
    return np.asarray(values, dtype=np.float32).view(np.uint32)


def test_health_and_metadata_through_tritonclient(
    client: triton.InferenceServerClient, served: dict[str, Any]
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(HISTORIES)
    assert client.is_model_ready(FEATURES, model_version=served["model_version"])
    assert not client.is_model_ready(HISTORIES, model_version="not-this-one")
    assert not client.is_model_ready("no-such-model")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]

    meta = client.get_model_metadata(HISTORIES)
    assert meta["versions"] == [served["model_version"]]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["inputs"]} == {
        ("user_id", "BYTES", (-1,)),
        ("offsets", "INT64", (-1,)),
        ("timestamp", "INT64", (-1,)),
        ("amount", "FP64", (-1,)),
        ("quantity", "INT64", (-1,)),
        ("as_of", "INT64", (-1,)),
    }
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("probability", "FP32", [-1]),
        ("will_purchase", "BOOL", [-1]),
    ]
    spec = served["feature_spec"]
    features = client.get_model_metadata(FEATURES, model_version=served["model_version"])
    assert features["inputs"] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, spec["lookback_bins"], len(spec["channels"])]}
    ]
    with pytest.raises(InferenceServerException, match="no such model"):
        client.get_model_metadata("no-such-model")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("seed", [1, 2])
def test_tritonclient_infer_equals_predict_batch_to_the_bit(
    client: triton.InferenceServerClient, server: ServiceProcess, binary: bool, seed: int
) -> None:
    columns = _histories(seed, MAX_USERS)
    expected = _batch_answer(server, columns)
    outputs = [
        triton.InferRequestedOutput("probability", binary_data=binary),
        triton.InferRequestedOutput("will_purchase", binary_data=binary),
    ]
    result = client.infer(HISTORIES, _inputs(columns, binary), outputs=outputs, request_id=f"req-{seed}")
    probability = result.as_numpy("probability")
    assert probability.dtype == np.float32
    assert np.array_equal(_bits(probability), _bits(expected["probability"]))
    assert result.as_numpy("will_purchase").tolist() == expected["will_purchase"]
    assert result.get_response()["id"] == f"req-{seed}"
    # no outputs named: tritonclient asks for every output in binary (binary_data_output)
    everything = client.infer(HISTORIES, _inputs(columns, binary))
    assert np.array_equal(_bits(everything.as_numpy("probability")), _bits(expected["probability"]))


def test_a_version_path_and_as_of_left_out(
    client: triton.InferenceServerClient, server: ServiceProcess, served: dict[str, Any]
) -> None:
    columns = _histories(3, 5)
    columns["as_of"] = np.full(5, 883_612_800, dtype=np.int64)
    expected = _batch_answer(server, columns)
    result = client.infer(HISTORIES, _inputs(columns, True), model_version=served["model_version"])
    assert np.array_equal(_bits(result.as_numpy("probability")), _bits(expected["probability"]))
    # without as_of, "now" for both: the same as the columnar body without it
    del columns["as_of"]
    now_answer = client.infer(HISTORIES, _inputs(columns, False)).as_numpy("probability")
    assert np.array_equal(_bits(now_answer), _bits(_batch_answer(server, columns)["probability"]))
    with pytest.raises(InferenceServerException, match="no such model version"):
        client.infer(HISTORIES, _inputs(columns, False), model_version="other")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_features_model_equals_the_histories_model(
    client: triton.InferenceServerClient, server: ServiceProcess, served: dict[str, Any], binary: bool
) -> None:
    """A caller who featurises with the service's own encoder gets the same float32 back."""
    columns = _histories(4, 20)
    spec = FeatureSpec.from_dict(served["feature_spec"])
    features = encode_batch(
        columns["timestamp"],
        columns["amount"],
        columns["quantity"].astype(np.float64),
        columns["offsets"],
        columns["as_of"],
        spec,
    )
    tensor = triton.InferInput("features", list(features.shape), "FP32")
    tensor.set_data_from_numpy(features, binary_data=binary)
    result = client.infer(FEATURES, [tensor], outputs=[triton.InferRequestedOutput("probability", binary)])
    assert np.array_equal(
        _bits(result.as_numpy("probability")), _bits(_batch_answer(server, columns)["probability"])
    )


def _json_tensors(columns: dict[str, NDArray[Any]]) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "shape": list(values.shape),
            "datatype": _DATATYPES.get(name, "INT64"),
            "data": [u.decode() for u in values] if name == "user_id" else values.tolist(),
        }
        for name, values in columns.items()
    ]


def test_plain_httpx_following_the_protocol(server: ServiceProcess) -> None:
    """The protocol's JSON as written in the spec, unknown parameters included; then the binary
    extension built by hand: tensors after the JSON, BYTES length-prefixed."""
    columns = _histories(5, 12)
    expected = _batch_answer(server, columns)
    url = f"{server.url}/v2/models/{HISTORIES}/infer"
    body = {
        "id": "plain-1",
        "parameters": {"priority": 0, "something_else": {"nested": True}},
        "inputs": [{**t, "parameters": {"unknown": 1}} for t in _json_tensors(columns)],
        "outputs": [{"name": "probability", "parameters": {"binary_data": False, "classification": 0}}],
    }
    r = httpx.post(url, json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["id"] == "plain-1"
    assert answer["model_name"] == HISTORIES
    assert [o["name"] for o in answer["outputs"]] == ["probability"]
    (out,) = answer["outputs"]
    assert out["datatype"] == "FP32"
    assert out["shape"] == [12]
    assert np.array_equal(_bits(out["data"]), _bits(expected["probability"]))

    head: dict[str, Any] = {"inputs": [], "parameters": {"binary_data_output": True}}
    raw = b""
    for name, values in columns.items():
        if name == "user_id":
            chunk = b"".join(struct.pack("<I", len(u)) + u for u in values)
        else:
            chunk = values.astype("<f8" if name == "amount" else "<i8").tobytes()
        head["inputs"].append(
            {
                "name": name,
                "shape": list(values.shape),
                "datatype": _DATATYPES.get(name, "INT64"),
                "parameters": {"binary_data_size": len(chunk)},
            }
        )
        raw += chunk
    text = json.dumps(head).encode()
    r = httpx.post(url, content=text + raw, headers={"Inference-Header-Content-Length": str(len(text))})
    assert r.status_code == 200, r.text
    length = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in meta["outputs"]]
    assert [o["name"] for o in meta["outputs"]] == ["probability", "will_purchase"]
    assert sizes == [12 * 4, 12]
    probability = np.frombuffer(r.content[length : length + sizes[0]], dtype="<f4")
    assert np.array_equal(_bits(probability), _bits(expected["probability"]))
    will = np.frombuffer(r.content[length + sizes[0] :], dtype=np.bool_)
    assert will.tolist() == expected["will_purchase"]


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"]
    return str(body["error"])


@pytest.mark.parametrize(
    ("change", "status", "named"),
    [
        (lambda t: t[0].update(name="userid"), 422, "inputs[0].name"),
        (lambda t: t[3].update(datatype="FP32"), 422, "amount.datatype"),
        (lambda t: t[2].update(shape=[3]), 422, "timestamp.data: the shape says 3 values, got 2"),
        (lambda t: t[2].update(shape=[2, 1]), 422, "timestamp.shape"),
        (lambda t: t[2]["data"].__setitem__(1, 1.5), 422, "timestamp.data"),
        (lambda t: t[2]["data"].__setitem__(1, 99_999_999_999), 422, "timestamp[1]"),
        (lambda t: t[3]["data"].__setitem__(0, -1.0), 422, "amount[0]"),
        (lambda t: t[4]["data"].__setitem__(0, 0), 422, "quantity[0]"),
        (lambda t: t[1]["data"].__setitem__(1, 5), 422, "offsets"),
        (lambda t: t.pop(1), 422, "offsets: input required"),
        (lambda t: t[0]["data"].__setitem__(0, 7), 422, "user_id.data"),
        (lambda t: t[0]["data"].__setitem__(0, ""), 422, "user_id[0]"),
    ],
)
def test_bad_tensors_are_a_4xx_naming_the_tensor(
    server: ServiceProcess, change: Any, status: int, named: str
) -> None:
    columns = {
        "user_id": np.array([b"a", b"b"], dtype=np.object_),
        "offsets": np.array([0, 1, 2], dtype=np.int64),
        "timestamp": np.array([850_000_000, 860_000_000], dtype=np.int64),
        "amount": np.array([10.0, 20.0]),
        "quantity": np.array([1, 2], dtype=np.int64),
    }
    tensors = _json_tensors(columns)
    change(tensors)
    r = httpx.post(f"{server.url}/v2/models/{HISTORIES}/infer", json={"inputs": tensors})
    assert named in _error(r, status)


def test_other_refusals_are_the_protocols_error(server: ServiceProcess) -> None:
    url = f"{server.url}/v2/models/{HISTORIES}/infer"
    assert "no such model" in _error(httpx.post(f"{server.url}/v2/models/nope/infer", json={}), 404)
    assert "not valid JSON" in _error(
        httpx.post(url, content=b"{", headers={"content-type": "application/json"}), 400
    )
    assert "inputs" in _error(httpx.post(url, json={"inputs": []}), 422)
    bad_header = {"Inference-Header-Content-Length": "999999"}
    assert "Inference-Header-Content-Length" in _error(
        httpx.post(url, content=b"{}", headers=bad_header), 400
    )
    many = _json_tensors(_histories(6, MAX_USERS + 1))
    assert "user_id" in _error(httpx.post(url, json={"inputs": many}), 413)
    text = httpx.post(url, content=b"x", headers={"content-type": "text/plain"})
    assert _error(text, 415)
    wrong_size = {"name": "features", "shape": [1, 2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}
    features_url = f"{server.url}/v2/models/{FEATURES}/infer"
    assert "features.shape" in _error(httpx.post(features_url, json={"inputs": [wrong_size]}), 422)
    one = httpx.get(f"{server.url}/v2/models/{FEATURES}").json()["inputs"][0]["shape"]
    nan = {
        "name": "features",
        "shape": [1, *one[1:]],
        "datatype": "FP32",
        "data": [float("nan")] * (one[1] * one[2]),
    }
    r = httpx.post(
        features_url, content=json.dumps({"inputs": [nan]}), headers={"content-type": "application/json"}
    )
    assert "features.data" in _error(r, 422)


def test_v2_requests_are_counted_by_route_and_probes_not_logged(server: ServiceProcess) -> None:
    httpx.get(f"{server.url}/v2/health/ready")
    httpx.post(f"{server.url}/v2/models/{HISTORIES}/infer", json={"inputs": _json_tensors(_histories(7, 3))})
    scrape = httpx.get(f"{server.url}/metrics").text
    assert 'route="/v2/models/{name}/infer"' in scrape
    paths = {line.get("path") for line in server.log_lines()}
    assert "/v2/health/ready" not in paths
    assert f"/v2/models/{HISTORIES}/infer" in paths


def _queued(server: ServiceProcess) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("purchase_intent_batch_queue_duration_seconds_count"):
            return float(line.split()[-1])
    raise AssertionError("no queue histogram")


def test_concurrent_small_requests_share_the_micro_batcher_and_keep_their_answers(
    server: ServiceProcess,
) -> None:
    """Small V2 bodies arriving together are scored in shared micro-batches, as small /predict
    calls are; each still gets exactly its own users' float32."""
    requests = [_histories(100 + i, 3) for i in range(24)]
    expected = [_batch_answer(server, columns)["probability"] for columns in requests]
    before = _queued(server)
    url = f"{server.url}/v2/models/{HISTORIES}/infer"

    def send(columns: dict[str, NDArray[Any]]) -> list[float]:
        with httpx.Client(timeout=30) as c:
            outs = []
            for _ in range(5):
                r = c.post(url, json={"inputs": _json_tensors(columns)})
                assert r.status_code == 200, r.text
                outs.append(r.json()["outputs"][0]["data"])
            assert all(o == outs[0] for o in outs)
            return list(outs[0])

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(send, requests))
    for got, want in zip(answers, expected, strict=True):
        assert np.array_equal(_bits(got), _bits(want))
    assert _queued(server) > before
