import os

import pytest
import torch

from undertow.pretrain import checkpoint as ckpt


def model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def test_roundtrip_restores_model_optimizer_and_meta(tmp_path):
    model, opt = model_and_optimizer(0)
    path = ckpt.save_checkpoint(str(tmp_path), 7, model, opt, {"loader": {"pos": 3}}, keep_last=2)
    other, other_opt = model_and_optimizer(1)
    meta = ckpt.load_checkpoint(path, other, other_opt)
    assert meta["step"] == 7 and meta["loader"] == {"pos": 3}
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for key in sa:
        assert torch.equal(sa[key]["exp_avg"], sb[key]["exp_avg"])
        assert torch.equal(sa[key]["exp_avg_sq"], sb[key]["exp_avg_sq"])


def test_keep_last_prunes_older(tmp_path):
    model, opt = model_and_optimizer(0)
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(str(tmp_path), step, model, opt, {}, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [3, 4]
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000004")


def test_crash_mid_save_leaves_last_good_checkpoint(tmp_path, monkeypatch):
    model, opt = model_and_optimizer(0)
    good = ckpt.save_checkpoint(str(tmp_path), 1, model, opt, {"tag": "good"}, keep_last=1)
    real_save = ckpt.dcp.save

    def crash_after_writing(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # tensors are on disk, meta.json and rename are not
        raise OSError("simulated crash mid-save")

    monkeypatch.setattr(ckpt.dcp, "save", crash_after_writing)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(str(tmp_path), 2, model, opt, {"tag": "bad"}, keep_last=1)
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))  # a failed save cleans up after itself
    assert ckpt.latest_checkpoint(str(tmp_path)) == good
    fresh, fresh_opt = model_and_optimizer(0)
    meta = ckpt.load_checkpoint(good, fresh, fresh_opt)
    assert meta["tag"] == "good"
    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    # The next save succeeds over a stale temporary directory (what a killed process leaves).
    os.makedirs(tmp_path / ".step_00000002.tmp")
    (tmp_path / ".step_00000002.tmp" / "__0_0.distcp").write_bytes(b"half-written")
    ckpt.save_checkpoint(str(tmp_path), 2, model, opt, {"tag": "retry"}, keep_last=1)
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000002")


def test_incomplete_directory_is_not_a_checkpoint(tmp_path):
    os.makedirs(tmp_path / "step_00000009")
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    model, opt = model_and_optimizer(0)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(str(tmp_path / "step_00000009"), model, opt)
