"""The shipped toy VLMs: they answer their task (shapes-VQA, or shapes-VQA-hard for the hard toys), and GPTQ
beats RTN on every decoder Linear."""

from __future__ import annotations

import json

import pytest
import torch

from quantlab.calib.collect import calibrate
from quantlab.calib.data import CalibDataOptions, build_calibration_set
from quantlab.eval.runner import evaluate
from quantlab.models import Component, load_model
from quantlab.models.load import ASSETS
from quantlab.quant import quantize_weight

TOYS = ["toy-llava", "toy-qwen2.5-vl"]


def _require(name: str) -> None:
    if not (ASSETS / name / "model.safetensors").is_file():
        pytest.skip(f"{name} is not built (make toys)")


@pytest.mark.parametrize("name", TOYS)
def test_toy_answers_shapes_vqa(name):
    _require(name)
    loaded = load_model(name)
    r = evaluate(loaded, ["shapes-vqa"], data_dir=None, limit=200).tasks["shapes-vqa"]
    assert r.score >= 0.90, r.per_type
    assert min(s.score for s in r.per_type.values()) >= 0.75, r.per_type
    recorded = json.loads((ASSETS / name / "training.json").read_text())
    assert recorded["test"]["accuracy"] >= 0.90


@pytest.mark.parametrize("name", TOYS)
def test_gptq_error_below_rtn_on_every_decoder_linear(name):
    _require(name)
    loaded = load_model(name)
    calib = build_calibration_set(loaded, CalibDataOptions(num_samples=32, alpha=0.5))
    stats = calibrate(loaded, calib, hessians=True, entropy=False, progress=False)
    linears = dict(loaded.adapter.iter_linears(loaded.model, Component.DECODER))
    assert len(linears) == 8 * 7
    for n, lin in linears.items():
        h = stats.hessians[n] / stats.hessian_weight[n]
        for bits in (2, 3, 4):
            g = 64 if bits == 2 else 128
            e_gptq = quantize_weight(lin.weight.data, "gptq", bits=bits, group_size=g, hessian=h).error
            e_rtn = quantize_weight(lin.weight.data, "rtn", bits=bits, group_size=g, hessian=h).error
            assert e_gptq <= e_rtn + 1e-12, (n, bits, e_gptq, e_rtn)
        torch.testing.assert_close(h, h.T)


HARD = ["toy-llava-hard", "toy-qwen2.5-vl-hard"]


@pytest.mark.parametrize("name", HARD)
def test_hard_toy_fp_accuracy_on_a_seeded_subset(name):
    """The capacity-bound toys answer shapes-VQA-hard (seeded 120-item subset of the test split) near their
    recorded 500-item accuracy; every Linear is a multiple of 256 wide."""
    _require(name)
    loaded = load_model(name)
    assert all(m.in_features % 256 == 0 and m.out_features % 256 == 0
               for m in loaded.model.modules() if isinstance(m, torch.nn.Linear))
    assert loaded.model.config.text_config.num_hidden_layers >= 8
    r = evaluate(loaded, ["shapes-vqa-hard"], data_dir=None, limit=120, seed=1).tasks["shapes-vqa-hard"]
    recorded = json.loads((ASSETS / name / "training.json").read_text())
    assert recorded["dataset"] == "shapes-vqa-hard" and recorded["test"]["n"] >= 500
    assert recorded["test"]["accuracy"] >= 0.85 and min(recorded["test"]["per_type"].values()) >= 0.60
    assert r.score >= 0.80, r.per_type  # 120 items: a few points of sampling noise below the 500-item score


@pytest.mark.parametrize("name", ["toy-llava-hard", "toy-qwen2.5-vl-hard"])
def test_training_conversations_carry_the_loss_on_every_answer(name):
    """``--turns``: a training board's conversation holds its question and more about the same board; the loss
    falls on exactly the answers (and each turn's end token), the first one where a single-turn sample's does."""
    from quantlab.data.synthetic import SETS
    from quantlab.toys.batches import collate, prepare
    from quantlab.toys.build import TOYS, build_toy

    model, processor = build_toy(name, seed=0)
    member = SETS.get(TOYS[name].size.dataset)
    many, one = (prepare(processor, member, "train", 6, turns=t, bins=6) for t in (4, 1))
    image_id = model.config.image_token_id
    batch = collate(many, torch.arange(6), processor.tokenizer.pad_token_id, image_id)
    for i, sample in enumerate(member.samples("train", 6)):
        answers = [sample.answer] + [a for _q, a, _t in member.more_questions(sample, 3)]
        spans = many.answer_spans[i]
        assert len(spans) == len(answers) >= 3 and spans[0][0] == one.answer_start[i]
        assert torch.equal(many.ids[i][:spans[0][1]], one.ids[i])  # the first turn is the single-turn sample
        labelled = (batch["labels"][i] != -100).nonzero().flatten().tolist()
        assert labelled == [k for lo, hi in spans for k in range(lo, hi)]
        eos = processor.tokenizer.decode(one.ids[i][-1:])
        for (lo, hi), answer in zip(spans, answers):
            assert processor.tokenizer.decode(many.ids[i][lo:hi]).strip() == answer + eos
    assert collate(one, torch.arange(6), processor.tokenizer.pad_token_id, image_id)["labels"].ne(-100).sum() < \
        batch["labels"].ne(-100).sum()


