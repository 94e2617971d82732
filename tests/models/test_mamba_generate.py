import pytest
import torch

from tests.models.helpers import greedy_by_full_forwards

from undertow.models.mamba.generate import prefill, step
from tests.models.test_mamba import V, build, rel_err, tiny_cfg


@pytest.mark.parametrize("pattern, extra", [
    ("mm", dict(falcon_norm=True)),
    ("MM", {}),
    ("M*-m", {}),
    ("M*-m", dict(mlp="gelu", position_embedding="none")),  # NVIDIA's Mamba-2-Hybrid layers
], ids=["mm", "MM", "M*-m", "M*-m-gelu-nopos"])
def test_step_by_step_logits_match_the_full_forward(pattern, extra):
    model = build(tiny_cfg(pattern, **extra))
    ids = torch.randint(0, V, (2, 13))
    full = model(ids)
    prompt = 4
    with torch.no_grad():
        logits, states = prefill(model, ids[:, :prompt])
        assert rel_err(logits, full[:, prompt - 1]) <= 1e-5
        for t in range(prompt, ids.shape[1]):
            logits = step(model, ids[:, t], t, states)
            assert rel_err(logits, full[:, t]) <= 1e-5, t


@pytest.mark.parametrize("extra", [{}, dict(mlp="gelu", position_embedding="none")], ids=["swiglu-rope", "gelu-nopos"])
def test_greedy_generation_equals_argmax_of_repeated_full_forwards(extra):
    model = build(tiny_cfg("mM*-", **extra))
    prompt = torch.randint(0, V, (2, 5))
    generated = model.generate(prompt, max_new_tokens=6)
    assert torch.equal(generated, greedy_by_full_forwards(model, prompt, 6))


def test_sampling_is_seeded_and_checks_its_arguments():
    model = build(tiny_cfg("M*"))
    prompt = torch.randint(0, V, (1, 3))
    torch.manual_seed(5)
    a = model.generate(prompt, 4, greedy=False)
    torch.manual_seed(5)
    assert torch.equal(a, model.generate(prompt, 4, greedy=False))
    assert torch.equal(model.generate(prompt, 0), prompt)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)
