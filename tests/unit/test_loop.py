"""The loop's data stream and step arithmetic."""

from __future__ import annotations

import itertools

from tunelab.config import load_config
from tunelab.data.formats import Example
from tunelab.train.stream import Position, grouped_steps, micro_batches, total_steps


def _cfg(tmp_path, *overrides):
    p = tmp_path / "r.yaml"
    p.write_text("data: {train: x.txt}\n")
    return load_config(p, list(overrides))


def _examples(n):
    return [Example(list(range(1 + i % 7)), [-100] * (1 + i % 7), "", "", "x") for i in range(n)]


def _stream(exs, cfg, start):
    t = cfg.train
    return micro_batches([len(e.input_ids) for e in exs], t.batch_size, t.seed, cfg.data.group_by_length, start)


def _total(cfg, n):
    t = cfg.train
    return total_steps(t.max_steps, t.epochs, t.batch_size, t.grad_accum, n)


def test_stream_resumes_at_any_position_without_replaying(tmp_path):
    cfg = _cfg(tmp_path, "train.batch_size=4")
    exs = _examples(22)  # 6 batches an epoch, the last of 2
    full = list(itertools.islice(_stream(exs, cfg, Position()), 20))
    for k in (1, 5, 6, 7, 13):
        pos = full[k - 1][0]  # the position after k micro-batches
        rest = list(itertools.islice(_stream(exs, cfg, pos), 20 - k))
        assert [b for _, b in rest] == [b for _, b in full[k:]]
    assert full[5][0] == Position(1, 0) and full[6][0] == Position(1, 1)
    first_epoch = sorted(i for _, b in full[:6] for i in b)
    assert first_epoch == list(range(22))
    assert [b for _, b in full[:6]] != [b for _, b in full[6:12]]  # epochs are shuffled differently


def test_total_steps(tmp_path):
    assert _total(_cfg(tmp_path, "train.batch_size=4"), 22) == 6
    assert _total(_cfg(tmp_path, "train.batch_size=4", "train.grad_accum=4"), 22) == 2
    # 6 micro-batches an epoch in steps of 4 + 2 (a step never takes micro-batches of two epochs)
    assert _total(_cfg(tmp_path, "train.batch_size=4", "train.epochs=3", "train.grad_accum=4"), 22) == 6
    assert _total(_cfg(tmp_path, "train.max_steps=17", "train.epochs=3"), 22) == 17


def test_a_step_never_takes_micro_batches_of_two_epochs(tmp_path):
    """20 examples in batches of 8 (3 micro-batches an epoch, the last of 4) with grad_accum=2: steps of 2 + 1
    micro-batches, each example once an epoch, as many steps as total_steps counts."""
    cfg = _cfg(tmp_path, "train.batch_size=8", "train.grad_accum=2", "train.epochs=2")
    exs = _examples(20)
    steps = list(itertools.islice(grouped_steps(_stream(exs, cfg, Position()), 2), _total(cfg, 20)))
    assert [len(s) for s in steps] == [2, 1, 2, 1]
    for epoch in (steps[:2], steps[2:]):
        assert sorted(i for step in epoch for _, b in step for i in b) == list(range(20))
    assert [s[-1][0] for s in steps] == [Position(0, 2), Position(1, 0), Position(1, 2), Position(2, 0)]
    # resumed after step 1 (at Position(0, 2)), the stream groups the same steps
    rest = list(itertools.islice(grouped_steps(_stream(exs, cfg, Position(0, 2)), 2), 3))
    assert [[b for _, b in s] for s in rest] == [[b for _, b in s] for s in steps[1:]]


def test_weighted_examples_give_a_weighted_mean():
    import torch

    from tunelab.tasks import supervised_weight

    labels = torch.tensor([[-100, 5, 6, 7], [-100, -100, 8, -100]])
    assert supervised_weight({"labels": labels}) == 4
    assert supervised_weight({"labels": labels, "weight": torch.tensor([1.0, 1.0])}) == 4
    # example 0 (3 supervised tokens) counts half, example 1 (1 token) not at all
    assert supervised_weight({"labels": labels, "weight": torch.tensor([0.5, 0.0])}) == 1.5