@pytest.mark.parametrize("name", ["toy-llava-hard", "toy-qwen2.5-vl-hard"])
def test_late_targets_sit_at_the_question_mark_and_name_the_answer(name):
    """``--late-weight``: a relation question's target object (its answer class, row, column) and a count
    question's number, at the question's ``?`` token; other questions have none."""
    from quantlab.data import shapes_hard as H
    from quantlab.data.synthetic import SETS
    from quantlab.toys.batches import color_ids, prepare, shape_ids
    from quantlab.toys.build import TOYS, build_toy

    _model, processor = build_toy(name, seed=0)
    member = SETS.get(TOYS[name].size.dataset)
    samples = list(member.samples("train", 18))
    data = prepare(processor, member, "train", 18, bins=6)
    cids, sids = color_ids(member), shape_ids(member)
    for s, ids, start, late in zip(samples, data.ids, data.answer_start, data.late_targets):
        if s.question_type not in ("relation", "count"):
            assert len(late) == 0
            continue
        pos, other, row, col, count = late[0].tolist()
        assert processor.tokenizer.decode(ids[pos:pos + 1]) == "?" and pos < start
        assert "?" not in processor.tokenizer.decode(ids[pos + 1:start])
        if s.question_type == "count":
            assert (other, row, col, count) == (0, 0, 0, int(s.answer))
        else:
            t = H.relation_target(s)
            answer_class = cids[s.answer] if s.answer in cids else len(cids) + sids[s.answer]
            assert (other, row, col, count) == (answer_class, t.row + 1, t.col + 1, 0)


def test_late_loss_trains_only_the_heads_it_is_given():
    """``--no-late-count``: the late loss over the relation heads alone is the cross-entropy of the relation
    targets (answer class, row, column) computed here by hand; the count head gets no gradient."""
    import torch.nn.functional as F
    from torch import nn

    from quantlab.data.synthetic import SETS
    from quantlab.toys.aux_losses import LATE_TERMS, late_loss
    from quantlab.toys.batches import prepare
    from quantlab.toys.build import TOYS, build_toy

    _model, processor = build_toy("toy-llava-hard", seed=0)
    data = prepare(processor, SETS.get(TOYS["toy-llava-hard"].size.dataset), "train", 24, bins=6)
    idx = torch.arange(24)
    seq = max(len(i) for i in data.ids)
    torch.manual_seed(0)
    hidden = torch.randn(24, seq, 16)
    heads = nn.ModuleDict({n: nn.Linear(16, 20) for n in LATE_TERMS})
    loss = late_loss(hidden, data, idx, heads, terms=LATE_TERMS[:3])
    rows = [(r, t) for r, i in enumerate(idx.tolist()) for t in data.late_targets[i].tolist() if t[1] > 0]
    assert rows  # relation questions in the batch
    h = torch.stack([hidden[r, t[0]] for r, t in rows])
    tgt = torch.tensor([t[1:4] for _r, t in rows])
    expected = sum(F.cross_entropy(heads[n](h), tgt[:, k]) for k, n in enumerate(LATE_TERMS[:3]))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert heads["late_count"].weight.grad is None and heads["late_row"].weight.grad is not None


