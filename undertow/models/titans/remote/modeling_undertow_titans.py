"""undertow's Titans language models (Behrouz et al. 2025, arXiv 2501.00663) for Hugging Face
transformers, written by undertow's `convert to-hf` beside configuration_undertow_titans.py.
Self-contained (torch and transformers only): load with
AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True).

The parameter names are undertow's, so a directory converts back losslessly:
    embed, layers.*, norm, lm_head (tied to embed when tie_word_embeddings)
  mac / mag: layers.i = norm, mixer (attn, mem [, norm_y, norm_m, gate_out]), norm_ffn, ffn
  mal:       layers.i = norm_mem, mem, norm, attn, norm_ffn, ffn
  mem:  q_proj, k_proj, v_proj, theta_proj, eta_proj, alpha_proj [, gamma_proj], memory.0..L-1 (M_0
        per head, (H, Din, Dout)), out_proj;  attn: attn.{q,k,v,o}_proj, persistent (P, hidden)

The memory runs the rule undertow trains with, token by token: each token's inner gradient of the
loss ||M(k) - v||^2 (or Huber) is taken at the weights of its chunk's start (chunk_size tokens from
the row's start), clipped per token to max_grad_norm (0 where not finite); then
S_t = eta_t S_{t-1} - theta_t g_t, W_t = (1 - alpha_t) W_{t-1} + S_t, y_t = M_{W_t}(q_t) (with the Omega
window c > 1, g_t sums the gated gradients of the last c tokens). Inference only: no documents, no
padding; generation recomputes the whole prefix at each token (no cache).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_undertow_titans import UndertowTitansConfig


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


def causal_mask(n, window, device):
    """(n, n) bool: query i sees key j when j <= i and i - j < window (None: no window)."""
    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return mask if window is None else mask.triu(1 - window)


def attend(q, k, v, mask):
    """q (B, T, H, D); k, v (B, S, Hkv, D); mask (T, S) bool -> (B, T, H, D)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=kt.shape[1] != qt.shape[1])
    return out.transpose(1, 2)


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, h = config.hidden_size, config.num_attention_heads
        self.head_dim = d // h
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def project(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), self.v_proj(x).view(B, T, -1, self.head_dim)


