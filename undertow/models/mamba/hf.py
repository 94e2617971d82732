"""Hugging Face mapping of the Mamba family: names, fused layouts and configs, both ways.

Which transformers class a `layer_pattern` exports to (all load without trust_remote_code):

    m...m            MambaForCausalLM        (falcon_norm: FalconMambaForCausalLM)
    M...M            Mamba2ForCausalLM
    (M-|*-)...       BambaForCausalLM        every Bamba layer is one mixer (Mamba-2 or attention)
                                             followed by one SwiGLU MLP, so the pattern must be
                                             pairs of `M` or `*` and a `-`, with mlp = "swiglu"
                                             and (with `*` layers) position_embedding = "rope"

Anything else (Mamba-1 mixed with other layers, a mixer without its MLP, two MLPs in a row, a
GELU MLP, attention without RoPE) has no transformers class computing the same function and is
refused with the reason.

Layouts: our mixers keep their input projections separate (tensor parallelism shards them by
head); transformers fuses them. Mamba-1: in_proj = [x; z]. Mamba-2 and Bamba: in_proj =
[z; x; B; C; dt]. Depthwise conv weights are (channels, width) here, (channels, 1, width) there.
Every rule below is used in both directions, so export and import cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

import torch

from undertow.configtools import from_dict
from undertow.log import get_logger
from undertow.models.hf_common import (UNDERTOW_KEY, HFConversionError, check_model_type, store_config,
                                       stored_config, without_tied_head)
from undertow.models.mamba.config import MambaConfig

HF_MODEL_TYPES = ("mamba", "falcon_mamba", "mamba2", "bamba")
_ARCH = {"mamba": "MambaForCausalLM", "falcon_mamba": "FalconMambaForCausalLM", "mamba2": "Mamba2ForCausalLM",
         "bamba": "BambaForCausalLM"}
_BAMBA_PATTERN = re.compile(r"^(?:[M*]-)+$")
log = get_logger("undertow.hf")


@dataclass(frozen=True)
class Rule:
    """HF tensor `hf` = concatenation (dim 0) of our tensors `ours`; `conv` adds HF's middle conv dim."""

    hf: str
    ours: tuple[str, ...]
    conv: bool = False


def _model_type(cfg: MambaConfig) -> str:
    pattern = cfg.layer_pattern
    if set(pattern) == {"m"}:
        return "falcon_mamba" if cfg.falcon_norm else "mamba"
    if set(pattern) == {"M"}:
        return "mamba2"
    if "m" in pattern:
        raise HFConversionError(
            f"layer_pattern {pattern!r} mixes Mamba-1 (`m`) layers with others; transformers has Mamba-1 "
            "only as all-`m` stacks (MambaForCausalLM, FalconMambaForCausalLM)")
    if not _BAMBA_PATTERN.match(pattern):
        raise HFConversionError(
            f"layer_pattern {pattern!r} has no transformers equivalent: the hybrid class, BambaForCausalLM, "
            "builds every layer as one mixer (`M` Mamba-2 or `*` attention) followed by one SwiGLU MLP (`-`), "
            "so the pattern must be pairs like 'M-M-*-M-'")
    if cfg.mlp != "swiglu":
        raise HFConversionError(
            f"mlp = {cfg.mlp!r}: BambaForCausalLM's MLP is gated (down(act(gate x) * up x), SwiGLU); the "
            "2-matrix GELU MLP (fc2(gelu(fc1 x))) has no transformers hybrid class, so only mlp = 'swiglu' "
            "hybrids export")
    if "*" in pattern and cfg.position_embedding != "rope":
        raise HFConversionError(
            f"position_embedding = {cfg.position_embedding!r}: BambaForCausalLM always rotates its attention's "
            "queries and keys (RoPE), so attention without a positional encoding would compute different "
            "outputs there; only position_embedding = 'rope' hybrids export")
    return "bamba"


