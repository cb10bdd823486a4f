import pytest
import torch

from voxgrid import tensors
from voxgrid.strategies import ClientUpdate, FedAvg, apply_delta, weighted_delta


def _u(node, delta, samples):
    return ClientUpdate(node=node, dataset="d", delta=delta, samples=samples)


def test_fedavg_weights_by_samples_hand_computed():
    g = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5, dtype=torch.int64)}
    ups = [_u("a", {"w": torch.tensor([1.0, 0.0]), "n": torch.tensor(1.0)}, 1),
           _u("b", {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3.0)}, 3)]
    new = FedAvg().aggregate(g, ups)
    # (1*[1,0] + 3*[0,4]) / 4 = [0.25, 3]
    assert torch.allclose(new["w"], torch.tensor([1.25, 5.0]))
    assert new["w"].dtype == torch.float32
    assert new["n"].dtype == torch.int64 and int(new["n"]) == 8  # 5 + (1 + 9)/4 = 7.5, rounded half to even


def test_fedavg_zero_samples_falls_back_to_equal_weights():
    g = {"w": torch.zeros(2)}
    ups = [_u("a", {"w": torch.ones(2)}, 0), _u("b", {"w": 3 * torch.ones(2)}, 0)]
    assert torch.allclose(FedAvg().aggregate(g, ups)["w"], torch.full((2,), 2.0))


def test_weighted_delta_refuses_empty_and_nonpositive():
    with pytest.raises(ValueError, match="zero updates"):
        weighted_delta([], [])
    with pytest.raises(ValueError, match="positive"):
        weighted_delta([_u("a", {"w": torch.ones(1)}, 1)], [0.0])


def test_apply_delta_keeps_dtypes():
    g = {"h": torch.ones(2, dtype=torch.float16)}
    out = apply_delta(g, {"h": torch.full((2,), 0.5, dtype=torch.float64)})
    assert out["h"].dtype == torch.float16 and torch.allclose(out["h"].float(), torch.full((2,), 1.5))


def test_tensors_roundtrip_and_errors():
    state = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    blob = tensors.dumps(state, metadata={"k": "v"})
    back = tensors.loads(blob)
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["b"], state["b"])
    assert len(tensors.digest(blob)) == 64
    with pytest.raises(tensors.TensorsError, match="not a valid safetensors"):
        tensors.loads(b"\x80\x04K\x01.")  # a pickle, refused
    with pytest.raises(tensors.TensorsError, match="missing"):
        tensors.check_compatible(state, {"a": state["a"]})
    with pytest.raises(tensors.TensorsError, match="shape"):
        tensors.check_compatible(state, {"a": torch.zeros(4, 3), "b": state["b"]})