def test_fast_vision_tower_matches_transformers():
    """Training's Qwen2.5-VL vision speed-ups (one batched attention call over equal windows, the patch
    embedding as one matmul) give transformers' own result, for the windowed and the full-attention block,
    forward and gradient."""
    from quantlab.data.synthetic import SETS
    from quantlab.toys.build import build_toy
    from quantlab.toys.fast_vision import speed_up_vision

    model, processor = build_toy("toy-qwen2.5-vl-hard", seed=0)
    model.float()
    samples = list(SETS.get("shapes-vqa-hard").samples("train", 3))
    enc = processor.image_processor(images=[s.render() for s in samples], return_tensors="pt")

    def run():
        pixels = enc["pixel_values"].clone().requires_grad_(True)
        out = model.model.visual(pixels, grid_thw=enc["image_grid_thw"]).pooler_output
        out.square().sum().backward()
        return out.detach(), pixels.grad

    ref, ref_grad = run()
    assert speed_up_vision(model) == len(model.model.visual.blocks) + 1
    fast, fast_grad = run()
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["toy-llava-hard", "toy-qwen2.5-vl-hard"])
def test_recorded_attention_is_the_layers_own_and_the_relation_loss_reads_the_asked_object(name):
    """``--relation-attn-weight``: recording one layer's attention changes no logit, its probabilities are that
    layer's eager attention, and the loss reads head 0 at each relation question's ``?`` on the image token of
    the object the question asks about (``shapes_hard.relation_target``)."""
    from quantlab.data import shapes_hard as H
    from quantlab.data.synthetic import SETS
    from quantlab.models.adapter import ADAPTERS
    from quantlab.toys.aux_losses import record_attention, relation_attention_loss
    from quantlab.toys.batches import collate, prepare
    from quantlab.toys.build import TOYS, build_toy

    torch.manual_seed(0)
    model, processor = build_toy(name, seed=0)
    model.float().eval()
    member = SETS.get(TOYS[name].size.dataset)
    data = prepare(processor, member, "train", 12, bins=6)
    adapter = ADAPTERS[TOYS[name].model_type]
    image_id = adapter.image_token_id(model.config)
    batch = collate(data, torch.arange(12), processor.tokenizer.pad_token_id, image_id)
    with torch.no_grad():
        plain = model(**batch).logits
        model.set_attn_implementation({"text_config": "eager"})
        eager = model(**batch, output_attentions=True).attentions[5]
        model.set_attn_implementation({"text_config": "sdpa"})
        store: dict[str, torch.Tensor] = {}
        record_attention(adapter.blocks(model)[5].self_attn, store)
        recorded = model(**batch).logits
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-4)
    real = batch["attention_mask"].bool()  # padded queries' rows differ between mask conventions: not used
    torch.testing.assert_close(store["attn"].permute(0, 2, 1, 3)[real], eager.permute(0, 2, 1, 3)[real],
                               rtol=1e-4, atol=1e-5)

    samples = list(member.samples("train", 12))
    attn = torch.zeros_like(store["attn"])
    expected = []
    for r, s in enumerate(samples):
        if s.question_type == "relation":
            t = H.relation_target(s)
            pos = int(data.late_targets[r][0, 0])
            start = int((batch["input_ids"][r] == image_id).nonzero()[0])
            attn[r, 0, pos, start + t.row * 6 + t.col] = 0.5
            expected.append(0.5)
    assert expected
    loss = relation_attention_loss(attn, data, torch.arange(12), image_id, batch["input_ids"], 6)
    torch.testing.assert_close(loss, -torch.log(torch.tensor(0.5 + 1e-6)))
    # at the last prompt token instead (it predicts the answer's first token)
    moved = torch.zeros_like(attn)
    for r, s in enumerate(samples):
        if s.question_type == "relation":
            t = H.relation_target(s)
            start = int((batch["input_ids"][r] == image_id).nonzero()[0])
            moved[r, 0, data.answer_start[r] - 1, start + t.row * 6 + t.col] = 0.25
    loss = relation_attention_loss(moved, data, torch.arange(12), image_id, batch["input_ids"], 6, at="answer")
    torch.testing.assert_close(loss, -torch.log(torch.tensor(0.25 + 1e-6)))
    # the lookup-attention loss reads the same head from each colour/shape word to its named object's token
    from quantlab.toys.aux_losses import lookup_attention_loss

    words = torch.zeros_like(attn)
    for r in range(12):
        start = int((batch["input_ids"][r] == image_id).nonzero()[0])
        for pos, other, row, col in data.word_targets[r].tolist():
            if other > 0:
                words[r, 0, pos, start + (row - 1) * 6 + (col - 1)] = 0.125
    loss = lookup_attention_loss(words, data, torch.arange(12), image_id, batch["input_ids"], 6)
    torch.testing.assert_close(loss, -torch.log(torch.tensor(0.125 + 1e-6)))
