"""undertow's recurrent-depth language models for Hugging Face transformers, written by undertow's
`convert to-hf` beside configuration_undertow_depth.py. Self-contained (torch and transformers
only): load with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True).

The parameter names are undertow's, so a directory converts back losslessly:
    embed, layers.*, norm, lm_head (tied to embed when tie_word_embeddings)
  arch "ut":     layers.0 = the ACT loop: block (pre-norm attention + SwiGLU), halt (halting unit)
  arch "huginn": layers.0 .. P-1 prelude sandwich blocks, layers.P the core (adapter, blocks, norm),
                 the coda blocks after it
Huginn runs `num_steps` core steps (forward(num_steps=...), default config.num_steps), any r >= 1;
the initial latent state is a truncated normal hashed from (depth_seed, position, channel), so
the logits are reproducible and equal to undertow's eval forward. Generation recomputes the whole
prefix at each token (no cache).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_undertow_depth import UndertowDepthConfig

_MASK31 = (1 << 31) - 1


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        g = x.float()
        return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def rope_cos_sin(position_ids, head_dim, theta):
    """position_ids (B, T) -> cos, sin (B, T, head_dim) float32, rotate-half layout."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config, qk_bias):
        super().__init__()
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.head_dim = hd
        self.q_proj = nn.Linear(d, h * hd, bias=qk_bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=qk_bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        gqa = k.shape[1] != q.shape[1]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PreNormBlock(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x)) (the Universal Transformer's shared block)."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, qk_bias=False)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class SandwichBlock(nn.Module):
    """x = n2(x + attn(n1 x)); x = n4(x + mlp(n3 x)) (Huginn's block)."""

    def __init__(self, config):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.norm_1, self.norm_2, self.norm_3, self.norm_4 = (RMSNorm(d, eps) for _ in range(4))
        self.attn = Attention(config, qk_bias=config.qk_bias)
        self.mlp = SwiGLU(d, config.intermediate_size)

    def forward(self, x, cos, sin, mask):
        x = self.norm_2(x + self.attn(self.norm_1(x), cos, sin, mask))
        return self.norm_4(x + self.mlp(self.norm_3(x)))


def step_timing_signal(n_steps, d, device):
    half = d // 2
    steps = torch.arange(n_steps, device=device, dtype=torch.float32)[:, None]
    scales = torch.exp(-math.log(1e4) * torch.arange(half, device=device, dtype=torch.float32) / max(half - 1, 1))
    angles = steps * scales
    return F.pad(torch.cat([angles.sin(), angles.cos()], dim=-1), (0, d - 2 * half))


class ACTLoop(nn.Module):
    """The shared block looped with adaptive computation time; the output is the halting-weighted
    sum of the steps' states, halted positions frozen, every step computed (masks)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.block = PreNormBlock(config)
        self.halt = nn.Linear(config.hidden_size, 1)

    def forward(self, x, cos, sin, mask):
        n_steps = self.config.max_steps
        timing = step_timing_signal(n_steps, x.shape[-1], x.device).to(x.dtype)
        if not self.config.act:
            for n in range(n_steps):
                x = self.block(x + timing[n], cos, sin, mask)
            return x
        B, T, _ = x.shape
        halting = x.new_zeros(B, T, dtype=torch.float32)
        running = x.new_ones(B, T, dtype=torch.float32)
        out, state = torch.zeros_like(x), x
        for n in range(n_steps):
            state = state + running.unsqueeze(-1).to(x.dtype) * timing[n]
            p = torch.sigmoid(self.halt(state).float()).squeeze(-1)
            if n == n_steps - 1:
                halts = running
            else:
                halts = ((halting + p * running) > 1.0 - self.config.act_eps).float() * running
            still = running - halts
            weight = p * still + halts * (1.0 - halting)
            halting = halting + weight
            new_state = self.block(state, cos, sin, mask)
            out = out + weight.unsqueeze(-1).to(x.dtype) * new_state
            state = torch.where(running.unsqueeze(-1) > 0, new_state, state)
            running = still
        return out


def _mix31(x):
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK31
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _MASK31
    return x ^ (x >> 15)


def hashed_truncated_normal(positions, d, seed, std):
    """positions (T,) -> (T, d): N(0, std^2) truncated to +-3 std, a function of (seed, position, channel)."""
    channels = torch.arange(d, device=positions.device, dtype=torch.int64)
    key = (positions.to(torch.int64)[:, None] * 1_000_003 + channels[None] * 7919 + seed * 104_729) & _MASK31
    u = (_mix31(_mix31(key) ^ (seed & _MASK31)).double() + 0.5) / float(1 << 31)
    lo, hi = (0.5 * (1 + math.erf(b / math.sqrt(2))) for b in (-3.0, 3.0))
    return (math.sqrt(2.0) * torch.erfinv(2 * (lo + u * (hi - lo)) - 1) * std).float()


class RecurrentCore(nn.Module):
    """s_0 (hashed truncated normal) -> r times s = core(adapter(concat(s, e))) -> norm(s)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.adapter = nn.Linear(2 * d, d, bias=False)
        self.blocks = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_core))
        self.norm = RMSNorm(d, config.rms_norm_eps)

    def forward(self, e, cos, sin, mask, positions, num_steps):
        d = e.shape[-1]
        s = hashed_truncated_normal(positions.reshape(-1), d, self.config.depth_seed, math.sqrt(2.0 / (5.0 * d)))
        s = s.view(*positions.shape, d).to(e.dtype).expand_as(e) * self.config.input_scale
        for _ in range(num_steps):
            s = self.adapter(torch.cat([s, e], dim=-1))
            for block in self.blocks:
                s = block(s, cos, sin, mask)
        return self.norm(s)


class UndertowDepthForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = UndertowDepthConfig
    base_model_prefix = "undertow_depth"
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.arch == "ut":
            layers = [ACTLoop(config)]
        else:
            layers = ([SandwichBlock(config) for _ in range(config.n_prelude)] + [RecurrentCore(config)]
                      + [SandwichBlock(config) for _ in range(config.n_coda)])
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask, "num_steps": kwargs.get("num_steps")}

    def forward(self, input_ids, attention_mask=None, labels=None, num_steps=None, **kwargs):
        """input_ids (B, T); attention_mask (B, T) 1 for tokens, 0 for (left) padding; num_steps the
        core's depth (huginn). Returns logits (B, T, vocab) float32 and the mean next-token loss."""
        B, T = input_ids.shape
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=input_ids.device)
            mask = ((causal & keep[:, None, :]) | eye)[:, None]  # padded queries see themselves only
        else:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed(input_ids)
        if self.config.input_scale != 1.0:
            x = x * self.config.input_scale
        depth = int(num_steps if num_steps is not None else self.config.num_steps)
        for layer in self.layers:
            if isinstance(layer, RecurrentCore):
                x = layer(x, cos, sin, mask, positions[0] if mask is None else positions, depth)
            else:
                x = layer(x, cos, sin, mask)
        logits = self.lm_head(self.norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
