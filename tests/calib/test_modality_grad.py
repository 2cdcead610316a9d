"""MBQ's modality sensitivity and the tokens' gradient saliency, against an independent autograd computation."""

from __future__ import annotations

import pytest
import torch

from quantlab.calib.executor import CalibSample
from quantlab.calib.modality_grad import block_gradient_ratios, median_floor, text_loss, token_importance
from quantlab.models import Component, get_adapter
from quantlab.models.load import LoadedModel
from tests.conftest import IMG, TINY_BUILDERS, tiny_inputs


def _samples(family: str, n: int = 3) -> list[CalibSample]:
    torch.manual_seed(5)  # tiny_inputs draws the pixels
    out = []
    for i in range(n):
        x = tiny_inputs(family, batch=1)
        out.append(CalibSample(f"s{i}", x, x["input_ids"][0] == IMG))
    return out


def _reference(model, adapter, samples) -> list[float]:
    """Weights require grad, each block output keeps its .grad: the plain autograd route."""
    blocks = adapter.blocks(model, Component.DECODER)
    sums = torch.zeros(len(blocks), 2, dtype=torch.float64)
    for s in samples:
        outs = []

        def keep(module, args, out, outs=outs):
            out.retain_grad()
            outs.append(out)

        handles = [b.register_forward_hook(keep) for b in blocks]
        if hasattr(getattr(model, "model", None), "rope_deltas"):
            model.model.rope_deltas = None
        logits = model(**s.inputs, use_cache=False).logits
        text_loss(logits, s).backward()
        for h in handles:
            h.remove()
        image = s.image_mask.reshape(-1)
        for i, o in enumerate(outs):
            g = o.grad.reshape(-1, o.shape[-1]).abs()
            sums[i, 0] += float(g[image].mean())
            sums[i, 1] += float(g[~image].mean())
    model.zero_grad(set_to_none=True)
    return (sums[:, 0] / sums[:, 1]).tolist()


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_block_gradient_ratios_match_plain_autograd(family):
    model = TINY_BUILDERS[family]().eval()
    adapter = get_adapter(model)
    samples = _samples(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ratios = block_gradient_ratios(LoadedModel(model, None, adapter, family), samples)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # nothing allocated, flags back
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    expected = _reference(model, adapter, samples)
    assert len(ratios) == len(adapter.blocks(model, Component.DECODER))
    torch.testing.assert_close(torch.tensor(ratios), torch.tensor(expected), rtol=1e-4, atol=0)
    assert all(r > 0 for r in ratios)


def test_text_only_samples_are_refused():
    model = TINY_BUILDERS["llava"]().eval()
    x = {"input_ids": torch.tensor([[1, 10, 11, 12]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="image and text tokens"):
        block_gradient_ratios(LoadedModel(model, None, get_adapter(model), "x"),
                              [CalibSample("t", x, torch.zeros(4, dtype=torch.bool))])


def test_median_floor_follows_mbq():
    assert median_floor([0.1, 0.4, 0.2, 0.9]) == [0.30000000000000004, 0.4, 0.30000000000000004, 0.9]


def _input_grads(model, adapter, sample) -> list[torch.Tensor]:
    """``∂L/∂x`` at each block's input, (seq, hidden): weights require grad, inputs retain theirs."""
    blocks = adapter.blocks(model, Component.DECODER)
    ins = []

    def keep(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h.retain_grad()
        ins.append(h)

    handles = [b.register_forward_pre_hook(keep, with_kwargs=True) for b in blocks]
    if hasattr(getattr(model, "model", None), "rope_deltas"):
        model.model.rope_deltas = None
    text_loss(model(**sample.inputs, use_cache=False).logits, sample).backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    return [h.grad[0] for h in ins]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_token_importance_is_the_normalised_gradient_saliency_at_each_block_input(family):
    """Per block and sample: mean over channels of |∂L/∂x| at the block's input, averaging 1 over the valid
    tokens, 0 on padding; compared with plain autograd (weights requiring grad, inputs retaining theirs)."""
    model = TINY_BUILDERS[family]().eval()
    adapter = get_adapter(model)
    samples = _samples(family, n=2)
    samples[1].inputs["attention_mask"][0, :2] = 0  # two padding tokens
    got = token_importance(LoadedModel(model, None, adapter, family), samples)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert sorted(got) == list(range(len(adapter.blocks(model, Component.DECODER))))
    for s in samples:
        valid = s.valid_mask.float()
        for i, g in enumerate(_input_grads(model, adapter, s)):
            sal = g.abs().mean(-1) * valid
            torch.testing.assert_close(got[i][s.id], sal / (sal.sum() / valid.sum()), rtol=1e-4, atol=1e-7)
            assert float(got[i][s.id][valid.bool()].mean()) == pytest.approx(1.0, rel=1e-5)
            assert not bool(got[i][s.id][~valid.bool()].any())
