"""xLSTM <-> transformers' xLSTMForCausalLM (its native code path): to-hf gives the same logits and
greedy text; from-hf back is lossless, also for a transformers-initialized model, its fused weight
layout and older weight names; what transformers cannot compute is refused."""

import dataclasses
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from undertow.cli import main  # noqa: E402
from undertow.data_prep.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from undertow.hf.export import read_checkpoint  # noqa: E402
from undertow.models.xlstm.config import XLSTMConfig  # noqa: E402
from undertow.models.xlstm.model import XLSTMLM  # noqa: E402
from undertow.pretrain.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from undertow.pretrain.config import build_config  # noqa: E402

from ..data_prep.conftest import make_texts  # noqa: E402

VOCAB = 300
# q/k 128 * 0.5 = 64 and v 128 channels (multiples of 64, as transformers' cache needs), 2 heads
TINY = dict(vocab_size=VOCAB, d_model=128, n_layers=2, n_heads=2, chunk_size=8, ffn_proj_factor=1.0)
HF_TINY = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_heads=2, chunk_size=8,
               ffn_proj_factor=1.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(make_texts(300, seed=1), path, vocab_size=VOCAB)
    return path


def make_checkpoint(root, spm_path: str, **extra) -> str:
    """A trainer-format checkpoint of a tiny model whose weights are all away from their init (gates
    included), so every tensor's mapping shows in the logits."""
    torch.manual_seed(0)
    model_cfg = XLSTMConfig(**{**TINY, **extra})
    model = XLSTMLM(model_cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = build_config({"name": "t", "model": {"family": "xlstm", **dataclasses.asdict(model_cfg)}})
    meta = {"config": cfg.to_dict(), "tokenizer": Tokenizer.load(spm_path).describe(os.path.abspath(spm_path))}
    return save_checkpoint(str(root), 7, model, torch.optim.AdamW(model.parameters()), meta, keep_last=1)


def our_model(checkpoint: str) -> XLSTMLM:
    _, _, model_cfg = read_checkpoint(checkpoint)
    model = XLSTMLM(model_cfg)
    load_checkpoint(checkpoint, model, None)
    return model.eval()


def max_diff(ours, theirs, ids) -> float:
    with torch.no_grad():
        return (theirs(ids).logits - ours(ids)).abs().max().item()


@pytest.mark.parametrize("extra", [{}, dict(tie_embeddings=True, logit_soft_cap=5.0)], ids=["untied", "tied-cap5"])
def test_export_loads_in_transformers_with_same_logits_and_generations(tmp_path, spm_path, extra):
    ckpt = make_checkpoint(tmp_path / "ckpt", spm_path, **extra)
    out = str(tmp_path / "hf")
    assert main(["convert", "to-hf", ckpt, out]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "xLSTMForCausalLM"
    ours = our_model(ckpt)
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))  # 2 chunks + 5
    assert max_diff(ours, hf, ids) <= 1e-4

    prompt = ids[:, :4]
    want = ours.generate(prompt, max_new_tokens=8)
    got = hf.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_round_trip_to_hf_from_hf_is_lossless(tmp_path, spm_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", spm_path, init_std=0.03, igate_bias_init=-8.0)
    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    assert main(["convert", "to-hf", ckpt, hf_dir]) == 0
    assert main(["convert", "from-hf", hf_dir, back]) == 0
    meta, family, model_cfg = read_checkpoint(back)
    _, _, original_cfg = read_checkpoint(ckpt)
    assert family == "xlstm" and model_cfg == original_cfg  # init settings too (the stored config)
    a, b = our_model(ckpt).state_dict(), our_model(back).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _save_transformers_model(path, **config) -> "transformers.PreTrainedModel":
    torch.manual_seed(0)
    model = transformers.xLSTMForCausalLM(transformers.xLSTMConfig(**{**HF_TINY, **config})).eval()
    with torch.no_grad():  # transformers' init zeroes the gates' weights: move them so they count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return model


def test_import_of_a_transformers_initialized_model(tmp_path):
    hf = _save_transformers_model(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = our_model(str(tmp_path / "ours"))
    assert ours.cfg.hidden == 128 and not ours.cfg.tie_embeddings
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(2))
    assert max_diff(ours, hf, ids) <= 1e-4


def test_import_of_the_fused_weight_layout(tmp_path):
    """weight_mode "fused" (qkv_opreact = [q; k; v; o], ifgate_preact = [i; f], proj_up_gate_z =
    [gate; up], split in that order by transformers' forward). transformers 5.25 cannot build a fused
    model itself (its _init_weights fails on the fused gate bias), so the file is the single model's
    tensors fused by hand, and the single model is the oracle."""
    from safetensors.torch import load_file, save_file

    hf = _save_transformers_model(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    for i in range(HF_TINY["num_hidden_layers"]):
        block = f"backbone.blocks.{i}."
        for fused, parts in (("mlstm_layer.qkv_opreact.weight", ("q", "k", "v", "ogate_preact")),
                             ("mlstm_layer.ifgate_preact.weight", ("igate_preact", "fgate_preact")),
                             ("mlstm_layer.ifgate_preact.bias", ("igate_preact", "fgate_preact"))):
            param = fused.rsplit(".", 1)[1]
            tensors[block + fused] = torch.cat([tensors.pop(f"{block}mlstm_layer.{p}.{param}") for p in parts])
        tensors[block + "ffn.proj_up_gate_z.weight"] = torch.cat(
            [tensors.pop(block + "ffn.proj_up_gate.weight"), tensors.pop(block + "ffn.proj_up.weight")])
    save_file(tensors, str(path), metadata={"format": "pt"})
    config_path = tmp_path / "hf" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "weight_mode": "fused"}))
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(2))
    assert max_diff(our_model(str(tmp_path / "ours")), hf, ids) <= 1e-4


