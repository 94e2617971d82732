"""The blocks of the three Titans architectures (config.py's docstring), each ending with a SwiGLU FFN,
or with model.moe.n_experts > 0 a mixture-of-experts FFN (models/moe).

Every block offers forward(x, cos, sin, doc_ids, cu_seqlens, max_seqlen) for training, and
prefill(x, cos, sin) -> (out, state) / step(x (B, 1, d), state, cos, sin) -> (out, state) for decoding
(one prompt per row, no documents), whose outputs equal forward's. With an MoE FFN (`is_moe`) all
three also take router_state= and router_gru= and their `out` becomes (x, the router state after the
block): the rmoe router's state (B, T, router_dim) runs from block to block (models/moe/carry.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from undertow.kernels.titans_memory import MemoryState
from undertow.kernels.titans_memory.context import flatten
from undertow.models.common.mlp import SwiGLU
from undertow.models.common.norms import RMSNorm
from undertow.models.moe.layer import MoELayer
from undertow.models.titans.attention import PersistentAttention, attend, document_causal_mask
from undertow.models.titans.config import TitansConfig
from undertow.models.titans.context import block_handler
from undertow.models.titans.memory import NeuralMemory


def _rows(mask: torch.Tensor, a: MemoryState, b: MemoryState) -> MemoryState:
    """Per row (mask (B,) bool): state a where True, else b."""
    pick = lambda x, y: torch.where(mask.view(-1, *[1] * (x.ndim - 1)), x, y)  # noqa: E731
    window = None if a.window is None else tuple(pick(x, y) for x, y in zip(a.window, b.window))
    return MemoryState(tuple(pick(x, y) for x, y in zip(a.weights, b.weights)),
                       tuple(pick(x, y) for x, y in zip(a.momentum, b.momentum)), window)


def split_state(mem: NeuralMemory, flat: tuple | None) -> tuple[MemoryState | None, tuple | None]:
    """A MAG/MAL block's flat cp state (None on the first rank) -> the memory's state, the attention's tail."""
    if flat is None:
        return None, None
    n = len(mem.flat_shapes(1))
    return mem.unflatten(flat[:n]), tuple(flat[n:])


def build_ffn(cfg: TitansConfig, index: int) -> nn.Module:
    """The block's FFN: SwiGLU, or an MoE layer of SwiGLU experts (width moe.expert_hidden, 0: ffn's)."""
    return MoELayer(cfg.d_model, cfg.hidden, cfg.moe, index) if cfg.moe.enabled else SwiGLU(cfg.d_model, cfg.hidden)


class TitansBlock(nn.Module):
    """What the blocks share: the FFN branch and the inits."""

    @property
    def is_moe(self) -> bool:
        """An MoE FFN: the block takes and returns the router state (models/moe/carry.py)."""
        return isinstance(self.ffn, MoELayer)

    def add_ffn(self, x: torch.Tensor, router_state=None, router_gru=None):
        """x + ffn(norm_ffn(x)); with an MoE FFN -> (that, the router state after it)."""
        if not self.is_moe:
            return x + self.ffn(self.norm_ffn(x))
        out, router_state = self.ffn(self.norm_ffn(x), router_state, router_gru)
        return x + out, router_state

    def init_weights(self, std: float, out_std: float) -> None:
        for module in self.children():
            if isinstance(module, RMSNorm):
                module.init_weights()
            else:
                module.init_weights(std, out_std)


class MixerBlock(TitansBlock):
    """x + mixer(norm(x)), then the FFN: the mixing of MAC and MAG in one module (`mixer`), which a
    tensor-parallel plan takes a whole-sequence input into and a residual-layout output out of."""

    def __init__(self, cfg: TitansConfig, mixer: nn.Module, index: int = 0):
        super().__init__()
        self.kind = cfg.variant
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixer
        self.norm_ffn = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_ffn(cfg, index)

    def forward(self, x, cos, sin, doc_ids=None, cu_seqlens=None, max_seqlen=None, **router):
        return self.add_ffn(x + self.mixer(self.norm(x), cos, sin, doc_ids, cu_seqlens, max_seqlen), **router)

    def prefill(self, x, cos, sin, **router):
        out, state = self.mixer.prefill(self.norm(x), cos, sin)
        return self.add_ffn(x + out, **router), state

    def step(self, x, state, cos, sin, **router):
        out, state = self.mixer.step(self.norm(x), state, cos, sin)
        return self.add_ffn(x + out, **router), state


