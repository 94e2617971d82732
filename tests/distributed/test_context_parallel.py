"""Context parallelism in gloo process groups against the single-process run: kernels with an
initial state and any batch size (the mLSTM's log-space state combine: cp_mlstm.py; the sLSTM's
serial passing: cp_slstm.py; ParaRNN's Newton systems spanning the ranks: cp_pararnn.py), and
whole models (Mamba-1, Mamba-2, a hybrid with attention and MLP layers, the transformer) — loss
and every parameter gradient, on rows whose documents end inside slices, at a slice start and span
whole slices."""

import copy

import pytest
import torch
import torch.distributed as dist

from tests.distributed import cp_mlstm, cp_pararnn, cp_slstm
from tests.distributed.harness import run_distributed
from undertow.kernels.causal_conv1d import causal_conv1d
from undertow.kernels.selective_scan import selective_scan
from undertow.kernels.ssd import ssd
from undertow.models.common.loss import IGNORE_INDEX, lm_loss_sum
from undertow.models.mamba.config import MambaConfig
from undertow.models.registry import build_model
from undertow.models.transformer.config import TransformerConfig
from undertow.parallel.context import (
    ContextParallel,
    all_reduce_gradients,
    apply_context_parallel,
    reduce_loss,
    shard_batch,
)
from undertow.parallel.context_comm import COUNTER
from undertow.kernels.context import active
from undertow.parallel.mesh import ParallelDims

T = 32  # 8 tokens per rank at cp=4: boundaries at 5 and 29 fall inside slices, 16 at a slice start
DOCS = [(0, 5), (5, 16), (16, 29), (29, 32)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def packed_batch(rows: int = 2, vocab: int = 64) -> dict:
    """A loader-like batch: row 0 packs four documents, row 1 is one document."""
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, vocab, (rows, T), generator=gen)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    position_ids = torch.arange(T).repeat(rows, 1)
    doc_ids = torch.zeros(rows, T, dtype=torch.int32)
    for d, (start, end) in enumerate(DOCS):
        labels[0, end - 1] = IGNORE_INDEX  # the pair across a boundary is not a label
        position_ids[0, start:end] = torch.arange(end - start)
        doc_ids[0, start:end] = d
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids,
            "cu_seqlens": torch.tensor([0, 5, 16, 29, 32, 64], dtype=torch.int32), "max_seqlen": 16}


MAMBA = {"vocab_size": 64, "d_model": 32, "d_state": 8, "expand": 2, "headdim": 16, "chunk_size": 4, "n_heads": 4,
         "n_kv_heads": 2, "multiple_of": 16, "dt_min": 0.001, "dt_max": 0.01}  # small steps: states carry far
MODELS = {
    "mamba1": MambaConfig(layer_pattern="mm", **MAMBA),
    "mamba2": MambaConfig(layer_pattern="MM", **MAMBA),
    "hybrid": MambaConfig(layer_pattern="M*-m", **MAMBA),
    "transformer": TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16),
}


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict]:
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
    loss = lm_loss_sum(logits, batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _models_under_cp(rank, world):
    group = ParallelDims(cp=world).build_mesh("cpu")["cp"]
    batch = packed_batch()
    results = {}
    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        model = build_model(copy.deepcopy(cfg))
        model.init_weights()
        plain = copy.deepcopy(model)
        ref_loss, ref_grads = _loss_and_grads(copy.deepcopy(model), batch)
        cp = apply_context_parallel(model, group)
        local = shard_batch(batch, cp.rank, cp.world)
        loss, _ = _loss_and_grads(model, local)
        all_reduce_gradients(model, cp.group)
        total = reduce_loss(loss, cp.group)
        # The same slices without CP: how far off the gradients of a run that passed nothing would be.
        alone = _loss_and_grads(plain, local)[1]
        for grad in alone.values():
            dist.all_reduce(grad, group=cp.group)
        results[name] = {
            "loss": rel(total, ref_loss),
            "alone": max(rel(alone[n], ref_grads[n]) for n in ref_grads),
            "grads": {n: rel(p.grad, ref_grads[n]) for n, p in model.named_parameters()},
        }
    return results


def _all_checks(rank, world):
    """One spawn per world size runs every check (starting processes costs more than the checks)."""
    return {"kernels": _kernels_under_cp(rank, world, rows=3 if world == 2 else 1),
            "mlstm": cp_mlstm.check(rank, world),
            "slstm": cp_slstm.check(rank, world),
            "pararnn": cp_pararnn.check(rank, world),
            "models": _models_under_cp(rank, world),
            "misuse": _misuse(rank, world)}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"cp{w}")
