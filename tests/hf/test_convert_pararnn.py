"""ParaRNN models <-> Hugging Face through remote code: `convert to-hf` writes a directory that
transformers loads with trust_remote_code in a process where undertow cannot be imported, whose
logits (ParaGRU, ParaLSTM, and a hybrid with attention and MLP layers; left padding too) equal our
forward's within 1e-4 and whose greedy text is ours; `from-hf` back is lossless."""


import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.hf.remote_load import (VOCAB, check_export_dir, exported_fixture, load_ours,  # noqa: E402,F401
                                  perturbed_checkpoint, spm_path)
from tests.models.helpers import greedy_by_full_forwards  # noqa: E402
from undertow.cli import main  # noqa: E402
from undertow.hf import HFConversionError  # noqa: E402
from undertow.models.pararnn.config import ParaRNNConfig  # noqa: E402
from undertow.models.pararnn.model import ParaRNNLM  # noqa: E402

SMALL = dict(vocab_size=VOCAB, d_model=16, chunk_size=4, multiple_of=16)
CASES = {
    "gru": dict(SMALL, layer_pattern="g-g", heads=2),
    "lstm-dense-untied": dict(SMALL, layer_pattern="l-", heads=1, expand=2, conv_width=3, conv_bias=False,
                              tie_embeddings=False),
    "hybrid": dict(SMALL, layer_pattern="g*l-", heads=4, attn_heads=4, attn_kv_heads=2, rope_theta=500.0),
}
IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
# what transformers computes from each exported directory (left padding: row 0's first 4 tokens)
LOAD = """
out["logits"] = model(ids).logits
mask = torch.ones_like(ids)
mask[0, :4] = 0
out["padded"] = model(ids, attention_mask=mask).logits
out["generated"] = model.generate(ids[:, :4], max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
"""


def make_checkpoint(root, spm_path: str, case: str) -> str:  # noqa: F811
    # away from the init: gate biases, stronger recurrences, norm weights
    return perturbed_checkpoint(root, spm_path, "pararnn", ParaRNNLM, ParaRNNConfig(**CASES[case]), noise=0.2)


def our_model(checkpoint: str) -> ParaRNNLM:
    return load_ours(checkpoint, ParaRNNLM)


exported = exported_fixture(CASES, make_checkpoint, LOAD, IDS)  # every case exported and loaded


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_without_undertow_with_same_logits_and_greedy_text(exported, case):
    checkpoints, dirs, results = exported
    out, theirs = dirs[case], results[case]
    check_export_dir(out, theirs, "undertow_pararnn", "UndertowParaRNNForCausalLM")
    ours = our_model(checkpoints[case])
    with torch.no_grad():
        logits = ours(IDS)
        assert (theirs["logits"] - logits).abs().max().item() <= 1e-4
        # left padding: the padded row's real tokens are the row without its first 4 tokens
        assert (theirs["padded"][0, 4:] - ours(IDS[:1, 4:])[0]).abs().max().item() <= 1e-4
        assert (theirs["padded"][1] - logits[1]).abs().max().item() <= 1e-4
    assert torch.equal(theirs["generated"], greedy_by_full_forwards(ours, IDS[:, :4], 6))
    assert torch.equal(theirs["generated"], ours.generate(IDS[:, :4], 6))  # our cell-step decoding too


def test_round_trip_to_hf_from_hf_is_lossless(tmp_path, spm_path):  # noqa: F811
    for case in ("hybrid", "lstm-dense-untied"):
        ckpt = make_checkpoint(tmp_path / case / "ckpt", spm_path, case)
        assert main(["convert", "to-hf", ckpt, str(tmp_path / case / "hf")]) == 0
        assert main(["convert", "from-hf", str(tmp_path / case / "hf"), str(tmp_path / case / "back")]) == 0
        before, after = our_model(ckpt), our_model(str(tmp_path / case / "back"))
        assert before.cfg == after.cfg
        assert before.state_dict().keys() == after.state_dict().keys()
        for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
            assert torch.equal(a, b), name
        assert (after.lm_head.weight is after.embed.weight) == after.cfg.tie_embeddings


def test_a_hand_edited_config_is_refused():
    from undertow.models.pararnn import hf

    cfg = ParaRNNConfig(**CASES["gru"])
    config, tensors = hf.to_hf(cfg, ParaRNNLM(cfg).state_dict(), {})
    config.update(model_type="undertow_pararnn", layer_pattern="l-l")
    with pytest.raises(HFConversionError, match="layer_pattern"):
        hf.from_hf(config, tensors)
    with pytest.raises(HFConversionError, match="no undertow pararnn config"):
        hf.from_hf({"model_type": "undertow_pararnn"}, tensors)
