"""MoE transformers with the RMoE router <-> Hugging Face through remote code: `convert to-hf` writes
a directory that transformers loads with trust_remote_code in a process where undertow cannot be
imported (`python -I -S`), with the same logits (float32, 1e-4) and greedy text; `from-hf` back is
lossless."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from tests.hf.remote_load import check_export_dir, exported_fixture  # noqa: E402
from tests.hf.test_convert_moe import VOCAB, make_checkpoint, our_model, spm_path  # noqa: E402,F401
from tests.models.helpers import greedy_by_full_forwards  # noqa: E402
from undertow.cli import main  # noqa: E402
from undertow.hf.export import read_checkpoint  # noqa: E402

# 5 experts top-2 of width 24, GRU width 8 (grouped-query attention, perturbed weights: test_convert_moe)
CASES = {
    "untied": dict(router="rmoe", router_dim=8),
    "tied-shared-expert": dict(router="rmoe", router_dim=6, shared_expert_hidden=16, top_k=3),
}
IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
BODY = """
out["logits"] = model(ids).logits
out["generated"] = model.generate(ids[:, :4], max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
"""


# every case exported and loaded; the "tied-" cases tie the embeddings (test_convert_moe.make_checkpoint)
exported = exported_fixture(CASES, lambda root, spm, case: make_checkpoint(root, spm, tie=case.startswith("tied"),
                                                                           **CASES[case]), BODY, IDS)


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_without_undertow_with_same_logits_and_greedy_text(exported, case):
    checkpoints, dirs, results = exported
    out, theirs = dirs[case], results[case]
    check_export_dir(out, theirs, "undertow_rmoe", "UndertowRMoEForCausalLM")
    ours = our_model(checkpoints[case])
    with torch.no_grad():
        assert (theirs["logits"] - ours(IDS)).abs().max().item() <= 1e-4
    assert torch.equal(theirs["generated"], greedy_by_full_forwards(ours, IDS[:, :4], 6))


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_to_hf_from_hf_is_lossless(exported, tmp_path, case):
    checkpoints, dirs, _ = exported
    assert main(["convert", "from-hf", dirs[case], str(tmp_path / "back")]) == 0
    _, family, cfg = read_checkpoint(str(tmp_path / "back"))
    assert family == "transformer" and cfg == read_checkpoint(checkpoints[case])[2]
    before, after = our_model(checkpoints[case]), our_model(str(tmp_path / "back"))
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if cfg.tie_embeddings:
        assert after.lm_head.weight is after.embed.weight


def test_edited_config_is_refused(exported, tmp_path, capsys):
    _, dirs, _ = exported
    config = json.load(open(os.path.join(dirs["untied"], "config.json")))
    config["router_dim"] = 16
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in os.listdir(dirs["untied"]):
        if name != "config.json":
            os.symlink(os.path.join(dirs["untied"], name), edited / name)
    (edited / "config.json").write_text(json.dumps(config))
    assert main(["convert", "from-hf", str(edited), str(tmp_path / "back")]) == 2
    assert "router_dim" in capsys.readouterr().err
