"""Adaptive computation time (Graves 2016) over the Universal Transformer's shared block.

Per position, at step n = 1 .. max_steps, with the state s_n (after the step's timing signal):
    p_n      = sigmoid(W s_n + b)                 halting unit, b initialised to 1
    running  = the position has not halted yet
    halts    = running and h + p_n > 1 - eps      (or n = max_steps: everyone left halts)
    R        = 1 - h                              remainder, for the positions halting now
    w_n      = p_n (still running) | R (halting now) | 0 (halted before)
    h       += w_n;  N += 1 while running
    s_{n+1}  = block(s_n) where running, s_n where halted before (halted positions stop changing)
    output   = sum_n w_n * block(s_n)             the halting-weighted sum of states
Ponder cost N + R per position; tau * mean(N + R) joins the loss through models/common/aux.py
(gradient through R only: N is a count). Every step runs on every position with masks, so shapes
and control flow never depend on the data (compile, FSDP and pipeline stages see one graph).
"""

from __future__ import annotations

import torch
from torch import nn

from undertow.models.common.aux import add_aux_loss, record_metric
from undertow.models.depth.blocks import step_timing_signal
from undertow.models.depth.config import DepthConfig
from undertow.models.depth.replicated import replicated_as_local
from undertow.models.transformer.model import TransformerBlock


class ACTLoop(nn.Module):
    """The Universal Transformer's whole depth: x (B, T, d_model) -> (B, T, d_model)."""

    def __init__(self, cfg: DepthConfig):
        super().__init__()
        self.max_steps, self.act, self.eps, self.tau = cfg.max_steps, cfg.act, cfg.act_eps, cfg.ponder_tau
        self.block = TransformerBlock(cfg.attention_config())
        self.halt = nn.Linear(cfg.d_model, 1)

    def init_weights(self, std: float, out_std: float) -> None:
        self.block.init_weights(std, out_std)
        nn.init.normal_(self.halt.weight, std=std)
        nn.init.constant_(self.halt.bias, 1.0)  # start with a bias to halt early (the paper's init)

    def forward(self, x, cos, sin, doc_ids=None, cu_seqlens=None, max_seqlen=None, position_ids=None):
        with replicated_as_local(self):  # under TP: plain tensors throughout the loop (replicated.py)
            return self._loop(x, cos, sin, doc_ids, cu_seqlens, max_seqlen)

    def _loop(self, x, cos, sin, doc_ids, cu_seqlens, max_seqlen):
        def apply_block(n, state):
            out = self.block(state, cos, sin, doc_ids, cu_seqlens, max_seqlen)
            return out[0] if self.block.is_moe else out  # an MoE block (linear router): (x, None)

        return self.run_steps(x, apply_block)

    def run_steps(self, x, apply_block):
        """The loop over depth with the block applied as `apply_block(n, state)` at step n: the block
        over the sequence in training, one cached position at a time in decoding (ut_generate.py), so
        both run the same ACT arithmetic."""
        timing = step_timing_signal(self.max_steps, x.shape[-1], x.device).to(x.dtype)
        if not self.act:  # a plain shared-weight loop of max_steps steps
            for n in range(self.max_steps):
                x = apply_block(n, x + timing[n])
            return x
        B, T, _ = x.shape
        halting = x.new_zeros(B, T, dtype=torch.float32)   # h: halting sum so far
        remainder = x.new_zeros(B, T, dtype=torch.float32)  # R
        updates = x.new_zeros(B, T, dtype=torch.float32)    # N
        running = x.new_ones(B, T, dtype=torch.float32)     # 1 until the position halts (a mask, not h < 1:
        # h + (1 - h) need not round to exactly 1.0)
        out = torch.zeros_like(x)
        state = x
        for n in range(self.max_steps):
            state = state + running.unsqueeze(-1).to(x.dtype) * timing[n]  # halted states stay as they are
            p = torch.sigmoid(self.halt(state).float()).squeeze(-1)
            if n == self.max_steps - 1:
                halts = running
            else:
                halts = ((halting + p * running) > 1.0 - self.eps).float() * running
            still = running - halts
            new_remainder = halts * (1.0 - halting)
            weight = p * still + new_remainder
            remainder = remainder + new_remainder
            halting = halting + weight
            updates = updates + running
            new_state = apply_block(n, state)  # on every position, halted ones too (their keys/values)
            out = out + weight.unsqueeze(-1).to(x.dtype) * new_state
            state = torch.where(running.unsqueeze(-1) > 0, new_state, state)
            running = still
        ponder = updates + remainder
        record_metric("act/ponder", ponder.mean())
        record_metric("act/steps", updates.mean())
        return add_aux_loss(out, self.tau * ponder.mean())
