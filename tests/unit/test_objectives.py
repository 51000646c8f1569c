"""Loss masking, the cross-entropy sums, accumulation normalisation and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tunelab.data.formats import IGNORE, mask_prompt
from tunelab.train.objectives import lr_factor, masked_ce_sum, supervised_ce_sum


def _ce(row: list[float], target: int) -> float:
    """-log softmax(row)[target], by hand."""
    return math.log(sum(math.exp(x) for x in row)) - row[target]


# ---------------------------------------------------------------- mask_prompt


def test_mask_prompt_masks_prompt_and_keeps_target():
    ids, labels = mask_prompt([11, 12, 13], [21, 22])
    assert ids == [11, 12, 13, 21, 22]
    assert labels == [-100, -100, -100, 21, 22]
    assert IGNORE == -100


def test_mask_prompt_empty_prompt_and_copies_target():
    target = [5, 6]
    ids, labels = mask_prompt([], target)
    assert ids == [5, 6] and labels == [5, 6]
    labels.append(7)  # labels must not alias the caller's list
    assert target == [5, 6]


# ---------------------------------------------------------------- masked_ce_sum


ROWS = [[1.0, 2.0, 3.0], [0.5, 0.0, -1.0], [2.0, -2.0, 0.0]]


def test_masked_ce_sum_hand_computed_with_shift():
    logits = torch.tensor([ROWS])  # (1, 3, 3)
    labels = torch.tensor([[IGNORE, 2, 0]])
    loss, n = masked_ce_sum(logits, labels)
    # position 0 predicts labels[1] = 2, position 1 predicts labels[2] = 0; position 2 predicts nothing
    expected = _ce(ROWS[0], 2) + _ce(ROWS[1], 0)
    assert n == 2
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_masked_ce_sum_ignores_masked_labels():
    logits = torch.tensor([ROWS])
    loss, n = masked_ce_sum(logits, torch.tensor([[IGNORE, IGNORE, 1]]))
    assert n == 1
    assert loss.item() == pytest.approx(_ce(ROWS[1], 1), abs=1e-5)
    # the label at position 0 is never a target (nothing predicts it)
    loss0, n0 = masked_ce_sum(logits, torch.tensor([[2, IGNORE, 1]]))
    assert n0 == 1 and loss0.item() == pytest.approx(loss.item(), abs=1e-6)


def test_masked_ce_sum_per_example_weight():
    rows_b = [[0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    logits = torch.tensor([ROWS, rows_b])  # (2, 3, 3)
    labels = torch.tensor([[IGNORE, 2, 0], [IGNORE, IGNORE, 1]])
    weight = torch.tensor([2.0, 0.5])
    loss, n = masked_ce_sum(logits, labels, weight)
    expected = 2.0 * (_ce(ROWS[0], 2) + _ce(ROWS[1], 0)) + 0.5 * _ce(rows_b[1], 1)
    assert n == 3  # n counts tokens, not weights
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    unweighted, _ = masked_ce_sum(logits, labels)
    assert unweighted.item() == pytest.approx(_ce(ROWS[0], 2) + _ce(ROWS[1], 0) + _ce(rows_b[1], 1), abs=1e-5)


# ---------------------------------------------------------------- supervised_ce_sum


def _case(seed: int = 0, weight: bool = False):
    g = torch.Generator().manual_seed(seed)
    B, T, D, V = 3, 6, 5, 7
    hidden = torch.randn(B, T, D, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE  # prompt
    labels[1, :2] = IGNORE
    labels[1, 5] = IGNORE  # padding
    labels[2, :] = IGNORE
    labels[2, 4] = 3
    head = nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g))
    w = torch.tensor([1.0, 2.5, 0.5]) if weight else None
    return hidden, labels, head, w


def _loss_and_grads(fn, case):
    hidden, labels, head, w = case
    h = hidden.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    loss, n = fn(h, labels, head, w)
    loss.backward()
    return loss.detach(), n, h.grad.clone(), head.weight.grad.clone()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_supervised_ce_sum_matches_reference(chunk, weighted):
    case = _case(seed=1, weight=weighted)
    labels = case[1]
    n_expected = int((labels[:, 1:] != IGNORE).sum())
    assert n_expected == 7  # 3 + 3 + 1 supervised targets after the shift

    def ref(h, y, head, w):
        return masked_ce_sum(head(h), y, w)

    def fast(h, y, head, w):
        return supervised_ce_sum(h, y, head, w, chunk=chunk)

    l_ref, n_ref, gh_ref, gw_ref = _loss_and_grads(ref, case)
    l_fast, n_fast, gh_fast, gw_fast = _loss_and_grads(fast, case)
    assert n_ref == n_fast == n_expected
    assert torch.allclose(l_fast, l_ref, atol=1e-6)
    assert torch.allclose(gh_fast, gh_ref, atol=1e-6)
    assert torch.allclose(gw_fast, gw_ref, atol=1e-6)
    assert gh_fast.abs().sum() > 0  # the comparison is not vacuous


def test_supervised_ce_sum_never_calls_head_on_unsupervised_positions():
    hidden, labels, head, _ = _case(seed=2)
    seen = []

    def counting_head(h):
        seen.append(h.shape[0])
        return head(h)

    _, n = supervised_ce_sum(hidden, labels, counting_head, chunk=100)
    assert seen == [n] == [7]


def test_supervised_ce_sum_no_supervised_tokens():
    hidden = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.full((2, 4), IGNORE)
    labels[:, 0] = 1  # position 0 is never a target
    head = nn.Linear(5, 7)
    loss, n = supervised_ce_sum(hidden, labels, head)
    assert n == 0
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert hidden.grad is not None and torch.count_nonzero(hidden.grad) == 0


# ---------------------------------------------------------------- accumulation


def test_accumulation_normalised_by_total_tokens_equals_big_batch():
    g = torch.Generator().manual_seed(3)
    D, V, T = 4, 6, 6
    hidden = torch.randn(2, T, D, generator=g)
    labels = torch.randint(0, V, (2, T), generator=g)
    labels[0, :1] = IGNORE  # micro-batch A: 5 supervised targets
    labels[1, :5] = IGNORE  # micro-batch B: 1 supervised target
    head = nn.Linear(D, V)

    # one big batch
    loss_sum, n_total = masked_ce_sum(head(hidden), labels)
    assert n_total == 6
    big = loss_sum / n_total
    big.backward()
    g_big = [p.grad.clone() for p in head.parameters()]
    head.zero_grad(set_to_none=True)

    # two micro-batches, each divided by the total count, gradients accumulated
    acc_value = 0.0
    counts, sums = [], []
    for i in range(2):
        s, n = masked_ce_sum(head(hidden[i:i + 1]), labels[i:i + 1])
        (s / n_total).backward()
        acc_value += float(s.detach()) / n_total
        counts.append(n)
        sums.append(float(s.detach()))
    g_acc = [p.grad.clone() for p in head.parameters()]
    assert counts == [5, 1] and sum(counts) == n_total
    assert acc_value == pytest.approx(big.item(), abs=1e-6)
    for a, b in zip(g_acc, g_big):
        assert torch.allclose(a, b, atol=1e-6)

    # the mean of per-micro-batch means weights B's single token like A's five: a different number
    mean_of_means = 0.5 * (sums[0] / counts[0] + sums[1] / counts[1])
    assert abs(mean_of_means - big.item()) > 1e-3


# ---------------------------------------------------------------- lr_factor


def test_lr_warmup_steps():
    for schedule in ("constant", "linear", "cosine"):
        assert lr_factor(0, 10, 2, schedule) == pytest.approx(0.5)
        assert lr_factor(1, 10, 2, schedule) == pytest.approx(1.0)
    assert lr_factor(0, 10, 4, "linear") == pytest.approx(0.25)
    assert lr_factor(2, 10, 4, "linear") == pytest.approx(0.75)


def test_lr_constant():
    assert [lr_factor(s, 10, 0, "constant") for s in range(10)] == [1.0] * 10
    assert lr_factor(9, 10, 2, "constant", min_ratio=0.3) == 1.0


def test_lr_linear_with_warmup():
    # after warmup 2 of 10 steps: decay over span 8, progress = (step - 2) / 8
    assert lr_factor(2, 10, 2, "linear") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 2, "linear") == pytest.approx(1 / 8)  # last step (0-based)
    assert lr_factor(10, 10, 2, "linear") == pytest.approx(0.0)
    assert lr_factor(50, 10, 2, "linear") == pytest.approx(0.0)  # clamped past the end


def test_lr_linear_without_warmup():
    values = [lr_factor(s, 10, 0, "linear") for s in range(10)]
    assert values == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])


def test_lr_cosine():
    assert lr_factor(0, 10, 0, "cosine") == pytest.approx(1.0)
    assert lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5)  # midpoint
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)  # midpoint after warmup
    assert lr_factor(4, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(9, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)


def test_lr_min_ratio():
    assert lr_factor(6, 10, 2, "linear", min_ratio=0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_factor(5, 10, 0, "cosine", min_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(10, 10, 2, "linear", min_ratio=0.2) == pytest.approx(0.2)
    assert lr_factor(10, 10, 2, "cosine", min_ratio=0.2) == pytest.approx(0.2)
    for schedule in ("linear", "cosine"):
        values = [lr_factor(s, 10, 2, schedule, 0.2) for s in range(2, 12)]
        assert all(v >= 0.2 - 1e-12 for v in values)
        assert values == sorted(values, reverse=True)  # monotone decay


def test_lr_unknown_schedule():
    with pytest.raises(ValueError, match="bogus"):
        lr_factor(5, 10, 0, "bogus")


def test_early_stopping_on_a_scripted_metric_sequence():
    from tunelab.train.objectives import EarlyStopping

    es = EarlyStopping(patience=2, mode="min")
    seq = [(10, 2.0), (20, 1.5), (30, 1.6), (40, 1.4), (50, 1.45), (60, 1.41), (70, 1.0)]
    stopped = next(step for step, v in seq if es.update(step, v))
    assert stopped == 60 and es.best == 1.4 and es.best_step == 40  # 1.45, 1.41: two evaluations without gain
    acc = EarlyStopping(patience=1, mode="max", min_delta=0.01)
    assert not acc.update(1, 0.50)
    assert not acc.update(2, 0.60)
    assert acc.update(3, 0.605)  # not better by more than min_delta
    assert acc.best_step == 2
    again = EarlyStopping(patience=1, mode="max", min_delta=0.01)
    again.load(acc.state())
    assert again.state() == acc.state()
