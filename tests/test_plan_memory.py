"""The planner's memory model against what a CPU training step of a tiny model really allocates.

Parameters, gradients and AdamW states: the model's bytes must equal the bytes of the tensors a
real step leaves behind, exactly. Activations: the planner measures what autograd saves on the
meta device (profile.py); here the real forward + loss runs on CPU, and the memory the allocator
gets back when the loss (and with it autograd's graph) is dropped is read from the C allocator
itself (glibc's mallinfo2: bytes in use by malloc, heap and mmap). That knows nothing of autograd's
saved tensors, so it is an independent measure; it counts the release rather than the growth
during the forward so that unrelated frees in that window cannot skew it. The two must agree
within 25% (they agree within about 5% on these shapes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import pytest
import torch

from undertow.models import registry
from undertow.models.common.loss import lm_loss_sum
from undertow.planning.summary import model_facts
from undertow.planning.memory import Layout, Setup, stage_memory
from undertow.pretrain.config import load_config
from undertow.pretrain.optim import build_optimizer


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use():
    """Bytes malloc has handed out and not taken back (arena chunks + mmapped chunks), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        info = libc.mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    info.restype = _MallInfo2

    def in_use() -> int:
        m = info()
        return m.uordblks + m.hblkhd

    return in_use


def _tiny(recipe: str, seq_len: int):
    cfg = load_config(recipe, ["--data.seq_len", str(seq_len)])
    cfg.model.vocab_size = cfg.data.embedded_vocab_size
    return cfg


def _single_gpu(cfg, batch: int) -> Setup:
    return Setup(gpus=1, gpu_memory=1e12, seq_len=cfg.data.seq_len, global_batch=batch, micro_batch=batch,
                 mfu=0.4, peak_tflops=1.0, reserve=0.0)


@pytest.mark.parametrize("recipe", ["tiny-mamba2", "tiny", "tiny-hybrid"])
def test_weights_gradients_and_adamw_states_are_exact(recipe):
    cfg = _tiny(recipe, 64)
    facts = model_facts(cfg, 64, torch.float32, base_len=64)
    pieces = facts.profile.pieces
    predicted = stage_memory(Layout(), facts, _single_gpu(cfg, 2), pieces, list(range(len(facts.profile.blocks))), 1)

    torch.manual_seed(0)
    model = registry.get(cfg.family).model_cls(cfg.model)
    model.init_weights()
    optimizer = build_optimizer(model, cfg.optimizer, torch.device("cpu"))
    ids = torch.randint(0, cfg.model.vocab_size, (2, 64))
    lm_loss_sum(model(ids), ids).backward()
    optimizer.step()

    params = {id(p): p for p in model.parameters()}.values()
    nbytes = lambda t: t.numel() * t.element_size()
    real_states = sum(nbytes(t) for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    assert predicted["weights"] == sum(nbytes(p) for p in params)
    assert predicted["gradients"] == sum(nbytes(p.grad) for p in params)
    assert predicted["optimizer"] == real_states


@pytest.mark.parametrize(
    "recipe, batch, seq_len, fused", [("tiny-mamba2", 3, 128, False), ("tiny", 3, 128, False), ("tiny-mamba", 2, 48, False),
                                      ("tiny-hybrid", 2, 96, False), ("tiny", 3, 128, True), ("tiny-xlstm", 3, 128, True)]
)
def test_activation_memory_within_25_percent_of_a_real_cpu_forward(recipe, batch, seq_len, fused):
    """The profile's saved bytes against what a real forward's graph holds: the logits' loss, and the
    trainer's fused head loss (model(ids, labels=...))."""
    in_use = _malloc_in_use()
    if in_use is None:
        pytest.skip("needs glibc's mallinfo2 to read the allocator's bytes in use")
    cfg = _tiny(recipe, seq_len)
    # Profiled at 64 and 128 tokens (multiples of the tiny recipes' chunks), evaluated at the run's shape.
    profile = model_facts(cfg, seq_len, torch.float32, base_len=64).profile
    assert profile.fused_post is not None  # the recipes' default: training.fused_loss
    predicted = profile.saved_bytes(batch, seq_len, fused=fused)

    torch.manual_seed(0)
    model = registry.get(cfg.family).model_cls(cfg.model)
    model.init_weights()
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq_len))
    with torch.no_grad():  # first use: the library's lazy initializations, outside the measurement
        model(ids[:1])
    loss = model(ids, labels=ids) if fused else lm_loss_sum(model(ids), ids)
    gc.collect()
    holding = in_use()
    del loss  # drops autograd's graph and everything it saved for the backward
    gc.collect()
    released = holding - in_use()

    assert released > 0
    assert abs(predicted - released) / released < 0.25, (predicted, released)
