"""to-hf -> stock transformers -> same logits and greedy text; from-hf round trip; refusals; help."""

import dataclasses
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from undertow.cli import main  # noqa: E402
from undertow.data_prep.tokenizer import train_tokenizer  # noqa: E402
from undertow.hf.export import read_checkpoint  # noqa: E402
from undertow.models.mamba.config import MambaConfig  # noqa: E402
from undertow.models.mamba.model import MambaLM  # noqa: E402
from undertow.pretrain.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from undertow.pretrain.checkpoint_manifest import MANIFEST_NAME, verify_checkpoint  # noqa: E402
from undertow.pretrain.config import build_config  # noqa: E402

from ..data_prep.conftest import make_texts  # noqa: E402

VOCAB = 300
TINY = dict(vocab_size=VOCAB, d_model=32, d_state=8, headdim=8, n_heads=4, chunk_size=8, init_std=0.2)
CASES = {  # id: (layer_pattern, extra config, transformers class)
    "mamba": ("mmm", {}, "MambaForCausalLM"),
    "falcon-untied-bias": ("mm", dict(falcon_norm=True, mixer_norm_eps=0.1, tie_embeddings=False, proj_bias=True),
                           "FalconMambaForCausalLM"),
    "mamba2": ("MMM", dict(dt_rank=3), "Mamba2ForCausalLM"),
    "bamba-hybrid-gqa": ("M-*-M-", dict(n_kv_heads=2, ffn_hidden=48, conv_bias=False), "BambaForCausalLM"),
    "bamba-attention-only": ("*-", dict(headdim=48), "BambaForCausalLM"),  # headdim unused, need not divide
}


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(make_texts(300, seed=1), path, vocab_size=VOCAB)
    return path


def make_checkpoint(root, spm_path: str, pattern: str, **extra) -> str:
    """A trainer-format checkpoint (with optimizer state) of a tiny random model; returns its directory."""
    torch.manual_seed(0)
    model_cfg = MambaConfig(layer_pattern=pattern, **{**TINY, **extra})
    model = MambaLM(model_cfg)
    model.init_weights()
    cfg = build_config({"name": "t", "model": {"family": "mamba", **dataclasses.asdict(model_cfg)}})
    from undertow.data_prep.tokenizer import Tokenizer

    meta = {"config": cfg.to_dict(), "tokenizer": Tokenizer.load(spm_path).describe(os.path.abspath(spm_path))}
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(str(root), 7, model, optimizer, meta, keep_last=1)


