"""The served graph: ``FusedEnsemble`` computes what the trained ``Ensemble`` computes, in fewer nodes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from numpy.typing import NDArray

from model_export.config import TrainConfig
from model_export.export import PARITY_TOLERANCE, parity, to_onnx
from model_export.model import CLN, CLNConfig, Ensemble, FusedEnsemble
from tests.conftest import TinyModel

T, C = 12, 3


def _ensemble(
    n_members: int,
    *,
    conv_layers: int = 2,
    pool_last: bool = True,
    shared_norm: bool = True,
    wide: bool = False,
) -> Ensemble:
    """Randomly initialised members, normalised as training does (or each its own way)."""
    torch.manual_seed(n_members * 10 + conv_layers)
    cfg = CLNConfig(
        n_channels=C,
        lookback_bins=T,
        conv_channels=4,
        conv_layers=conv_layers,
        hidden=8,
        pool_last=pool_last,
        wide=wide,
    )
    members = [CLN(cfg) for _ in range(n_members)]
    mean, std = torch.randn(C), torch.rand(C) + 0.5
    for i, m in enumerate(members):
        shift = 0.0 if shared_norm else 0.1 * i
        m.set_normalisation(mean + shift, std + shift)
    return Ensemble(members).eval()


def _inputs(batch: int = 64) -> NDArray[np.float32]:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((batch, T, C)) * 2.0).astype(np.float32)
    x[:4] = 0.0  # flat histories: every feature map constant, the correlation's epsilon decides
    x[4:8] = 50.0
    return x


def _torch_diff(ensemble: Ensemble, x: NDArray[np.float32]) -> float:
    with torch.no_grad():
        want = ensemble(torch.from_numpy(x)).numpy()
        got = FusedEnsemble(ensemble).eval()(torch.from_numpy(x)).numpy()
    return float(np.max(np.abs(got.astype(np.float64) - want)))


@pytest.mark.parametrize("n_members", [1, 3])
@pytest.mark.parametrize("conv_layers", [1, 2])
@pytest.mark.parametrize("pool_last", [True, False])
def test_fused_equals_the_ensemble_in_torch(n_members: int, conv_layers: int, pool_last: bool) -> None:
    ensemble = _ensemble(n_members, conv_layers=conv_layers, pool_last=pool_last)
    assert _torch_diff(ensemble, _inputs()) <= 1e-6


@pytest.mark.parametrize("shared_norm", [True, False])
def test_the_wide_term_fuses(shared_norm: bool) -> None:
    ensemble = _ensemble(3, shared_norm=shared_norm, wide=True)
    assert _torch_diff(ensemble, _inputs()) <= 1e-6
    x = _inputs()
    proto = to_onnx(FusedEnsemble(ensemble), x[:4], TrainConfig.opset)
    for batch in (1, 64):
        assert parity(ensemble, proto, x[:batch]) <= PARITY_TOLERANCE


def test_members_with_their_own_normalisation_still_fuse() -> None:
    ensemble = _ensemble(3, shared_norm=False)
    assert FusedEnsemble(ensemble).n_copies == 3
    assert _torch_diff(ensemble, _inputs()) <= 1e-6


@pytest.mark.parametrize(
    ("n_members", "conv_layers", "pool_last", "shared_norm"),
    [(3, 2, True, True), (1, 1, False, True), (3, 1, True, False)],
)
def test_exported_fused_graph_matches_the_ensemble(
    n_members: int, conv_layers: int, pool_last: bool, shared_norm: bool
) -> None:
    ensemble = _ensemble(n_members, conv_layers=conv_layers, pool_last=pool_last, shared_norm=shared_norm)
    x = _inputs()
    proto = to_onnx(FusedEnsemble(ensemble), x[:4], TrainConfig.opset)
    onnx.checker.check_model(proto, full_check=True)
    # against the original ensemble, on the batch sizes the service sends
    for batch in (1, 5, 64):
        assert parity(ensemble, proto, x[:batch]) <= PARITY_TOLERANCE


def _node_count(proto: onnx.ModelProto) -> int:
    return len(proto.graph.node)


def test_fused_graph_does_not_grow_with_the_members() -> None:
    x = _inputs()
    one = to_onnx(FusedEnsemble(_ensemble(1)), x[:4], TrainConfig.opset)
    three = to_onnx(FusedEnsemble(_ensemble(3)), x[:4], TrainConfig.opset)
    assert _node_count(three) == _node_count(one)


@pytest.mark.slow
def test_the_exported_file_is_the_fused_graph(tiny_model_dir: TinyModel) -> None:
    """The CLI ships the fused form: fewer nodes than the same checkpoint exported member by member."""
    ckpt = torch.load(tiny_model_dir.dir / "checkpoint.pt", weights_only=False)
    cfg = CLNConfig(**ckpt["cln_config"])
    ensemble = Ensemble([CLN(cfg) for _ in range(ckpt["metadata"]["n_seeds"])])
    ensemble.load_state_dict(ckpt["state_dict"])
    shipped = onnx.load(str(tiny_model_dir.model))
    x = np.zeros((4, cfg.lookback_bins, cfg.n_channels), dtype=np.float32)
    opset = {o.domain: o.version for o in shipped.opset_import}[""]
    by_member = to_onnx(ensemble, x, opset)
    assert _node_count(shipped) < _node_count(by_member) / 2
    assert not any(n.op_type == "Erf" for n in shipped.graph.node), "GELU should be one Gelu node"


def test_members_that_differ_in_shape_are_refused() -> None:
    a = CLN(CLNConfig(n_channels=C, lookback_bins=T, conv_channels=4))
    b = CLN(CLNConfig(n_channels=C, lookback_bins=T, conv_channels=6))
    with pytest.raises(ValueError, match="different hyper-parameters"):
        FusedEnsemble(Ensemble([a, b]))
