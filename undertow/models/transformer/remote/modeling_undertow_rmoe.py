"""undertow's mixture-of-experts transformers with the RMoE router (Qiu et al., ICLR 2025) for
Hugging Face transformers, written by undertow's `convert to-hf` beside
configuration_undertow_rmoe.py. Self-contained (torch and transformers only): load with
AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True).

A Llama-style decoder (RMSNorm, RoPE rotate-half, grouped-query causal attention) whose every MLP
is a dropless MoE of SwiGLU experts. The router of layer l, per token:
    x' = W1_l x (d -> r);  h_l = GRU(x', h_(l-1));  logits_l = W2_l h_l (r -> E)
with one GRU cell shared by all layers and h_0 = 0, so the router state runs up the layers with
the activations. Then softmax over the E logits (float32), top-k, the k weights renormalised,
out = sum_j w_j expert_j(x) [+ a shared expert every token uses].

The parameter names are undertow's, so a directory converts back losslessly:
    embed, layers.i.{attn_norm, attn.{q,k,v,o}_proj, mlp_norm,
    mlp.{router.proj_in, router.proj_out, w_gate, w_up, w_down, shared_expert.*}},
    router_gru.cell.{weight_ih, weight_hh, bias_ih, bias_hh}, norm, lm_head (tied to embed when
    tie_word_embeddings). Experts are stacked: w_gate, w_up (E, d, h), w_down (E, h, d), x @ W.
Generation recomputes the whole prefix at each token (no cache).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_undertow_rmoe import UndertowRMoEConfig


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


class RouterGRU(nn.Module):
    """The GRU cell every layer's router shares: x', h (N, r) -> h' (N, r), torch's GRUCell gates
    (r, z, n stacked in weight_ih / weight_hh (3r, r))."""

    def __init__(self, dim):
        super().__init__()
        self.cell = nn.GRUCell(dim, dim)

    def forward(self, x, h):
        c = self.cell
        h = h.to(x.dtype)
        xr, xz, xn = F.linear(x, c.weight_ih, c.bias_ih).chunk(3, -1)
        hr, hz, hn = F.linear(h, c.weight_hh, c.bias_hh).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


class RecurrentRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.proj_in = nn.Linear(config.hidden_size, config.router_dim, bias=False)
        self.proj_out = nn.Linear(config.router_dim, config.num_experts, bias=False)

    def forward(self, x, h, gru):
        """x (N, d), h_(l-1) (N, r) -> logits (N, E) float32, h_l (N, r)."""
        h = gru(self.proj_in(x), h)
        return self.proj_out(h).float(), h


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        E, d, h = config.num_experts, config.hidden_size, config.intermediate_size
        self.top_k = config.num_experts_per_tok
        self.router = RecurrentRouter(config)
        self.w_gate = nn.Parameter(torch.empty(E, d, h))
        self.w_up = nn.Parameter(torch.empty(E, d, h))
        self.w_down = nn.Parameter(torch.empty(E, h, d))
        shared = config.shared_expert_intermediate_size
        self.shared_expert = SwiGLU(d, shared) if shared else None

    def forward(self, x, state, gru):
        """x (B, T, d), router state (B, T, r) -> (out (B, T, d), new state (B, T, r))."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits, state = self.router(tokens, state.reshape(tokens.shape[0], -1), gru)
        top, idx = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        weights = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(tokens)
        for e in range(self.w_gate.shape[0]):  # the experts one after another, each on its tokens
            token, slot = torch.nonzero(idx == e, as_tuple=True)
            if token.numel() == 0:
                continue
            xe = tokens[token]
            y = (F.silu(xe @ self.w_gate[e]) * (xe @ self.w_up[e])) @ self.w_down[e]
            out = out.index_add(0, token, (y * weights[token, slot, None].to(y.dtype)).to(out.dtype))
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.reshape(shape), state.reshape(*shape[:-1], -1)


class Block(nn.Module):
    """x + attn(norm(x)), then + moe(norm(x)), the router state in and out."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config)

    def forward(self, x, state, gru, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        out, state = self.mlp(self.mlp_norm(x), state, gru)
        return x + out, state


class UndertowRMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = UndertowRMoEConfig
    base_model_prefix = "undertow_rmoe"
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.router_gru = RouterGRU(config.router_dim)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MoE):
            for w in (module.w_gate, module.w_up, module.w_down):
                nn.init.normal_(w, std=0.02)
        elif isinstance(module, nn.GRUCell):
            for p in module.parameters():
                nn.init.uniform_(p, -module.hidden_size ** -0.5, module.hidden_size ** -0.5)

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
        """input_ids (B, T); attention_mask (B, T) 1 for tokens, 0 for (left) padding. Returns
        logits (B, T, vocab) float32 and the mean next-token loss."""
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
        cell = self.router_gru.cell
        state = torch.zeros(B, T, self.config.router_dim, device=x.device, dtype=cell.weight_ih.dtype)  # h_0
        for layer in self.layers:
            x, state = layer(x, state, self.router_gru, cos, sin, mask)
        logits = self.lm_head(self.norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
