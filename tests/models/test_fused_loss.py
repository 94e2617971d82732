"""The fused head loss (models/common/fused_loss.py): the value and every gradient of the unfused
head + soft-cap + cross-entropy, for the op, every family's model and the trainer's step. The op's
tests run on CUDA where there is one (scripts/gpu_check.sh runs this file)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.pretrain.helpers import tiny_config
from undertow.kernels import native
from undertow.kernels.cross_entropy import native as native_xent
from undertow.models.common.fused_loss import LMHead, head_loss_sum
from undertow.models.common.loss import IGNORE_INDEX, lm_loss_sum
from undertow.models.registry import build_model
from undertow.pretrain.config import load_config
from undertow.pretrain.trainer import Trainer


def unfused(hidden, weight, labels, cap):
    z = (hidden @ weight.t()).float()
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=["native", "native-2-threads", "torch"])
def chunk_path(request, monkeypatch):
    """The chunk's loss and gradient by the native loop (kernels/cross_entropy, CPU; on two torch
    threads in pieces where the library shares torch's OpenMP runtime) or PyTorch's ops; where it
    applies the native one must really run (a library that failed to build fails the test)."""
    if request.param == "torch":
        monkeypatch.setattr(native_xent, "ENABLED", False)
        yield request.param
        return
    if DEVICE != "cpu" or native.find_compiler() is None:
        pytest.skip("the native loop is CPU's, built by a C++ compiler")
    calls = []
    real = native_xent.rows_loss

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(native_xent, "rows_loss", counted)
    threads = torch.get_num_threads()
    two = request.param == "native-2-threads"
    torch.set_num_threads(2 if two else 1)
    try:
        yield request.param
    finally:
        torch.set_num_threads(threads)
    if two and native.torch_openmp() is None:
        assert not any(calls)  # several threads and no shared OpenMP runtime: PyTorch's ops
    else:
        assert calls and all(calls), native.unavailable_reason(native_xent.NAME)


def inputs(dtype=torch.float32, rows=37, vocab=50, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, rows, d, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
    weight = torch.randn(vocab, d, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
    labels = torch.randint(0, vocab, (3, rows), generator=gen).to(DEVICE)
    labels[0, :5] = IGNORE_INDEX  # not counted: no loss, no gradient
    return hidden, weight, labels


@pytest.mark.parametrize("cap", [None, 30.0, 2.0], ids=["no-cap", "cap30", "cap2"])
@pytest.mark.parametrize("rows", [16, 111, None], ids=["chunks-of-16", "one-chunk", "default"])
def test_loss_and_gradients_equal_the_unfused_head(cap, rows, chunk_path):
    hidden, weight, labels = inputs()
    ref = unfused(hidden, weight, labels, cap)
    ref_grads = torch.autograd.grad(ref * 0.7, (hidden, weight))  # the incoming gradient scales both
    out = head_loss_sum(hidden, weight, labels, cap, rows=rows)
    grads = torch.autograd.grad(out * 0.7, (hidden, weight))
    assert out.dtype == torch.float32 and out.shape == ()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-4)
    for g, r in zip(grads, ref_grads):  # DESIGN.md's float32 tolerance (the native exp and tanh: ~1e-7 each)
        assert rel(g, r) < 1e-5
        torch.testing.assert_close(g, r, rtol=1e-4, atol=2e-5)
    assert grads[0][0, :5].abs().max() == 0  # ignored labels: no gradient
    with torch.no_grad():  # validation: the loss alone
        torch.testing.assert_close(head_loss_sum(hidden, weight, labels, cap, rows=rows), ref, rtol=1e-6, atol=1e-4)


def test_gradients_only_where_asked(chunk_path):
    hidden, weight, labels = inputs()
    frozen = weight.detach()
    (g,) = torch.autograd.grad(head_loss_sum(hidden, frozen, labels, 30.0, rows=16), (hidden,))
    (r,) = torch.autograd.grad(unfused(hidden, frozen, labels, 30.0), (hidden,))
    assert rel(g, r) < 1e-5


@pytest.mark.parametrize("cap", [None, 30.0])
def test_large_logits_and_a_non_finite_one(cap, chunk_path):
    """Logits in the hundreds (the soft-cap's saturated range; without a cap, exp's overflow range
    unless the max is taken out) give the unfused loss and gradients; a NaN logit makes the loss NaN."""
    hidden, weight, labels = inputs(vocab=70)
    with torch.no_grad():
        hidden.mul_(12.0)
    ref = unfused(hidden, weight, labels, cap)
    out = head_loss_sum(hidden, weight, labels, cap, rows=16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)
    for g, r in zip(torch.autograd.grad(out, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        assert rel(g, r) < 1e-5
    with torch.no_grad():
        weight[3, 0] = float("nan")
        assert torch.isnan(head_loss_sum(hidden, weight, labels, cap, rows=16))


def test_a_label_outside_the_vocabulary_is_refused(chunk_path):
    hidden, weight, labels = inputs()
    labels[1, 7] = 50  # vocab 50: labels 0..49
    with pytest.raises((IndexError, RuntimeError)):
        head_loss_sum(hidden, weight, labels, 30.0, rows=16)


def test_autocast_bfloat16_follows_the_unfused_head():
    hidden, weight, labels = inputs(rows=64, vocab=300, d=32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ref = unfused(hidden, weight, labels, 30.0)
        out = head_loss_sum(hidden, weight, labels, 30.0, rows=40)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    grads = torch.autograd.grad(out, (hidden, weight))
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=0)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype == torch.float32
        assert ((g - r).norm() / r.norm()).item() < 2e-2  # bf16 matmuls on both sides, rounded differently


def test_bad_input_is_refused():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match="leading dimensions"):
        head_loss_sum(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="soft_cap must be > 0"):
        head_loss_sum(hidden, weight, labels, 0.0)
    with pytest.raises(ValueError, match="without bias"):
        LMHead(16, 50, bias=True)(hidden, labels=labels)


RECIPES = ["tiny", "tiny-mamba", "tiny-mamba2", "tiny-xlstm", "tiny-xlstm-hybrid", "tiny-hybrid", "tiny-rmoe",
           "tiny-depth", "tiny-ut", "tiny-titans-mac", "tiny-paragru", "tiny-paralstm"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_family_returns_the_loss_of_its_logits(recipe):
    """model(ids, labels=...) is lm_loss_sum(model(ids), labels), value and every gradient (xLSTM: with
    its logit soft-cap; Mamba: the head in the weight's dtype)."""
    cfg = load_config(recipe, [])
    cfg.model.vocab_size = 97
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.init_weights()
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 97, (2, 32), generator=gen), torch.randint(0, 97, (2, 32), generator=gen)
    labels[0, :3] = IGNORE_INDEX
    torch.manual_seed(2)  # a drawn depth or dropout draws the same on both
    ref = lm_loss_sum(model(ids), labels)
    ref.backward()
    torch.manual_seed(2)
    out = twin(ids, labels=labels)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-4)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        err = ((q.grad - p.grad).norm() / p.grad.norm().clamp_min(1e-12)).item()
        assert err < 1e-5, (name, err)


def test_the_trainer_step_is_the_same_fused_or_not(tmp_path):
    """One step of the tiny run with training.fused_loss on (the default) and off: loss, gradient
    norm, every gradient, and the validation loss after the AdamW step."""
    fused = Trainer(tiny_config(tmp_path / "fused", checkpoint__resume="none"))
    plain = Trainer(tiny_config(tmp_path / "plain", checkpoint__resume="none", training__fused_loss="false"))
    assert fused.fused_loss and not plain.fused_loss
    batch = next(iter(fused.train_loader))
    results = [t.train_step([batch]) for t in (fused, plain)]
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    for (name, p), q in zip(fused.model.named_parameters(), plain.model.parameters()):
        assert ((p.grad - q.grad).norm() / q.grad.norm()).item() < 1e-5, name
    for t in (fused, plain):
        t.optimizer.step()
    assert fused.validate() == pytest.approx(plain.validate(), rel=1e-5)
