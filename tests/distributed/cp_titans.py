"""Context parallelism of Titans by serial state passing: the memory kernel (weights, momentum and
the Omega window passed rank to rank) and whole MAC / MAG / MAL models (the memory state and the
sliding window's tail) against the single-process run -- outputs, final states, loss and every
gradient -- on rows whose documents end inside chunks and slices and start at a slice start.
Run inside test_context_parallel_titans.py's spawns at cp = 2 and 4."""

import copy

import torch
import torch.distributed as dist

from tests.distributed.test_context_parallel import DOCS, T, packed_batch, rel
from undertow.kernels.context import active
from undertow.kernels.titans_memory import MemoryState, UpdateRule, titans_memory
from undertow.models.common.loss import lm_loss_sum
from undertow.models.registry import build_model
from undertow.models.titans.config import TitansConfig
from undertow.parallel.context import ContextParallel, all_reduce_gradients, apply_context_parallel, shard_batch
from undertow.parallel.mesh import ParallelDims

# T = 32: slices of 16 (cp 2) and 8 (cp 4), whole chunks of 4 and segments of 8; DOCS end at 5 and 29
# (inside chunks) and 16 (a slice start at cp 2 and 4)
RULES = {
    "mlp-momentum-clip": (2, UpdateRule(max_grad_norm=0.5)),
    "linear-huber-omega": (1, UpdateRule(loss="huber", huber_delta=0.3, window=3)),
}


def kernel_inputs(depth: int, rule: UpdateRule, rows=2, H=2, D=4):
    gen = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    dims = [D] + [2 * D] * (depth - 1) + [D]
    init = tuple(r(H, a, b) / a ** 0.5 for a, b in zip(dims[:-1], dims[1:]))
    gates = [torch.rand(rows, T, H, generator=gen) for _ in range(4)]
    gates[0] = 0.2 + 0.6 * gates[0]  # theta: strong and weak inner steps
    ins = {"q": unit(r(rows, T, H, D)), "k": unit(r(rows, T, H, D)), "v": r(rows, T, H, D), "theta": gates[0],
           "eta": gates[1], "alpha": 0.2 * gates[2], "gamma": gates[3] if rule.window > 1 else None}
    c = rule.window
    state = MemoryState(tuple(w.expand(rows, *w.shape) + 0.1 * r(rows, *w.shape) for w in init),
                        tuple(0.1 * r(rows, H, *w.shape[1:]) for w in init),
                        (unit(r(rows, c - 1, H, D)), r(rows, c - 1, H, D), torch.rand(rows, c - 1, H, generator=gen))
                        if c > 1 else None)
    ids = torch.zeros(rows, T, dtype=torch.int32)
    for d, (start, end) in enumerate(DOCS):
        ids[0, start:end] = d
    cot = r(rows, T, H, D)
    final_cot = [r(*w.shape) for w in (*state.weights, *state.momentum)]
    return ins, init, state, ids, cot, final_cot


def run_kernel(depth, rule, sl, last: bool):
    """The kernel on tokens `sl` -> y, final state, the gradients of every input (full-size tensors)."""
    ins, init, state, ids, cot, final_cot = kernel_inputs(depth, rule)
    leaves = {n: t.clone().requires_grad_() for n, t in ins.items() if t is not None}
    init = tuple(w.clone().requires_grad_() for w in init)
    start = MemoryState(*(tuple(x.clone().requires_grad_() for x in part) if part is not None else None
                          for part in state))
    args = [leaves[n][:, sl] for n in ("q", "k", "v", "theta", "eta", "alpha")]
    gamma = leaves["gamma"][:, sl] if "gamma" in leaves else None
    y, final = titans_memory(*args, init, gamma=gamma, rule=rule, chunk_size=4, initial_state=start,
                             doc_ids=ids[:, sl], return_final_state=True, backend="chunked")
    loss = (y * cot[:, sl]).sum()
    if last:
        loss = loss + sum((f * c).sum() for f, c in zip((*final.weights, *final.momentum), final_cot))
    loss.backward()
    starts = [x for part in start if part is not None for x in part]
    grads = [t.grad for t in leaves.values()] + [w.grad for w in init]
    grads += [x.grad if x.grad is not None else torch.zeros_like(x) for x in starts]
    return y.detach(), [f.detach() for f in (*final.weights, *final.momentum)], grads


def check_kernel(rank, world) -> dict:
    cp = ContextParallel(dist.group.WORLD)
    length = T // world
    sl, last = slice(rank * length, (rank + 1) * length), rank == world - 1
    out = {}
    for name, (depth, rule) in RULES.items():
        y_full, final_full, grads_full = run_kernel(depth, rule, slice(None), True)
        with active(cp):
            y, final, grads = run_kernel(depth, rule, sl, last)
        for g in grads:  # each rank holds its slice's part of every gradient: the sum is the whole
            dist.all_reduce(g)
        out[name] = {"y": rel(y, y_full[:, sl]),
                     "final": max(rel(a, b) for a, b in zip(final, final_full)) if last else 0.0,
                     "grads": [rel(a, b) for a, b in zip(grads, grads_full)]}
    ins, init, *_ = kernel_inputs(1, UpdateRule())
    try:  # a slice that cuts a chunk is refused before anything is sent
        with active(cp):
            titans_memory(*(ins[n][:, :6] for n in ("q", "k", "v", "theta", "eta", "alpha")), init, chunk_size=4)
        out["misuse"] = "not refused"
    except ValueError as error:
        out["misuse"] = str(error)
    return out


BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, mem_heads=2, chunk_size=4, segment_len=8, window=6,
            persistent_tokens=2, ffn_hidden=48, max_lr=0.5)
MODELS = {
    "mac": TitansConfig(**BASE, variant="mac"),
    "mag": TitansConfig(**BASE, variant="mag", mem_depth=1),
    "mal": TitansConfig(**{**BASE, "persistent_tokens": 0}, variant="mal", omega_window=2),
}


def _loss_and_grads(model, batch):
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
    loss = lm_loss_sum(logits, batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)  # an empty persistent
                           for n, p in model.named_parameters()}


def check_models(rank, world) -> dict:
    """Every variant at cp 2; MAG alone at cp 4 (its memory state and window tail through a chain of
    four ranks; 4 processes on a small machine cost the most)."""
    group = ParallelDims(cp=world).build_mesh("cpu")["cp"]
    batch = packed_batch()
    out = {}
    for name, cfg in MODELS.items():
        if world > 2 and name != "mag":
            continue
        torch.manual_seed(0)
        model = build_model(copy.deepcopy(cfg))
        model.init_weights()
        plain = copy.deepcopy(model)
        ref_loss, ref_grads = _loss_and_grads(copy.deepcopy(model), batch)
        cp = apply_context_parallel(model, group)
        local = shard_batch(batch, cp.rank, cp.world)
        loss, _ = _loss_and_grads(model, local)
        all_reduce_gradients(model, cp.group)
        total = loss.clone()
        dist.all_reduce(total, group=cp.group)
        alone = _loss_and_grads(plain, local)[1]  # the same slices passing nothing: how far off that is
        for grad in alone.values():
            dist.all_reduce(grad, group=cp.group)
        out[name] = {"loss": rel(total, ref_loss), "alone": max(rel(alone[n], ref_grads[n]) for n in ref_grads),
                     "grads": {n: rel(p.grad if p.grad is not None else torch.zeros_like(p), ref_grads[n])
                               for n, p in model.named_parameters()}}
    return out


def check(rank, world) -> dict:
    return {"kernel": check_kernel(rank, world), "models": check_models(rank, world)}