def test_import_reads_older_transformers_weight_names(tmp_path):
    """Older transformers called the mLSTM's projections query/key/value: found by what is present."""
    from safetensors.torch import load_file, save_file

    from undertow.models.xlstm.hf import installed_block_names

    assert installed_block_names()["mlstm.q"] == "mlstm_layer.q"  # what transformers 5.x builds
    hf = _save_transformers_model(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    old = {k.replace("mlstm_layer.q.", "mlstm_layer.query.").replace("mlstm_layer.k.", "mlstm_layer.key.")
           .replace("mlstm_layer.v.", "mlstm_layer.value."): v for k, v in load_file(str(path)).items()}
    assert any(".query." in k for k in old)
    save_file(old, str(path), metadata={"format": "pt"})
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    assert max_diff(our_model(str(tmp_path / "ours")), hf, ids) <= 1e-4


@pytest.mark.parametrize("extra, reason", [
    (dict(d_model=64, n_heads=2), "qk_dim = 32: transformers' xLSTM sizes its recurrent cache"),
    (dict(logit_soft_cap=0.0), "logit_soft_cap = 0 (no cap)"),
    (dict(gate_soft_cap=0.0), "gate_soft_cap = 0 (no cap)"),
])
def test_models_transformers_cannot_compute_are_refused(tmp_path, spm_path, capsys, extra, reason):
    ckpt = make_checkpoint(tmp_path / "ckpt", spm_path, **extra)
    assert main(["convert", "to-hf", ckpt, str(tmp_path / "hf")]) == 2
    assert reason in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("change, reason", [
    (dict(add_out_norm=False), "add_out_norm = false"),
    (dict(use_bias=True), "use_bias = true"),
    (dict(num_heads=3), "model.n_heads = 3 is invalid: must divide qk_dim = 64 and v_dim = 128"),
])
def test_imports_undertow_cannot_compute_are_refused(tmp_path, capsys, change, reason):
    _save_transformers_model(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 2
    assert reason in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "ours")
