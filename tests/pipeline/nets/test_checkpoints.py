"""pipeline/nets/checkpoints.py: checkpoint wrappers come off, and every error names the file and keys."""

from __future__ import annotations

import pytest
import torch

from pipeline.nets.checkpoints import WeightsError, check_state_dict, torch_load, unwrap_state_dict


def test_unwrap_takes_off_the_common_wrappers():
    state = {"w": torch.ones(2), "b": torch.zeros(1)}
    for wrapped in (state, {"state_dict": state, "epoch": 3}, {"model_state": state}, {"model": state},
                    {"state_dict": {f"module.{k}": v for k, v in state.items()}}):
        assert unwrap_state_dict(wrapped, "f.pt") == state
    with pytest.raises(WeightsError, match="f.pt: expected a state dict of tensors, got list"):
        unwrap_state_dict([1, 2], "f.pt")
    with pytest.raises(WeightsError, match="f.pt: expected a state dict of tensors"):
        unwrap_state_dict({"w": torch.ones(1), "epoch": 3}, "f.pt")


def test_check_state_dict_names_the_file_and_every_kind_of_mismatch():
    model = torch.nn.Linear(3, 2)
    good = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
    check_state_dict(model, good, "ok.pt")
    assert torch.equal(model.weight, torch.ones(2, 3))
    with pytest.raises(WeightsError, match=r"bad.pt: does not fit Linear: missing keys \[bias\] \(1\); "
                                           r"unexpected keys \[extra\] \(1\); shape mismatch \[weight: file \(3, 3\)"):
        check_state_dict(model, {"weight": torch.ones(3, 3), "extra": torch.ones(1)}, "bad.pt")
    check_state_dict(model, {"weight": torch.full((2, 3), 2.0)}, "part.pt", strict=False)
    assert model.weight[0, 0] == 2.0


def test_torch_load_reads_on_the_cpu_and_names_a_bad_file(tmp_path):
    torch.save({"w": torch.arange(3)}, tmp_path / "w.pt")
    assert torch.equal(torch_load(str(tmp_path / "w.pt"))["w"], torch.arange(3))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="junk.pt: not a readable torch checkpoint"):
        torch_load(str(tmp_path / "junk.pt"))