@functools.lru_cache(maxsize=None)
def _hf_gated_norm_uses_groups(model_type: str) -> bool:
    """Whether the installed transformers computes Mamba-2 layers with ngroups > 1 as we do (older
    versions normalize the gated RMSNorm over all of d_inner instead of per group).

    Measured, never looked up by class name (transformers renamed the norm class once already): a
    tiny 2-group model of ours, with the second group's channels scaled up so that per-group and
    whole-width normalization differ by far more than rounding, is converted by this module's
    rules and run in transformers' own class; True when the logits agree. False when transformers
    is not installed or cannot build the class (nothing to check against)."""
    try:
        import transformers
    except ImportError:
        return False
    from undertow.models.mamba.model import MambaLM

    pattern = "M-" if model_type == "bamba" else "MM"
    cfg = MambaConfig(vocab_size=32, d_model=32, layer_pattern=pattern, d_state=8, headdim=16, ngroups=2,
                      chunk_size=8, multiple_of=16)
    torch.manual_seed(0)
    ours = MambaLM(cfg)
    ours.init_weights()
    with torch.no_grad():
        ours.layers[0].mixer.in_proj_x.weight[cfg.d_inner // 2:] *= 20.0  # the second group's channels
    config, tensors = to_hf(cfg, ours.state_dict(), {})
    config.pop(UNDERTOW_KEY)
    try:
        theirs = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(config.pop("model_type"), **config))
        theirs.load_state_dict(tensors, strict=False)
        ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want, got = ours(ids), theirs.eval()(ids, use_cache=False).logits
    except Exception as e:  # noqa: BLE001 - any failure means the installed transformers cannot be checked
        log.warning("could not run transformers' %s to check its grouped norm (%s: %s)", model_type,
                    type(e).__name__, e)
        return False
    return bool((got - want).abs().max() <= 1e-4 * want.abs().max().clamp_min(1.0))


def hf_architecture(cfg: MambaConfig) -> str:
    """The transformers class `cfg` exports to, or HFConversionError explaining why there is none."""
    model_type = _model_type(cfg)
    if "M" in cfg.layer_pattern and cfg.ngroups > 1 and not _hf_gated_norm_uses_groups(model_type):
        raise HFConversionError(
            f"ngroups = {cfg.ngroups}: the installed transformers (if any) does not compute a 2-group Mamba-2 "
            "layer as undertow does (older versions normalize the gated RMSNorm over all of d_inner instead of "
            "per group), so the exported model would compute different outputs; install a transformers "
            "version whose Mamba-2 normalizes per group (5.x does), or use ngroups = 1")
    return _ARCH[model_type]