def our_model(checkpoint: str) -> MambaLM:
    _, _, model_cfg = read_checkpoint(checkpoint)
    model = MambaLM(model_cfg)
    load_checkpoint(checkpoint, model, None)
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_with_same_logits_and_generations(tmp_path, spm_path, case):
    pattern, extra, arch = CASES[case]
    ckpt = make_checkpoint(tmp_path / "ckpt", spm_path, pattern, **extra)
    out = str(tmp_path / "hf")
    assert main(["convert", "to-hf", ckpt, out]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch
    ours = our_model(ckpt)

    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4

    prompt = ids[:, :4]
    want = ours.generate(prompt, max_new_tokens=8)
    got = hf.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_round_trip_to_hf_from_hf_is_lossless(tmp_path, spm_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", spm_path, "M-*-M-", n_kv_heads=2, proj_bias=True)
    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), hf_dir]) == 0  # a checkpoint root: its newest
    assert main(["convert", "from-hf", hf_dir, back]) == 0

    meta, family, model_cfg = read_checkpoint(back)
    original_meta, _, original_cfg = read_checkpoint(ckpt)
    assert meta["step"] == 0 and family == "mamba" and model_cfg == original_cfg
    assert meta["config"]["model"] == original_meta["config"]["model"]
    assert build_config(meta["config"]).model == original_cfg  # an ExperimentConfig dict
    entry = meta["tokenizer"]
    assert entry["file"] == "tokenizer.model" and os.path.isfile(os.path.join(back, entry["file"]))
    assert entry["sha256"] == original_meta["tokenizer"]["sha256"]
    verify_checkpoint(back, "sha256")  # the import wrote its manifest: init_from verifies it
    assert os.path.isfile(os.path.join(back, MANIFEST_NAME))

    a, b = our_model(ckpt).state_dict(), our_model(back).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name

    # and the imported checkpoint exports to the same files again
    again = str(tmp_path / "again")
    assert main(["convert", "to-hf", back, again]) == 0
    from safetensors.torch import load_file

    first, second = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(again, "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    half = str(tmp_path / "bf16")
    assert main(["convert", "to-hf", back, half, "--dtype", "bfloat16"]) == 0
    assert json.loads(open(os.path.join(half, "config.json")).read())["dtype"] == "bfloat16"
    third = load_file(os.path.join(half, "model.safetensors"))
    assert all(torch.equal(third[k], first[k].to(torch.bfloat16)) for k in first)


@pytest.mark.parametrize("pattern, reason", [
    ("mM", "mixes Mamba-1"),
    ("M*-", "followed by one SwiGLU MLP"),
    ("M--", "followed by one SwiGLU MLP"),
    ("-M", "followed by one SwiGLU MLP"),
])
def test_patterns_without_a_transformers_class_are_refused(tmp_path, spm_path, capsys, pattern, reason):
    ckpt = make_checkpoint(tmp_path / "ckpt", spm_path, pattern)
    assert main(["convert", "to-hf", ckpt, str(tmp_path / "hf")]) == 2
    assert reason in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("extra, reason", [
    (dict(mlp="gelu"), "mlp = 'gelu': BambaForCausalLM's MLP is gated"),
    (dict(position_embedding="none"), "position_embedding = 'none': BambaForCausalLM always rotates"),
])
def test_hybrids_bamba_cannot_compute_are_refused(tmp_path, spm_path, capsys, extra, reason):
    ckpt = make_checkpoint(tmp_path / "ckpt", spm_path, "M-*-", **extra)
    assert main(["convert", "to-hf", ckpt, str(tmp_path / "hf")]) == 2
    assert reason in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf")


def test_settings_of_absent_layer_kinds_do_not_block_export():
    from undertow.models.mamba.hf import hf_architecture

    assert hf_architecture(MambaConfig(layer_pattern="MM", mlp="gelu", position_embedding="none")) == "Mamba2ForCausalLM"
    assert hf_architecture(MambaConfig(layer_pattern="M-M-", position_embedding="none")) == "BambaForCausalLM"


def test_ngroups_refused_when_transformers_ignores_groups(tmp_path, spm_path, capsys, monkeypatch):
    from undertow.models.mamba import hf

    ckpt = make_checkpoint(tmp_path / "ckpt", spm_path, "MM", ngroups=2)
    monkeypatch.setattr(hf, "_hf_gated_norm_uses_groups", lambda model_type: False)
    assert main(["convert", "to-hf", ckpt, str(tmp_path / "hf")]) == 2
    assert "ngroups = 2" in capsys.readouterr().err
    monkeypatch.undo()  # the installed transformers normalizes per group: the export is exact
    assert main(["convert", "to-hf", ckpt, str(tmp_path / "hf")]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf_model(ids).logits - our_model(ckpt)(ids)).abs().max().item() <= 1e-4


def _whole_width_gated_norm(self, hidden_states, gate=None):
    """The older transformers' Mamba-2 gated RMSNorm: silu-gated, then one RMS over all of d_inner."""
    h = hidden_states.float()
    if gate is not None:
        h = h * torch.nn.functional.silu(gate.float())
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return (self.weight * h).to(hidden_states.dtype)


@pytest.mark.parametrize("model_type, config", [
    ("mamba2", dict(hidden_size=32, num_heads=4, head_dim=16, n_groups=2, state_size=8, num_hidden_layers=1)),
    ("bamba", dict(hidden_size=32, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
                   num_hidden_layers=1, intermediate_size=32, num_attention_heads=4, attn_layer_indices=[]))])
def test_grouped_norm_probe_measures_the_installed_transformers(monkeypatch, model_type, config):
    """The probe answers by running transformers, not by a class name: True for today's per-group norm,
    False once the norm of the same classes normalizes over the whole width (older transformers)."""
    from undertow.models.mamba import hf

    hf._hf_gated_norm_uses_groups.cache_clear()
    assert hf._hf_gated_norm_uses_groups(model_type)
    # the gated norm found by what it is: the mixer's only 1-D weight as wide as d_inner (64)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **config))
    norms = {type(m) for m in model.modules()
             if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.shape == (64,)
             and m is not getattr(model, "lm_head", None)}
    assert len(norms) == 1, norms
    monkeypatch.setattr(norms.pop(), "forward", _whole_width_gated_norm)
    hf._hf_gated_norm_uses_groups.cache_clear()
    try:
        assert not hf._hf_gated_norm_uses_groups(model_type)
    finally:
        hf._hf_gated_norm_uses_groups.cache_clear()


def test_import_errors_are_one_line(tmp_path, spm_path, capsys):
    assert main(["convert", "from-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["convert", "from-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "'llama' cannot be imported" in capsys.readouterr().err
    ckpt = make_checkpoint(tmp_path / "ckpt", spm_path, "mm")
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "x").write_text("")
    assert main(["convert", "to-hf", ckpt, str(tmp_path / "full")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    other = str(tmp_path / "other.model")
    train_tokenizer(make_texts(100, seed=5), other, vocab_size=VOCAB)
    assert main(["convert", "to-hf", ckpt, str(tmp_path / "hf"), "--tokenizer", other]) == 2
    assert "not the one the checkpoint was trained with" in capsys.readouterr().err


def test_help_texts(capsys):
    for argv, words in ((["convert", "--help"], ["to-hf", "from-hf"]),
                        (["convert", "to-hf", "--help"], ["MambaForCausalLM", "Mamba2ForCausalLM", "BambaForCausalLM", "xLSTMForCausalLM",
                                                          "--dtype", "--tokenizer"]),
                        (["convert", "from-hf", "--help"], ["init_from", "bamba", "xlstm", "safetensors"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert all(w in out for w in words), (argv, out)


FOREIGN = {  # transformers configs saved by transformers itself: no undertow entry, no tokenizer.model
    "mamba": dict(hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, time_step_rank=4),
    "mamba2": dict(hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, num_heads=8, head_dim=8, n_groups=2,
                   chunk_size=8),
}


@pytest.mark.parametrize("model_type", list(FOREIGN))
def test_import_a_model_saved_by_transformers(tmp_path, model_type):
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, **FOREIGN[model_type])
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    hf_model.save_pretrained(str(tmp_path / "hf"))
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    meta, _, model_cfg = read_checkpoint(str(tmp_path / "ckpt"))
    assert meta["tokenizer"] is None and model_cfg.vocab_size == VOCAB
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf_model(ids).logits - our_model(str(tmp_path / "ckpt"))(ids)).abs().max().item() <= 1e-4


def test_bamba_with_partial_rotary_is_refused(tmp_path, capsys):
    config = transformers.BambaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, attn_layer_indices=[1],
                                      mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "hf"))
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 2
    assert "partial_rotary_factor 1.0" in capsys.readouterr().err


def test_tokenizer_found_beside_the_checkpoint_or_in_a_data_source(tmp_path, spm_path):
    import shutil

    from undertow.data_prep.tokenizer import Tokenizer
    from undertow.hf.export import find_tokenizer

    shards, ckpt = tmp_path / "shards", tmp_path / "ckpt"
    shards.mkdir()
    ckpt.mkdir()
    shutil.copyfile(spm_path, shards / "tokenizer.model")
    meta = {"tokenizer": Tokenizer.load(spm_path).describe("tokenizer.model"),
            "config": {"data": {"sources": [str(shards)]}}}
    assert find_tokenizer(str(ckpt), meta) == str(shards / "tokenizer.model")  # as the trainer records it
    shutil.copyfile(spm_path, ckpt / "tokenizer.model")
    assert find_tokenizer(str(ckpt), meta) == str(ckpt / "tokenizer.model")  # as from-hf writes it
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        find_tokenizer(str(ckpt), {"tokenizer": None, "config": {}})


def test_stored_undertow_config_used_only_when_it_matches():
    """config.json's undertow entry gives back fields transformers has no place for; a hand-edited
    one that no longer matches (or cannot export at all, e.g. mlp = 'gelu') is ignored."""
    from undertow.hf import UNDERTOW_KEY
    from undertow.models.mamba.hf import config_from_hf, hf_config

    cfg = MambaConfig(layer_pattern="M-*-", **{**TINY, "init_std": 0.3})
    config = hf_config(cfg, {})
    config[UNDERTOW_KEY] = {"model": {"family": "mamba", **dataclasses.asdict(cfg)}}
    assert config_from_hf(config) == cfg
    for edit in ({"mlp": "gelu"}, {"position_embedding": "none"}, {"d_state": 16}):
        config[UNDERTOW_KEY]["model"] = {"family": "mamba", **dataclasses.asdict(dataclasses.replace(cfg, **edit))}
        derived = config_from_hf(config)
        assert derived.init_std != 0.3 and derived.mlp == "swiglu" and derived.d_state == cfg.d_state, edit