class PersistentAttention(nn.Module):
    """Attention whose every query also sees `persistent` (P, hidden): learned tokens, projected by
    the same k/v projections without RoPE."""

    def __init__(self, config):
        super().__init__()
        self.attn = Attention(config)
        self.persistent = nn.Parameter(torch.zeros(config.persistent_tokens, config.hidden_size))

    def persistent_kv(self, batch):
        P, hd = self.persistent.shape[0], self.attn.head_dim
        shape = (1, P, self.attn.k_proj.out_features // hd, hd)  # explicit heads: P may be 0
        k = self.attn.k_proj(self.persistent).view(shape).expand(batch, -1, -1, -1)
        v = self.attn.v_proj(self.persistent).view(shape).expand(batch, -1, -1, -1)
        return k, v

    def forward(self, x, cos, sin, window):
        B, T, _ = x.shape
        q, k, v = self.attn.project(x, cos, sin)
        pk, pv = self.persistent_kv(B)
        mask = torch.cat([torch.ones(T, pk.shape[1], dtype=torch.bool, device=x.device),
                          causal_mask(T, window, x.device)], -1)
        out = attend(q, torch.cat([pk, k], 1), torch.cat([pv, v], 1), mask)
        return self.attn.o_proj(out.reshape(B, T, -1))


# ---- the neural memory: weights W_l (B, H, Din_l, Dout_l); inputs (B, H, N, D)
def memory_read(weights, x):
    """M(x): linear (one weight) or x + SiLU(... SiLU(x W_1) ...) W_L."""
    h = x
    for w in weights[:-1]:
        h = F.silu(h @ w)
    out = h @ weights[-1]
    return out if len(weights) == 1 else x + out


def token_gradients(config, base, x, v):
    """Each token's inner gradient at `base`: keys x (B, H, N, Dk), values v (B, H, N, Dv) -> per layer
    (B, H, N, Din_l, Dout_l), clipped per token to max_grad_norm (all layers together), 0 where not finite."""
    inputs, pre, h = [x], [], x
    for w in base[:-1]:
        pre.append(h @ w)
        h = F.silu(pre[-1])
        inputs.append(h)
    out = h @ base[-1] + (x if len(base) > 1 else 0)
    r = out - v
    if config.mem_loss == "huber":
        r = r.clamp(-config.huber_delta, config.huber_delta)
    deltas = [2 * r]  # d loss / d out
    for w, u in zip(reversed(base[1:]), reversed(pre)):  # back through W_{l+1} and SiLU
        sig = torch.sigmoid(u)
        deltas.insert(0, (deltas[0] @ w.transpose(-1, -2)) * sig * (1 + u * (1 - sig)))
    sq_norm = sum(a.square().sum(-1) * d.square().sum(-1) for a, d in zip(inputs, deltas))
    finite = torch.isfinite(sq_norm)
    scale = torch.ones_like(sq_norm)
    if config.max_grad_norm > 0:
        norm = torch.where(finite, sq_norm, torch.ones_like(sq_norm)).clamp_min(1e-30).sqrt()
        scale = torch.clamp(config.max_grad_norm / norm, max=1.0)
    keep = (finite & (scale > 0))[..., None, None]
    grads = [a[..., :, None] * d[..., None, :] for a, d in zip(inputs, deltas)]
    return [torch.where(keep, g * scale[..., None, None], torch.zeros_like(g)) for g in grads]


class NeuralMemory(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        d, H = config.hidden_size, config.mem_heads
        self.head_dim = Dm = d // H
        self.q_proj = nn.Linear(d, H * Dm, bias=False)
        self.k_proj = nn.Linear(d, H * Dm, bias=False)
        self.v_proj = nn.Linear(d, H * Dm, bias=False)
        self.theta_proj = nn.Linear(d, H)
        self.eta_proj = nn.Linear(d, H)
        self.alpha_proj = nn.Linear(d, H)
        self.gamma_proj = nn.Linear(d, H) if config.omega_window > 1 else None
        dims = [Dm] + [config.mem_hidden] * (config.mem_depth - 1) + [Dm]
        self.memory = nn.ParameterList(nn.Parameter(torch.zeros(H, a, b)) for a, b in zip(dims[:-1], dims[1:]))
        self.out_proj = nn.Linear(H * Dm, d, bias=False)

    def keys(self, proj, x):
        B, T, _ = x.shape
        return F.normalize(F.silu(proj(x).view(B, T, -1, self.head_dim)), dim=-1)

    def inputs(self, x):
        """x (B, T, hidden) -> q, k, v (B, H, T, Dm) and the gates theta, eta, alpha, gamma (B, H, T), float32."""
        c = self.config
        B, T, _ = x.shape
        heads = lambda t: t.float().transpose(1, 2)  # noqa: E731
        eta = torch.sigmoid(self.eta_proj(x)) * (c.mem_optimizer != "sgd")
        alpha = torch.sigmoid(self.alpha_proj(x)) * (c.mem_retention != "none")
        gamma = torch.sigmoid(self.gamma_proj(x)) if self.gamma_proj is not None else torch.ones_like(eta)
        return {"q": heads(self.keys(self.q_proj, x)), "k": heads(self.keys(self.k_proj, x)),
                "v": heads(self.v_proj(x).view(B, T, -1, self.head_dim)),
                "theta": heads(c.max_lr * torch.sigmoid(self.theta_proj(x))), "eta": heads(eta),
                "alpha": heads(alpha), "gamma": heads(gamma)}

    def fresh_state(self, batch):
        """M_0 broadcast over the rows, zero momentum, an empty Omega window (gate 0)."""
        weights = [w.float().expand(batch, *w.shape) for w in self.memory]
        H, c = self.memory[0].shape[0], self.config.omega_window
        window = (weights[0].new_zeros(batch, H, c - 1, self.head_dim), weights[0].new_zeros(batch, H, c - 1,
                  self.head_dim), weights[0].new_zeros(batch, H, c - 1))
        return weights, [torch.zeros_like(w) for w in weights], window

    def read(self, state, x):
        """The memory `state` answering x's queries without an update -> (B, T, hidden)."""
        q = self.keys(self.q_proj, x).float().transpose(1, 2)
        return self.project_out(memory_read(state[0], q))

    def project_out(self, y):
        """(B, H, T, Dm) -> (B, T, hidden)."""
        return self.out_proj(y.transpose(1, 2).flatten(2).to(self.out_proj.weight.dtype))

    def run(self, ins, state):
        """The memory over the tokens of `ins` from `state` -> reads (B, H, T, Dm), the state after them."""
        cfg, c = self.config, self.config.omega_window
        W, S, window = state
        k_all, v_all, g_all = (torch.cat([w, ins[n]], 2) for w, n in zip(window, ("k", "v", "gamma")))
        T, ys = ins["q"].shape[2], []
        for s0 in range(0, T, cfg.chunk_size):
            end = min(s0 + cfg.chunk_size, T)
            # the gradients of the chunk's tokens and of the c - 1 before them, at the chunk-start weights
            grads = token_gradients(cfg, W, k_all[:, :, s0:end + c - 1], v_all[:, :, s0:end + c - 1])
            grads = [g * g_all[:, :, s0:end + c - 1, None, None] for g in grads]
            for t in range(s0, end):
                th, et, al = (ins[n][:, :, t, None, None] for n in ("theta", "eta", "alpha"))
                g = [gl[:, :, t - s0:t - s0 + c].sum(2) for gl in grads]
                S = [et * s - th * gl for s, gl in zip(S, g)]
                W = [(1 - al) * w + s for w, s in zip(W, S)]
                ys.append(memory_read(W, ins["q"][:, :, t, None]))
        tail = tuple(x[:, :, x.shape[2] - (c - 1):] for x in (k_all, v_all, g_all))
        return torch.cat(ys, 2), (W, S, tail)

    def forward(self, x):
        return self.project_out(self.run(self.inputs(x), self.fresh_state(x.shape[0]))[0])


class MACMixer(nn.Module):
    """Memory as a Context, per segment s: r = memory_{before s}(s's queries); y = attention of s over
    [persistent | r | s] (causal); the memory then learns from y, read at y; out = y * sigmoid(read)."""

    def __init__(self, config):
        super().__init__()
        self.segment = config.segment_len
        self.attn = PersistentAttention(config)
        self.mem = NeuralMemory(config)

    def forward(self, h, cos, sin):
        B, T, _ = h.shape
        state, outs = self.mem.fresh_state(B), []
        for s0 in range(0, T, self.segment):
            s, cs, sn = (t[:, s0:s0 + self.segment] for t in (h, cos, sin))
            n = s.shape[1]
            r = self.mem.read(state, s)
            attn = self.attn.attn
            q, k, v = attn.project(s, cs, sn)
            _, kr, vr = attn.project(r, cs, sn)
            pk, pv = self.attn.persistent_kv(B)
            own = causal_mask(n, None, h.device)
            mask = torch.cat([torch.ones(n, pk.shape[1], dtype=torch.bool, device=h.device), own, own], -1)
            y = attn.o_proj(attend(q, torch.cat([pk, kr, k], 1), torch.cat([pv, vr, v], 1), mask).reshape(B, n, -1))
            m, state = self.mem.run(self.mem.inputs(y), state)
            outs.append(y * torch.sigmoid(self.mem.project_out(m)))
        return torch.cat(outs, 1)


class MAGMixer(nn.Module):
    """Memory as a Gate: gate_out(norm_y(SWA(h)) * sigmoid(norm_m(memory(h))))."""

    def __init__(self, config):
        super().__init__()
        self.window = config.window
        self.attn = PersistentAttention(config)
        self.mem = NeuralMemory(config)
        self.norm_y = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm_m = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate_out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, h, cos, sin):
        y = self.attn(h, cos, sin, self.window)
        return self.gate_out(self.norm_y(y) * torch.sigmoid(self.norm_m(self.mem(h))))


class MixerBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = MACMixer(config) if config.variant == "mac" else MAGMixer(config)
        self.norm_ffn = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin):
        x = x + self.mixer(self.norm(x), cos, sin)
        return x + self.ffn(self.norm_ffn(x))


class MALBlock(nn.Module):
    """Memory as a Layer: x + memory(norm_mem(x)), then x + SWA(norm(x)), then the FFN."""

    def __init__(self, config):
        super().__init__()
        self.window = config.window
        self.norm_mem = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mem = NeuralMemory(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = PersistentAttention(config)
        self.norm_ffn = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin):
        x = x + self.mem(self.norm_mem(x))
        x = x + self.attn(self.norm(x), cos, sin, self.window)
        return x + self.ffn(self.norm_ffn(x))


class UndertowTitansForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = UndertowTitansConfig
    base_model_prefix = "undertow_titans"
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        block = MALBlock if config.variant == "mal" else MixerBlock
        self.layers = nn.ModuleList(block(config) for _ in range(config.num_hidden_layers))
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
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        """input_ids (B, T), unpadded (the memory would learn from padding). Returns logits (B, T,
        vocab) float32 and the mean next-token loss when labels are given."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported: the memory would learn from the padding; "
                             "run rows of different lengths one at a time")
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.config.hidden_size // self.config.num_attention_heads,
                                self.config.rope_theta)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