def cp_results(request) -> list[dict]:
    """Per rank, the results of `_all_checks` at cp = 2 and 4."""
    return run_distributed(_all_checks, request.param)


def test_models_match_the_single_process_run(cp_results):
    for rank_results in cp_results:
        for name, res in rank_results["models"].items():
            assert res["loss"] < 1e-5, (name, res["loss"])
            bad = {n: e for n, e in res["grads"].items() if not e < 1e-4}
            assert not bad, (name, bad)
            assert res["alone"] > 1e-2, (name, "slices run alone should differ", res["alone"])


def _kernel_inputs(rows: int, gen: torch.Generator) -> dict:
    r = lambda *s: torch.randn(*s, generator=gen)
    H, P, G, N, Dc, K = 4, 3, 2, 5, 6, 4
    ids = torch.zeros(rows, T, dtype=torch.int32)
    for d, (start, end) in enumerate(DOCS):
        ids[0, start:end] = d
    return {
        "ssd": (ssd, (r(rows, T, H, P), r(rows, T, H), -torch.rand(H, generator=gen) - 0.5, r(rows, T, G, N),
                      r(rows, T, G, N)),
                {"D": r(H), "dt_bias": r(H) * 0.1, "chunk_size": 4, "doc_ids": ids}, r(rows, H, P, N)),
        "selective_scan": (selective_scan, (r(rows, T, Dc), r(rows, T, Dc) - 2, -torch.rand(Dc, N, generator=gen),
                                            r(rows, T, N), r(rows, T, N)),
                           {"D": r(Dc), "z": r(rows, T, Dc), "delta_bias": r(Dc) * 0.1, "doc_ids": ids},
                           r(rows, Dc, N)),
        "causal_conv1d": (causal_conv1d, (r(rows, T, Dc), r(Dc, K), r(Dc)), {"doc_ids": ids}, r(rows, Dc, K - 1)),
    }


def _run_kernel(fn, args, kwargs, initial, sl, cotangent_y, cotangent_final):
    """Leaves for every float input, fn on tokens `sl`, backward; -> (y, final, grads)."""
    leaves = [a.clone().requires_grad_() for a in args]
    kw = {k: v.clone().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v
          for k, v in kwargs.items()}
    init = initial.clone().requires_grad_()
    timed = lambda t: t[:, sl] if torch.is_tensor(t) and t.dim() >= 2 and t.shape[:2] == args[0].shape[:2] else t
    y, final = fn(*[timed(a) for a in leaves], **{k: timed(v) for k, v in kw.items()}, initial_state=init,
                  return_final_state=True)
    ((y.float() * timed(cotangent_y)).sum() + (final * cotangent_final).sum()).backward()
    grads = [a.grad for a in leaves] + [v.grad for v in kw.values() if torch.is_tensor(v) and v.requires_grad]
    return y.detach(), final.detach(), grads, init.grad