class MACMixer(nn.Module):
    """Memory as a Context. Per segment of segment_len tokens s (B, N, d) of h = norm(x):
        r   = memory_{before s}(queries of s)                      the memory's answers (eq. 21)
        y   = Attn(q = s; keys = [persistent | r | s], causal, same document)    (eq. 22-23)
        m   = memory updated by y, read at y (token by token)      (eq. 24-25)
        out = y * sigmoid(out_proj(m))                              (eq. 25's gate)
    The memory's state passes from segment to segment."""

    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.segment = cfg.segment_len
        self.attn = PersistentAttention(cfg)
        self.mem = NeuralMemory(cfg)

    def init_weights(self, std: float, out_std: float) -> None:
        self.attn.init_weights(std, out_std)
        self.mem.init_weights(std, out_std)

    def _segment(self, s, cos, sin, state: MemoryState, fresh: MemoryState, ids):
        """One segment (or, decoding, its tokens so far) -> attention output y (B, n, d). ids (B, n):
        documents (the answers of tokens whose document starts inside the segment come from M_0)."""
        B, n, _ = s.shape
        r = self.mem.read(state, s)
        if ids is not None:
            inside = (ids != ids[:, :1])[..., None, None]
            r = torch.where(inside, self.mem.read(fresh, s), r)
        r = self.mem.project_out(r)
        attn = self.attn.attn
        q, k, v = attn.project(s, cos, sin)
        _, kr, vr = attn.project(r, cos, sin)
        pk, pv = self.attn.persistent_kv(B)
        ids = ids if ids is not None else torch.zeros(B, n, dtype=torch.long, device=s.device)
        own = document_causal_mask(ids)
        mask = torch.cat([torch.ones(B, 1, n, pk.shape[1], dtype=torch.bool, device=s.device), own, own], -1)
        out = attend(q, torch.cat([pk, kr, k], 1), torch.cat([pv, vr, v], 1), mask)
        return attn.o_proj(out.reshape(B, n, -1))

    def forward(self, h, cos, sin, doc_ids=None, cu_seqlens=None, max_seqlen=None):
        handler = block_handler(lambda: self.mem.flat_shapes(h.shape[0]))
        if handler is not None:  # context parallelism: the memory state from the previous cp rank
            return handler(self.run, h, cos, sin, doc_ids=doc_ids)
        return self.run(h, cos, sin, doc_ids=doc_ids)

    def run(self, h, cos, sin, doc_ids=None, initial_state=None, return_final_state=False):
        """The segments of h (B, T, d) from the memory state `initial_state` (flat, context.py; None:
        M_0) -> out (B, T, d) [, the flat state after them]."""
        B, T, _ = h.shape
        fresh = self.mem.fresh_state(B, h)
        state, outs = fresh if initial_state is None else self.mem.unflatten(initial_state), []
        for s0 in range(0, T, self.segment):
            seg = slice(s0, min(s0 + self.segment, T))
            ids = doc_ids[:, seg] if doc_ids is not None else None
            if ids is not None and s0 > 0:  # a document starting with the segment starts from M_0
                state = _rows(doc_ids[:, s0] != doc_ids[:, s0 - 1], fresh, state)
            y = self._segment(h[:, seg], cos[:, seg], sin[:, seg], state, fresh, ids)
            m, state = self.mem.run(self.mem.inputs(y), initial_state=state, doc_ids=ids, return_state=True)
            outs.append(y * torch.sigmoid(self.mem.project_out(m)))
        out = torch.cat(outs, 1)
        return (out, flatten(state)) if return_final_state else out

    # ---- decoding: (memory at the segment's start, the memory's DecodeState, the segment's tokens so far)
    def prefill(self, h, cos, sin):
        B, T, _ = h.shape
        start = (T - 1) // self.segment * self.segment  # the last (maybe partial) segment's start
        state, outs = self.mem.fresh_state(B, h), []
        for s0 in range(0, T, self.segment):
            seg = slice(s0, min(s0 + self.segment, T))
            y = self._segment(h[:, seg], cos[:, seg], sin[:, seg], state, state, None)
            if s0 < start:
                m, state = self.mem.run(self.mem.inputs(y), initial_state=state, return_state=True)
            else:  # the memory's decoding state: its last chunk boundary and the tokens since
                m, dstate = self.mem.prefill(self.mem.inputs(y), state)
            outs.append(y * torch.sigmoid(self.mem.project_out(m)))
        return torch.cat(outs, 1), (state, dstate, h[:, start:], cos[:, start:], sin[:, start:])

    def step(self, h, state, cos, sin):
        seg_state, dstate, hs, cs, ss = state
        if hs.shape[1] == self.segment:  # the previous token closed a segment: the next one starts here
            seg_state, hs, cs, ss = dstate.boundary, hs[:, :0], cs[:, :0], ss[:, :0]
        hs, cs, ss = torch.cat([hs, h], 1), torch.cat([cs, cos], 1), torch.cat([ss, sin], 1)
        y = self._segment(hs, cs, ss, seg_state, seg_state, None)[:, -1:]  # recomputed over the segment so far
        m, dstate = self.mem.step(self.mem.inputs(y), dstate)
        return y * torch.sigmoid(self.mem.project_out(m)), (seg_state, dstate, hs, cs, ss)


