"""undertow's ParaRNN language models for Hugging Face transformers, written by undertow's
`convert to-hf` beside configuration_undertow_pararnn.py. Self-contained (torch and transformers
only): load with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True).

The parameter names are undertow's, so a directory converts back losslessly:
    embed, layers.<i>.norm, layers.<i>.mixer, norm, lm_head (tied to embed when tie_word_embeddings)
One pre-norm residual block x + mixer(RMSNorm(x)) per letter of config.layer_pattern:
  g / l  ParaGRU / ParaLSTM mixer (ParaRNN, Danieli et al. 2025, arXiv 2510.21450), D channels:
           v, z = in_proj(x), gate_proj(x)               (B, T, D) each
           c    = SiLU(causal depthwise conv(v))          conv_weight (D, K), conv_bias (D,)
           u    = B c + b                                 (B, T, 3, D); B = cell_weight (H, 3, Dh, Dh),
                                                          block-diagonal over H = cell_heads groups
           h    = the cell over time, from a zero state   a (3, D), p (2, D): diagonal recurrences
           out  = out_proj(w * rmsnorm(h * SiLU(z)))      normalized per group of Dh channels
         ParaGRU:  z = s(a_z h + u_z), r = s(a_r h + u_r), h~ = tanh(a_h (r h) + u_h), h' = z h~ + (1 - z) h
         ParaLSTM: f = s(a_f h + u_f + p_f c), c~ = tanh(a_c h + u_c), c' = f c + (1 - f) c~,
                   o = s(a_o h + u_o + p_o c'), h' = o tanh(c')        (s: sigmoid)
  *      attention (RoPE, grouped-query)
  -      SwiGLU MLP
undertow trains the cells by Newton's method over the whole sequence; here they run as the plain
sequential loop in float32 (one cell step per token, for inference), the solution Newton converges
to. Left padding (attention_mask 0) resets: padded inputs read as zero in the conv window, the cell
state is zero before the first token, attention never sees padded keys. Generation recomputes the
whole prefix at each token (no cache).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_undertow_pararnn import UndertowParaRNNConfig

CELLS = {"g": "gru", "l": "lstm"}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        g = x.float()
        return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """weight * rmsnorm(y * silu(z)) over each group of `group` channels, in float32."""

    def __init__(self, dim, group, eps):
        super().__init__()
        self.group, self.eps = group, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):
        g = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group))
        g = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (g * self.weight.float()).to(y.dtype)


def gru_step(state, u, a, p):
    """state (B, 1, D) = h; u (B, 3, D) -> the next state."""
    h = state[:, 0]
    z = torch.sigmoid(a[0] * h + u[:, 0])
    r = torch.sigmoid(a[1] * h + u[:, 1])
    h_tilde = torch.tanh(a[2] * (r * h) + u[:, 2])
    return (z * h_tilde + (1 - z) * h)[:, None]


def lstm_step(state, u, a, p):
    """state (B, 2, D) = (c, h); u (B, 3, D) -> the next state."""
    c, h = state[:, 0], state[:, 1]
    f = torch.sigmoid(a[0] * h + u[:, 0] + p[0] * c)
    c_tilde = torch.tanh(a[1] * h + u[:, 1])
    c_new = f * c + (1 - f) * c_tilde
    o = torch.sigmoid(a[2] * h + u[:, 2] + p[1] * c_new)
    return torch.stack((c_new, o * torch.tanh(c_new)), 1)


class ParaRNNMixer(nn.Module):
    def __init__(self, config, cell):
        super().__init__()
        d, D, H, K = config.hidden_size, config.cell_size, config.cell_heads, config.conv_width
        self.cell, self.width = cell, K
        self.in_proj = nn.Linear(d, D, bias=False)
        self.gate_proj = nn.Linear(d, D, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(D, K))
        self.conv_bias = nn.Parameter(torch.empty(D)) if config.conv_bias else None
        self.cell_weight = nn.Parameter(torch.empty(H, 3, D // H, D // H))
        self.cell_bias = nn.Parameter(torch.empty(3, D))
        self.a = nn.Parameter(torch.empty(3, D))
        self.p = nn.Parameter(torch.empty(2, D)) if cell == "lstm" else None
        self.norm = GatedRMSNorm(D, D // H, config.rms_norm_eps)
        self.out_proj = nn.Linear(D, d, bias=False)

    def forward(self, x, keep):
        """x (B, T, d); keep (B, T) bool, False at padding, or None -> (B, T, d)."""
        v, z = self.in_proj(x), self.gate_proj(x)
        if keep is not None:
            v = v * keep[..., None].to(v.dtype)
        D, T = v.shape[-1], v.shape[1]
        window = F.pad(v.float().transpose(1, 2), (self.width - 1, 0))  # (B, D, K - 1 + T), zeros before
        bias = None if self.conv_bias is None else self.conv_bias.float()
        c = F.silu(F.conv1d(window, self.conv_weight.float()[:, None], bias, groups=D)).transpose(1, 2).to(x.dtype)
        weight = self.cell_weight
        u = torch.einsum("bthi,hgoi->btgho", c.unflatten(-1, (weight.shape[0], weight.shape[-1])), weight)
        u = (u.flatten(-2) + self.cell_bias.to(u.dtype)).float()  # (B, T, 3, D)
        step = gru_step if self.cell == "gru" else lstm_step
        a, p = self.a.float(), None if self.p is None else self.p.float()
        state = u.new_zeros(u.shape[0], 1 if self.cell == "gru" else 2, D)
        hs = []
        for t in range(T):
            state = step(state, u[:, t], a, p)
            if keep is not None:  # a padded token leaves a zero state: the next real token starts afresh
                state = state * keep[:, t, None, None].to(state.dtype)
            hs.append(state[:, -1])
        h = torch.stack(hs, 1).to(z.dtype)
        return self.out_proj(self.norm(h, z))


def rope_cos_sin(position_ids, head_dim, theta):
    """position_ids (B, T) -> cos, sin (B, T, head_dim) float32, rotate-half layout."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    angles = position_ids.float()[..., None] * (1.0 / (theta ** exponents))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.head_dim = hd
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
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