def _kernels_under_cp(rank, world, rows):
    group = dist.group.WORLD
    cp = ContextParallel(group)
    length = T // world
    sl = slice(rank * length, (rank + 1) * length)
    results = {}
    for name, (fn, args, kwargs, initial) in _kernel_inputs(rows, torch.Generator().manual_seed(3)).items():
        gen = torch.Generator().manual_seed(4)
        y_ref = fn(*args, **kwargs)
        cot_y = torch.randn(y_ref.shape, generator=gen)
        cot_final = torch.randn(initial.shape, generator=gen)  # of the row's final state: the last rank's
        y_full, final_full, grads_full, init_full = _run_kernel(fn, args, kwargs, initial, slice(None),
                                                                cot_y, cot_final)
        COUNTER.reset()
        with active(cp):
            y, final, grads, init_grad = _run_kernel(fn, args, kwargs, initial, sl, cot_y,
                                                     cot_final * (rank == world - 1))
        init_grad = init_grad if init_grad is not None else torch.zeros_like(initial)  # read on rank 0 only
        calls = dict(COUNTER.calls)
        # Each rank holds the gradient of its own slice of the time inputs (the rest is zero) and its
        # part of the others': the sum over ranks is the full gradient.
        for g in grads:
            dist.all_reduce(g)
        dist.all_reduce(init_grad)
        results[name] = {
            "y": rel(y, y_full[:, sl]),
            "final": rel(final, final_full) if rank == world - 1 else 0.0,
            "grads": [rel(g, gf) for g, gf in zip(grads, grads_full)],
            "initial_grad": rel(init_grad, init_full),
            "calls": calls,
        }
    return results


def test_kernels_with_initial_state_match_the_full_scan(cp_results):
    for rank, rank_results in enumerate(cp_results):
        for name, res in rank_results["kernels"].items():
            assert res["y"] < 1e-5 and res["final"] < 1e-5, (name, rank, res)
            assert max(res["grads"]) < 1e-4 and res["initial_grad"] < 1e-4, (name, rank, res)
            # one all-gather forward (states) and one backward (their gradients)
            assert res["calls"] == {"all_gather": 2}, (name, res["calls"])


def test_mlstm_state_combine_matches_the_full_scan(cp_results):
    cp_mlstm.assert_matches([r["mlstm"] for r in cp_results])


def test_slstm_serial_passing_matches_the_full_scan(cp_results):
    cp_slstm.assert_matches([r["slstm"] for r in cp_results])


def test_pararnn_newton_spanning_the_ranks_matches_one_process(cp_results):
    cp_pararnn.assert_matches([r["pararnn"] for r in cp_results])


def _misuse(rank, world):
    from undertow.parallel.wrap import apply_activation_checkpointing

    errors = []
    model = build_model(copy.deepcopy(MODELS["mamba2"]))
    apply_activation_checkpointing(model)
    try:
        apply_context_parallel(model, dist.group.WORLD)
    except RuntimeError as e:
        errors.append(str(e))
    model = build_model(copy.deepcopy(MODELS["mamba2"]))
    model.init_weights()
    apply_context_parallel(model, dist.group.WORLD)
    for call in (lambda: model(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.zeros(1, 2, dtype=torch.long)),
                 lambda: model(torch.zeros(1, 8, dtype=torch.long))):
        try:
            call()
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_misuse_is_refused_with_a_reason(cp_results):
    errors = cp_results[0]["misuse"]
    assert "before activation checkpointing" in errors[0]
    assert "needs at least 3 tokens per cp rank, got 2" in errors[1]
    assert "global position_ids" in errors[2]


def test_shard_batch_keeps_global_positions_and_drops_cu_seqlens():
    batch = packed_batch()
    local = shard_batch(batch, 1, 4)
    assert local["input_ids"].shape == (2, 8) and "cu_seqlens" not in local and "max_seqlen" not in local
    assert local["position_ids"][0].tolist() == list(range(3, 11))  # document 1 runs from token 5
    assert local["doc_ids"][0].tolist() == [1] * 8
    no_positions = shard_batch({"input_ids": batch["input_ids"]}, 3, 4)
    assert no_positions["position_ids"][1].tolist() == list(range(24, 32))
    with pytest.raises(ValueError, match="multiple of the cp degree 3"):
        shard_batch(batch, 0, 3)
