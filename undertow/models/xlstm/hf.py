"""Hugging Face mapping of the xLSTM family: transformers' xLSTMForCausalLM (model_type "xlstm"), both ways.

transformers computes xLSTM-7B natively (without NX-AI's `xlstm` package) with the same block,
so a config exports when transformers can rebuild its widths: its decoding cache is sized by
qk_dim and v_dim rounded up to multiples of 64, so both must be multiples of 64 already; the
soft-caps cannot be turned off there (cap 0 would divide by zero); the SwiGLU width must be one
its round-up formula produces (ffn_proj_factor * d rounded up to a multiple).

Names. Ours -> theirs, per block i (`backbone.blocks.{i}.`): norm_mlstm, norm_ffn (same names),
mlstm.{q,k,v} -> mlstm_layer.{q,k,v} (older transformers: query, key, value), mlstm.{i,f,o}gate ->
mlstm_layer.{i,f,o}gate_preact, mlstm.norm -> mlstm_layer.multihead_norm, mlstm.out_proj ->
mlstm_layer.out_proj, ffn.{gate,up,down}_proj -> ffn.proj_{up_gate,up,down}; embed ->
backbone.embeddings, norm -> backbone.out_norm, lm_head -> lm_head. The names written are the
ones the installed transformers builds (read from a model it constructs on the meta device, never
assumed); imports accept every spelling, and weight_mode "fused" checkpoints (qkv_opreact =
[q; k; v; o], ifgate_preact = [i; f], proj_up_gate_z = [gate; up]) are split into our projections.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from undertow.configtools import from_dict
from undertow.models.hf_common import HFConversionError, check_model_type, store_config, stored_config
from undertow.models.xlstm.config import XLSTMConfig, round_up

HF_MODEL_TYPES = ("xlstm",)
ARCHITECTURE = "xLSTMForCausalLM"
# Our module in a block -> transformers' names for it, newest first.
_BLOCK_NAMES = {
    "norm_mlstm": ("norm_mlstm",),
    "mlstm.q": ("mlstm_layer.q", "mlstm_layer.query"),
    "mlstm.k": ("mlstm_layer.k", "mlstm_layer.key"),
    "mlstm.v": ("mlstm_layer.v", "mlstm_layer.value"),
    "mlstm.igate": ("mlstm_layer.igate_preact",),
    "mlstm.fgate": ("mlstm_layer.fgate_preact",),
    "mlstm.ogate": ("mlstm_layer.ogate_preact",),
    "mlstm.norm": ("mlstm_layer.multihead_norm",),
    "mlstm.out_proj": ("mlstm_layer.out_proj",),
    "norm_ffn": ("norm_ffn",),
    "ffn.gate_proj": ("ffn.proj_up_gate",),
    "ffn.up_proj": ("ffn.proj_up",),
    "ffn.down_proj": ("ffn.proj_down",),
}
_WITH_BIAS = ("mlstm.igate", "mlstm.fgate")
# weight_mode "fused": one transformers projection = our projections stacked on dim 0 (in this order).
_FUSED = {
    "mlstm_layer.qkv_opreact": ("mlstm.q", "mlstm.k", "mlstm.v", "mlstm.ogate"),
    "mlstm_layer.ifgate_preact": ("mlstm.igate", "mlstm.fgate"),
    "ffn.proj_up_gate_z": ("ffn.gate_proj", "ffn.up_proj"),
}


@functools.lru_cache(maxsize=None)
def installed_block_names() -> dict[str, str]:
    """Our block module -> the name the installed transformers gives it, read from a one-block
    xLSTMForCausalLM built on the meta device; the newest names when transformers is absent."""
    try:
        import transformers
    except ImportError:
        return {ours: names[0] for ours, names in _BLOCK_NAMES.items()}
    config = transformers.xLSTMConfig(vocab_size=8, hidden_size=64, num_hidden_layers=1, num_heads=1)
    with torch.device("meta"):
        built = {name for name, _ in transformers.xLSTMForCausalLM(config).named_parameters()}
    found = {}
    for ours, names in _BLOCK_NAMES.items():
        present = [n for n in names if f"backbone.blocks.0.{n}.weight" in built]
        if not present:
            raise HFConversionError(f"the installed transformers {transformers.__version__} builds xLSTM blocks "
                                    f"without any of {list(names)} (it has {sorted(built)}); undertow cannot "
                                    f"map {ours}")
        found[ours] = present[0]
    return found


def _ffn_rounding(cfg: XLSTMConfig) -> tuple[float, int] | None:
    """(ffn_proj_factor, ffn_round_up_to_multiple_of) from which transformers rebuilds cfg.hidden, or None."""
    # the config's own rounding, else the exact width as a factor rounded up to a multiple of itself
    candidates = ((cfg.ffn_proj_factor, cfg.ffn_round_up_to_multiple_of), (cfg.hidden / cfg.d_model, cfg.hidden))
    for factor, multiple in candidates:
        if round_up(cfg.d_model * factor, multiple) == cfg.hidden:
            return factor, multiple
    return None


def hf_architecture(cfg: XLSTMConfig) -> str:
    """xLSTMForCausalLM, or HFConversionError saying what transformers cannot compute like `cfg`."""
    if set(cfg.pattern) != {"m"}:
        raise HFConversionError(
            f"layer_pattern {cfg.pattern!r}: transformers' xLSTMForCausalLM builds only xLSTM-7B's mLSTM block "
            "(`m`); the paper's sLSTM (s) and mLSTM (M) blocks, attention (*) and MLP (-) layers have no "
            "counterpart there, so only all-`m` patterns export")
    for name, width in (("qk_dim", cfg.qk_dim), ("v_dim", cfg.v_dim)):
        if width % 64:
            raise HFConversionError(
                f"{name} = {width}: transformers' xLSTM sizes its recurrent cache with {name} rounded up to a "
                f"multiple of 64 ({round_up(width, 64)}), so it cannot run this model; choose d_model and "
                f"{name.replace('dim', 'dim_factor')} so that {name} is a multiple of 64")
    for name in ("gate_soft_cap", "logit_soft_cap"):
        if not getattr(cfg, name):
            raise HFConversionError(f"{name} = 0 (no cap): transformers' xLSTM always applies cap * tanh(x / cap), "
                                    "so only capped models export")
    if _ffn_rounding(cfg) is None:
        raise HFConversionError(f"ffn_hidden = {cfg.hidden}: transformers' xLSTM cannot build this SwiGLU width")
    return ARCHITECTURE


def hf_config(cfg: XLSTMConfig, special_ids: dict) -> dict:
    """The config.json of `cfg` (`special_ids`: bos/eos/pad token ids, None when absent)."""
    hf_architecture(cfg)
    factor, multiple = _ffn_rounding(cfg)
    return {
        "architectures": [ARCHITECTURE], "model_type": "xlstm", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "embedding_dim": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_blocks": cfg.n_layers, "num_heads": cfg.n_heads, "qk_dim_factor": cfg.qk_dim_factor,
        "v_dim_factor": cfg.v_dim_factor, "ffn_proj_factor": factor, "ffn_round_up_to_multiple_of": multiple,
        "gate_soft_cap": cfg.gate_soft_cap, "output_logit_soft_cap": cfg.logit_soft_cap, "norm_eps": cfg.norm_eps,
        "eps": cfg.mlstm_eps, "chunk_size": cfg.chunk_size, "tie_word_embeddings": cfg.tie_embeddings,
        "use_bias": False, "add_out_norm": True, "weight_mode": "single", "norm_reduction_force_float32": True,
        **{f"{k}_token_id": special_ids.get(k) for k in ("bos", "eos", "pad")},
    }


def _outer_names() -> list[tuple[str, str]]:
    return [("backbone.embeddings.weight", "embed.weight"), ("backbone.out_norm.weight", "norm.weight"),
            ("lm_head.weight", "lm_head.weight")]


def to_hf(cfg: XLSTMConfig, state_dict: dict, special_ids: dict) -> tuple[dict, dict]:
    """Our config + state dict -> (config.json dict, {HF name: tensor}). Every tensor of ours is used;
    a tied head is written as its own copy (transformers' xLSTM does not re-tie it on load)."""
    config = hf_config(cfg, special_ids)
    store_config(config, "xlstm", cfg)
    pairs = list(_outer_names())
    for i in range(cfg.n_layers):
        for ours, theirs in installed_block_names().items():
            params = ("weight", "bias") if ours in _WITH_BIAS else ("weight",)
            pairs += [(f"backbone.blocks.{i}.{theirs}.{p}", f"layers.{i}.{ours}.{p}") for p in params]
    left = dict(state_dict)
    tensors = {}
    for theirs, ours in pairs:
        if ours not in left:
            raise HFConversionError(f"the checkpoint lacks {ours!r} (needed for {theirs})")
        tensors[theirs] = left.pop(ours)
    if cfg.tie_embeddings:
        tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()  # safetensors stores no shared tensors
    if left:
        raise HFConversionError(f"tensors with no Hugging Face counterpart: {sorted(left)}")
    return config, tensors


def _get(config: dict, *keys: str, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise HFConversionError(f"config.json has no {keys[0]!r}")
    return default


def _config_from_hf(config: dict) -> XLSTMConfig:
    """The XLSTMConfig a transformers config describes; absent keys take xLSTMConfig's (xLSTM-7B's) defaults."""
    if config.get("use_bias"):
        raise HFConversionError("use_bias = true: undertow's xLSTM has biases only on the input/forget gates "
                                "(xLSTM-7B's layout)")
    if config.get("add_out_norm", True) is False:
        raise HFConversionError("add_out_norm = false: undertow's xLSTM always has the final RMSNorm")
    return XLSTMConfig(
        vocab_size=_get(config, "vocab_size"), d_model=_get(config, "hidden_size", "embedding_dim"),
        n_layers=_get(config, "num_hidden_layers", "num_blocks"), n_heads=_get(config, "num_heads", default=8),
        qk_dim_factor=float(_get(config, "qk_dim_factor", default=0.5)),
        v_dim_factor=float(_get(config, "v_dim_factor", default=1.0)),
        ffn_proj_factor=float(_get(config, "ffn_proj_factor", default=2.667)),
        ffn_round_up_to_multiple_of=_get(config, "ffn_round_up_to_multiple_of", default=64),
        gate_soft_cap=float(_get(config, "gate_soft_cap", default=15.0)),
        logit_soft_cap=float(_get(config, "output_logit_soft_cap", default=30.0)),
        norm_eps=float(_get(config, "norm_eps", default=1e-6)), mlstm_eps=float(_get(config, "eps", default=1e-6)),
        chunk_size=_get(config, "chunk_size", default=64),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def config_from_hf(config: dict) -> XLSTMConfig:
    """The XLSTMConfig of a transformers config.json: the undertow config it was exported from when it
    carries one that still describes the same architecture (exact round trip of init settings and
    layer_pattern), else the one derived from transformers' keys."""
    check_model_type(config, HF_MODEL_TYPES)
    derived = _config_from_hf(config)
    stored = stored_config(config)
    if stored and set(stored) <= {f.name for f in dataclasses.fields(XLSTMConfig)}:
        candidate = from_dict(XLSTMConfig, stored, "model")  # nested tables (model.moe) too
        try:
            candidate.validate()
            same = hf_config(candidate, {}) == hf_config(derived, {})
        except ValueError:  # hand-edited: not a config of this file's architecture
            same = False
        if same:
            return candidate
    return derived


def _rows(cfg: XLSTMConfig, ours: str) -> int:
    """Rows (output channels) of our projection `ours` inside a fused transformers projection."""
    return {"mlstm.q": cfg.qk_dim, "mlstm.k": cfg.qk_dim, "mlstm.v": cfg.v_dim, "mlstm.ogate": cfg.v_dim,
            "mlstm.igate": cfg.n_heads, "mlstm.fgate": cfg.n_heads, "ffn.gate_proj": cfg.hidden,
            "ffn.up_proj": cfg.hidden}[ours]


def _block_from_hf(cfg: XLSTMConfig, left: dict, i: int) -> dict:
    """Block i's tensors popped from `left` (HF name -> tensor) -> {our name: tensor}."""
    prefix, state = f"backbone.blocks.{i}.", {}
    for fused, parts in _FUSED.items():
        for param in ("weight", "bias"):
            tensor = left.pop(f"{prefix}{fused}.{param}", None)
            if tensor is None:
                continue
            sizes = [_rows(cfg, ours) for ours in parts]
            if tensor.shape[0] != sum(sizes):
                raise HFConversionError(f"{prefix}{fused}.{param} has {tensor.shape[0]} rows, the config implies "
                                        f"{sum(sizes)} ({dict(zip(parts, sizes))})")
            state.update({f"layers.{i}.{ours}.{param}": t for ours, t in zip(parts, tensor.split(sizes))})
    for ours, names in _BLOCK_NAMES.items():
        if f"layers.{i}.{ours}.weight" in state:
            continue
        present = [n for n in names if f"{prefix}{n}.weight" in left]
        if not present:
            raise HFConversionError(f"the Hugging Face weights have none of {[prefix + n + '.weight' for n in names]}")
        for param in ("weight", "bias") if ours in _WITH_BIAS else ("weight",):
            name = f"{prefix}{present[0]}.{param}"
            if name not in left:
                raise HFConversionError(f"the Hugging Face weights lack {name!r}")
            state[f"layers.{i}.{ours}.{param}"] = left.pop(name)
    return state


def from_hf(config: dict, tensors: dict) -> tuple[XLSTMConfig, dict]:
    """config.json dict + {HF name: tensor} -> (XLSTMConfig, our state dict). Every HF tensor is used."""
    cfg = config_from_hf(config)
    cfg.validate()
    left = dict(tensors)
    if cfg.tie_embeddings:
        left.pop("lm_head.weight", None)  # a tied checkpoint may store the head anyway (ours does)
    state = {}
    for theirs, ours in _outer_names():
        if theirs in left:
            state[ours] = left.pop(theirs)
        elif not (cfg.tie_embeddings and ours == "lm_head.weight"):
            raise HFConversionError(f"the Hugging Face weights lack {theirs!r}")
    for i in range(cfg.n_layers):
        state.update(_block_from_hf(cfg, left, i))
    if left:
        raise HFConversionError(f"Hugging Face tensors with no undertow counterpart: {sorted(left)}")
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return cfg, state