class Block(nn.Module):
    """x + mixer(norm(x)) for one layer_pattern letter."""

    def __init__(self, config, kind):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if kind in CELLS:
            self.mixer = ParaRNNMixer(config, CELLS[kind])
        elif kind == "*":
            self.mixer = Attention(config)
        elif kind == "-":
            self.mixer = SwiGLU(config.hidden_size, config.intermediate_size)
        else:
            raise ValueError(f"layer kind {kind!r} is unknown; valid: g, l, *, -")

    def forward(self, x, cos, sin, mask, keep):
        h = self.norm(x)
        if self.kind == "*":
            return x + self.mixer(h, cos, sin, mask)
        if self.kind == "-":
            return x + self.mixer(h)
        return x + self.mixer(h, keep)


class UndertowParaRNNForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = UndertowParaRNNConfig
    base_model_prefix = "undertow_pararnn"
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, kind) for kind in config.layer_pattern)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        """For weights a directory lacks (never for one `convert to-hf` wrote): undertow's init."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            nn.init.ones_(module.weight)
        elif isinstance(module, ParaRNNMixer):
            bound = 1.0 / math.sqrt(module.width)
            nn.init.uniform_(module.conv_weight, -bound, bound)
            if module.conv_bias is not None:
                nn.init.uniform_(module.conv_bias, -bound, bound)
            nn.init.normal_(module.cell_weight, std=1.0 / math.sqrt(module.cell_weight.shape[-1]))
            nn.init.zeros_(module.cell_bias)
            for w in (module.a, module.p):
                if w is not None:
                    nn.init.trunc_normal_(w, std=1.0 / math.sqrt(w.shape[-1]), a=-0.9, b=0.9)

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        """input_ids (B, T); attention_mask (B, T) 1 for tokens, 0 for (left) padding. Returns logits
        (B, T, vocab) float32 and, with labels, the mean next-token loss."""
        B, T = input_ids.shape
        keep = mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=input_ids.device)
            mask = ((causal & keep[:, None, :]) | eye)[:, None]  # padded queries see themselves only
        else:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos = sin = None
        if "*" in self.config.layer_pattern:
            cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, keep)
        logits = self.lm_head(self.norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
