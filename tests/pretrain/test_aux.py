"""Aux losses and metrics added from inside a forward (models/common/aux.py) through the Trainer."""

import json
import os

import pytest
import torch

from undertow.models.common.aux import add_aux_loss, collect_aux, record_metric
from undertow.models.common.loss import IGNORE_INDEX, lm_loss_sum
from undertow.pretrain.trainer import Trainer

from .helpers import tiny_config

COEF = 0.3


def test_add_aux_loss_is_identity_forward_and_adds_the_scaled_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    with collect_aux(loss_scale=0.25) as step:
        y = add_aux_loss(x * 2, (w ** 2).sum())
        record_metric("m", torch.tensor(2.0))
        record_metric("m", 4.0)
    assert torch.equal(y, x * 2)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    torch.testing.assert_close(w.grad, 0.25 * 2 * w.detach())
    assert step.means() == {"m": 3.0}
    with torch.no_grad():  # eval: neither the loss nor the metric
        assert add_aux_loss(x, (w ** 2).sum()) is x
    record_metric("outside", 1.0)  # no collector: ignored


def _hook_aux(model):
    """Every block adds COEF * mean(out^2) as an aux loss and records it."""
    def hook(module, args, out):
        aux = out.float().pow(2).mean()
        record_metric("test/aux", aux)
        return add_aux_loss(out, COEF * aux)
    for block in model.layers:
        block.register_forward_hook(hook)


def test_trainer_adds_aux_losses_once_per_step_and_logs_them(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", training__grad_accum_steps=2, checkpoint__resume="none",
                                  training__steps=1, logging__every=1,
                                  schedule__warmup_steps=0))
    model = trainer.model
    batch = next(iter(trainer.train_loader))
    halves = [{k: v[:2] for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")},
              {k: v[2:] for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")}]

    # the expected gradient: token-mean LM loss of the step + COEF * the aux averaged over the forwards
    n_labels = sum(int((h["labels"] != IGNORE_INDEX).sum()) for h in halves)
    objective, aux_values = 0.0, []
    for h in halves:
        hidden = {}
        hooks = [b.register_forward_hook(lambda m, a, o, i=i: hidden.__setitem__(i, o)) for i, b in
                 enumerate(model.layers)]
        logits = model(h["input_ids"], **{k: h[k] for k in ("position_ids", "doc_ids") if k in h})
        for hk in hooks:
            hk.remove()
        aux = sum(o.float().pow(2).mean() for o in hidden.values())
        aux_values += [float(o.detach().float().pow(2).mean()) for o in hidden.values()]
        objective = objective + lm_loss_sum(logits, h["labels"]) / n_labels + COEF * aux / len(halves)
    grads = torch.autograd.grad(objective, [p for p in model.parameters()])
    expected = [g.clone() for g in grads]
    model.zero_grad(set_to_none=True)

    _hook_aux(model)
    trainer.train_step(halves)
    for (name, p), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert trainer.aux_metrics == {"test/aux": pytest.approx(sum(aux_values) / len(aux_values), rel=1e-5)}

    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.fit()
    with open(os.path.join(tmp_path / "run", "metrics.jsonl")) as f:
        kinds = [json.loads(line) for line in f]
    assert any(r["kind"] == "aux" and r["step"] == 1 and r["test/aux"] > 0 for r in kinds)