def _mixer_rules(kind: str, cfg: MambaConfig, ours: str, hf: str) -> list[Rule]:
    """Tensors of one mixer: `ours`/`hf` are the module prefixes on each side."""
    def proj(hf_name: str, parts: tuple[str, ...], bias: bool) -> list[Rule]:
        rules = [Rule(f"{hf}{hf_name}.weight", tuple(f"{ours}{p}.weight" for p in parts))]
        if bias:
            rules.append(Rule(f"{hf}{hf_name}.bias", tuple(f"{ours}{p}.bias" for p in parts)))
        return rules

    def same(*names: str) -> list[Rule]:
        return [Rule(f"{hf}{n}", (f"{ours}{n}",)) for n in names]

    if kind in "mM":
        in_parts = ("in_proj_x", "in_proj_z") if kind == "m" else (
            "in_proj_z", "in_proj_x", "in_proj_B", "in_proj_C", "in_proj_dt")
        rules = proj("in_proj", in_parts, cfg.proj_bias) + [Rule(f"{hf}conv1d.weight", (f"{ours}conv_weight",), True)]
        if cfg.conv_bias:
            rules.append(Rule(f"{hf}conv1d.bias", (f"{ours}conv_bias",)))
        extra = ("x_proj.weight", "dt_proj.weight", "dt_proj.bias") if kind == "m" else ("dt_bias", "norm.weight")
        return rules + same(*extra, "A_log", "D") + proj("out_proj", ("out_proj",), cfg.proj_bias)
    if kind == "*":
        return same("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
    return same("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def _rules(cfg: MambaConfig, model_type: str) -> list[Rule]:
    """Every tensor of the model, in order."""
    if model_type == "bamba":
        rules = [Rule("model.embed_tokens.weight", ("embed.weight",))]
        for j in range(cfg.n_layers // 2):
            kind, mixer, mlp = cfg.layer_pattern[2 * j], f"layers.{2 * j}.", f"layers.{2 * j + 1}."
            hf = f"model.layers.{j}."
            rules.append(Rule(f"{hf}input_layernorm.weight", (f"{mixer}norm.weight",)))
            rules += _mixer_rules(kind, cfg, f"{mixer}mixer.", hf + ("mamba." if kind == "M" else "self_attn."))
            rules.append(Rule(f"{hf}pre_ff_layernorm.weight", (f"{mlp}norm.weight",)))
            rules += _mixer_rules("-", cfg, f"{mlp}mixer.", f"{hf}feed_forward.")
        rules.append(Rule("model.final_layernorm.weight", ("norm.weight",)))
    else:
        rules = [Rule("backbone.embeddings.weight", ("embed.weight",))]
        for i, kind in enumerate(cfg.layer_pattern):
            hf = f"backbone.layers.{i}."
            rules.append(Rule(f"{hf}norm.weight", (f"layers.{i}.norm.weight",)))
            rules += _mixer_rules(kind, cfg, f"layers.{i}.mixer.", f"{hf}mixer.")
        rules.append(Rule("backbone.norm_f.weight", ("norm.weight",)))
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
    return rules


def hf_config(cfg: MambaConfig, special_ids: dict) -> dict:
    """The config.json of `cfg` (`special_ids`: bos/eos/pad token ids, None when absent)."""
    model_type = _model_type(cfg)
    out = {"architectures": [_ARCH[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
           "initializer_range": cfg.init_std, **{f"{k}_token_id": special_ids.get(k) for k in ("bos", "eos", "pad")}}
    if model_type == "bamba":
        attn = [j for j in range(cfg.n_layers // 2) if cfg.layer_pattern[2 * j] == "*"]
        # Without `M` layers the Mamba fields are unused but must still be consistent for BambaConfig.
        heads, headdim = (cfg.nheads, cfg.headdim) if "M" in cfg.layer_pattern else (1, cfg.d_inner)
        return {**out, "num_hidden_layers": cfg.n_layers // 2, "attn_layer_indices": attn,
                "intermediate_size": cfg.hidden, "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads, "rms_norm_eps": cfg.norm_eps,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
                "attention_bias": False, "mlp_bias": False, "mamba_n_heads": heads, "mamba_d_head": headdim,
                "mamba_n_groups": cfg.ngroups, "mamba_d_state": cfg.d_state, "mamba_d_conv": cfg.d_conv,
                "mamba_expand": cfg.expand, "mamba_chunk_size": cfg.chunk_size, "mamba_conv_bias": cfg.conv_bias,
                "mamba_proj_bias": cfg.proj_bias}
    out.update({"num_hidden_layers": cfg.n_layers, "state_size": cfg.d_state, "expand": cfg.expand,
                "conv_kernel": cfg.d_conv, "use_bias": cfg.proj_bias, "use_conv_bias": cfg.conv_bias,
                "layer_norm_epsilon": cfg.norm_eps, "residual_in_fp32": cfg.residual_in_fp32,
                "time_step_min": cfg.dt_min, "time_step_max": cfg.dt_max, "time_step_floor": cfg.dt_init_floor})
    if model_type == "mamba2":
        return {**out, "num_heads": cfg.nheads, "head_dim": cfg.headdim, "n_groups": cfg.ngroups,
                "chunk_size": cfg.chunk_size}
    out.update({"intermediate_size": cfg.d_inner, "time_step_rank": cfg.rank})
    return {**out, "mixer_rms_eps": cfg.mixer_norm_eps} if model_type == "falcon_mamba" else out


def to_hf(cfg: MambaConfig, state_dict: dict, special_ids: dict) -> tuple[dict, dict]:
    """Our config + state dict -> (config.json dict, {HF name: tensor}). Every tensor of ours is used."""
    config = store_config(hf_config(cfg, special_ids), "mamba", cfg)
    left = without_tied_head(state_dict, cfg.tie_embeddings)
    tensors = {}
    for rule in _rules(cfg, config["model_type"]):
        missing = [name for name in rule.ours if name not in left]
        if missing:
            raise HFConversionError(f"the checkpoint lacks {missing} (needed for {rule.hf})")
        parts = [left.pop(name) for name in rule.ours]
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        tensors[rule.hf] = tensor.unsqueeze(1) if rule.conv else tensor
    if left:
        raise HFConversionError(f"tensors with no Hugging Face counterpart: {sorted(left)}")
    return config, tensors


def _get(config: dict, key: str, default=None):
    value = config.get(key, default)
    if value is None:
        raise HFConversionError(f"config.json has no {key!r}")
    return value


def _config_from_hf(config: dict) -> MambaConfig:
    """The MambaConfig a transformers config describes (only what the architecture fixes)."""
    model_type = config["model_type"]
    common = {"vocab_size": _get(config, "vocab_size"), "d_model": _get(config, "hidden_size"),
              "tie_embeddings": bool(config.get("tie_word_embeddings", model_type in ("mamba", "falcon_mamba")))}
    if model_type == "bamba":
        attn = set(config.get("attn_layer_indices") or [])
        rope = config.get("rope_parameters") or {}
        if rope.get("partial_rotary_factor", 0.5) != 1.0 or rope.get("rope_type", "default") != "default":
            raise HFConversionError(f"Bamba rope_parameters {rope}: undertow's attention rotates the whole head "
                                    "(partial_rotary_factor 1.0, default RoPE)")
        pattern = "".join("*-" if j in attn else "M-" for j in range(_get(config, "num_hidden_layers")))
        d_head = _get(config, "mamba_d_head")
        return MambaConfig(
            **common, layer_pattern=pattern, ffn_hidden=_get(config, "intermediate_size"),
            n_heads=_get(config, "num_attention_heads"), n_kv_heads=config.get("num_key_value_heads") or 0,
            rope_theta=float(rope.get("rope_theta", 10000.0)), norm_eps=_get(config, "rms_norm_eps"),
            headdim=d_head, ngroups=_get(config, "mamba_n_groups"), d_state=_get(config, "mamba_d_state"),
            d_conv=_get(config, "mamba_d_conv"), expand=_get(config, "mamba_expand"),
            chunk_size=_get(config, "mamba_chunk_size"), conv_bias=_get(config, "mamba_conv_bias"),
            proj_bias=_get(config, "mamba_proj_bias"))
    mamba = {"d_state": _get(config, "state_size"), "expand": _get(config, "expand"),
             "d_conv": _get(config, "conv_kernel"), "proj_bias": _get(config, "use_bias"),
             "conv_bias": _get(config, "use_conv_bias"), "norm_eps": _get(config, "layer_norm_epsilon"),
             "residual_in_fp32": _get(config, "residual_in_fp32", True)}
    defaults = MambaConfig()  # initialization-only settings: older config.json files may lack them
    for ours, theirs in (("dt_min", "time_step_min"), ("dt_max", "time_step_max"), ("dt_init_floor", "time_step_floor")):
        mamba[ours] = _get(config, theirs, getattr(defaults, ours))
    n = _get(config, "num_hidden_layers")
    if model_type == "mamba2":
        return MambaConfig(**common, **mamba, layer_pattern="M" * n, headdim=_get(config, "head_dim"),
                           ngroups=_get(config, "n_groups"), chunk_size=_get(config, "chunk_size"))
    if model_type == "falcon_mamba":
        mamba["mixer_norm_eps"] = float(config.get("mixer_rms_eps", 1e-6))  # transformers' default when absent
    rank = _get(config, "time_step_rank")
    return MambaConfig(**common, **mamba, layer_pattern="m" * n, falcon_norm=model_type == "falcon_mamba",
                       dt_rank=rank if isinstance(rank, int) else 0)


def _architecture_keys(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.endswith("_token_id") and k not in ("initializer_range",)}


def config_from_hf(config: dict) -> MambaConfig:
    """The MambaConfig of a transformers config.json. When the file carries the undertow config it was
    exported from and that config still exports to the same architecture, that one is returned
    (exact round trip of fields transformers has no place for: init_std, multiple_of, ...);
    a stored config that differs or cannot export at all is ignored."""
    check_model_type(config, HF_MODEL_TYPES)
    derived = _config_from_hf(config)
    stored = stored_config(config)
    known = {f.name for f in dataclasses.fields(MambaConfig)}
    if stored and set(stored) <= known:
        candidate = from_dict(MambaConfig, stored, "model")  # nested tables (model.moe) too
        try:
            same = _architecture_keys(hf_config(candidate, {})) == _architecture_keys(hf_config(derived, {}))
        except HFConversionError:  # a stored config that cannot be this file's architecture (hand-edited)
            same = False
        if same:
            return candidate
    return derived


def from_hf(config: dict, tensors: dict) -> tuple[MambaConfig, dict]:
    """config.json dict + {HF name: tensor} -> (MambaConfig, our state dict). Every HF tensor is used."""
    cfg = config_from_hf(config)
    cfg.validate()
    left = without_tied_head(tensors, cfg.tie_embeddings)
    state = {}
    for rule in _rules(cfg, config["model_type"]):
        if rule.hf not in left:
            raise HFConversionError(f"the Hugging Face weights lack {rule.hf!r}")
        tensor = left.pop(rule.hf)
        tensor = tensor.squeeze(1) if rule.conv else tensor
        sizes = [_our_rows(cfg, name) for name in rule.ours] if len(rule.ours) > 1 else [tensor.shape[0]]
        if sum(sizes) != tensor.shape[0]:
            raise HFConversionError(f"{rule.hf} has {tensor.shape[0]} rows, the config implies {sum(sizes)}")
        for name, part in zip(rule.ours, tensor.split(sizes)):
            state[name] = part
    if left:
        raise HFConversionError(f"Hugging Face tensors with no undertow counterpart: {sorted(left)}")
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return cfg, state


def _our_rows(cfg: MambaConfig, name: str) -> int:
    """Rows (dim 0) of our part `name` (e.g. layers.3.mixer.in_proj_B.weight) of a fused HF projection."""
    gn = cfg.ngroups * cfg.d_state
    rows = {"in_proj_x": cfg.d_inner, "in_proj_z": cfg.d_inner, "in_proj_B": gn, "in_proj_C": gn,
            "in_proj_dt": cfg.nheads}
    return rows[name.split(".")[-2]]