class MAGMixer(nn.Module):
    """Memory as a Gate: y = SWA(h) (persistent tokens + window), m = memory(h);
    out = gate_out(norm_y(y) * sigmoid(norm_m(m))) (eq. 26-28)."""

    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.window = cfg.window
        self.attn = PersistentAttention(cfg)
        self.mem = NeuralMemory(cfg)
        self.norm_y = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.norm_m = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.gate_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        self.attn.init_weights(std, out_std)
        self.mem.init_weights(std, out_std)
        self.norm_y.init_weights()
        self.norm_m.init_weights()
        nn.init.normal_(self.gate_out.weight, std=out_std)

    def join(self, y, m):
        return self.gate_out(self.norm_y(y) * torch.sigmoid(self.norm_m(self.mem.project_out(m))))

    def forward(self, h, cos, sin, doc_ids=None, cu_seqlens=None, max_seqlen=None):
        handler = block_handler(lambda: self.mem.flat_shapes(h.shape[0]) + self.attn.tail_shapes(h.shape[0],
                                                                                                 self.window))
        if handler is not None:  # context parallelism: memory state and window tail from the previous rank
            return handler(self.run_slice, h, cos, sin, doc_ids=doc_ids)
        y = self.attn(h, cos, sin, doc_ids, cu_seqlens, max_seqlen, window=self.window)
        return self.join(y, self.mem.run(self.mem.inputs(h), doc_ids=doc_ids))

    def run_slice(self, h, cos, sin, doc_ids=None, initial_state=None, return_final_state=True):
        """A cp slice from the flat state (memory, then the attention tail; context.py) the previous
        rank ended with (None on the first) -> (out, the flat state this slice ends with)."""
        mem_state, tail = split_state(self.mem, initial_state)
        y, tail = self.attn.forward_tail(h, cos, sin, doc_ids, self.window, tail)
        m, final = self.mem.run(self.mem.inputs(h), initial_state=mem_state, doc_ids=doc_ids, return_state=True)
        return self.join(y, m), (*flatten(final), *tail)

    def prefill(self, h, cos, sin):
        y, cache = self.attn.prefill(h, cos, sin, self.window)
        m, dstate = self.mem.prefill(self.mem.inputs(h))
        return self.join(y, m), (cache, dstate)

    def step(self, h, state, cos, sin):
        cache, dstate = state
        y, cache = self.attn.step(h, cache, cos, sin, self.window)
        m, dstate = self.mem.step(self.mem.inputs(h), dstate)
        return self.join(y, m), (cache, dstate)


class MALBlock(TitansBlock):
    """Memory as a Layer: x + memory(norm_mem(x)), then x + SWA(norm(x)), then the FFN (eq. 29-31)."""

    kind = "mal"

    def __init__(self, cfg: TitansConfig, index: int = 0):
        super().__init__()
        self.window = cfg.window
        self.norm_mem = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mem = NeuralMemory(cfg)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = PersistentAttention(cfg)
        self.norm_ffn = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_ffn(cfg, index)

    def forward(self, x, cos, sin, doc_ids=None, cu_seqlens=None, max_seqlen=None, **router):
        handler = block_handler(lambda: self.mem.flat_shapes(x.shape[0]) + self.attn.tail_shapes(x.shape[0],
                                                                                                 self.window))
        if handler is not None:  # context parallelism: memory state and window tail from the previous rank
            if isinstance(self.mem.q_proj.weight, DTensor):  # run_slice calls mem and attn past their TP wrappers
                raise NotImplementedError("Titans MAL under context parallelism with tensor parallelism is not "
                                          "implemented (mac and mag are); use tp = 1 or cp = 1")
            return self.add_ffn(handler(self.run_slice, x, cos, sin, doc_ids=doc_ids), **router)
        x = x + self.mem(self.norm_mem(x), doc_ids)
        return self.add_ffn(x + self.attn(self.norm(x), cos, sin, doc_ids, cu_seqlens, max_seqlen, window=self.window),
                            **router)

    def run_slice(self, x, cos, sin, doc_ids=None, initial_state=None, return_final_state=True):
        """The memory and attention branches of a cp slice (as MAGMixer.run_slice) -> (x after both,
        the flat state this slice ends with)."""
        mem_state, tail = split_state(self.mem, initial_state)
        m, final = self.mem.run(self.mem.inputs(self.norm_mem(x)), initial_state=mem_state, doc_ids=doc_ids,
                                return_state=True)
        x = x + self.mem.project_out(m)
        y, tail = self.attn.forward_tail(self.norm(x), cos, sin, doc_ids, self.window, tail)
        return x + y, (*flatten(final), *tail)

    def prefill(self, x, cos, sin, **router):
        m, dstate = self.mem.prefill(self.mem.inputs(self.norm_mem(x)))
        x = x + self.mem.project_out(m)
        y, cache = self.attn.prefill(self.norm(x), cos, sin, self.window)
        return self.add_ffn(x + y, **router), (dstate, cache)

    def step(self, x, state, cos, sin, **router):
        dstate, cache = state
        m, dstate = self.mem.step(self.mem.inputs(self.norm_mem(x)), dstate)
        x = x + self.mem.project_out(m)
        y, cache = self.attn.step(self.norm(x), cache, cos, sin, self.window)
        return self.add_ffn(x + y, **router), (dstate, cache)


def build_block(cfg: TitansConfig, index: int = 0) -> nn.Module:
    """The block of config.variant at depth `index` (its MoE metrics are named by it)."""
    if cfg.variant == "mal":
        return MALBlock(cfg, index)
    return MixerBlock(cfg, MACMixer(cfg) if cfg.variant == "mac" else MAGMixer(cfg), index)
