"""Distillation losses against hand computations and reference formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tunelab.train.distill import divergence, kd_loss_sum


def test_forward_kl_by_hand_with_temperature():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: q = (3/4, 1/4), p = (1/2, 1/2)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(divergence(student, teacher, 1.0)) == pytest.approx(kl, abs=1e-6)
    # T = 2: q = softmax(log(3)/2, 0) = (√3, 1)/(√3 + 1); the divergence is scaled by T² = 4
    q = (math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1))
    kl2 = sum(qi * math.log(qi / 0.5) for qi in q)
    assert float(divergence(student, teacher, 2.0)) == pytest.approx(4 * kl2, abs=1e-6)


def test_reverse_kl_and_jsd_by_hand():
    student = torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4)
    teacher = torch.tensor([[0.0, 0.0]])  # q = (1/2, 1/2)
    p, q = (0.75, 0.25), (0.5, 0.5)
    rkl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert float(divergence(student, teacher, kind="reverse_kl")) == pytest.approx(rkl, abs=1e-6)
    beta = 0.3
    m = [beta * qi + (1 - beta) * pi for pi, qi in zip(p, q)]
    jsd = beta * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m)) + \
        (1 - beta) * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m))
    assert float(divergence(student, teacher, kind="jsd", beta=beta)) == pytest.approx(jsd, abs=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_zero_when_student_equals_teacher(kind):
    z = torch.randn(5, 11)
    assert torch.allclose(divergence(z, z.clone(), 2.0, kind), torch.zeros(5), atol=1e-6)


def test_gradient_equals_autograd_of_the_soft_label_cross_entropy():
    torch.manual_seed(0)
    z = torch.randn(4, 9, requires_grad=True)
    t = torch.randn(4, 9)
    T = 1.7
    divergence(z, t, T).sum().backward()
    g = z.grad.clone()
    z.grad = None
    q = torch.softmax(t / T, -1)
    naive = -(q * torch.log_softmax(z / T, -1)).sum() * T * T  # Hinton's soft labels, T² scaled
    naive.backward()
    assert torch.allclose(g, z.grad, atol=1e-6)


def _setup(seed=0, B=3, T=6, D=5, V=13):
    torch.manual_seed(seed)
    head = torch.nn.Linear(D, V, bias=False)
    t_head = torch.nn.Linear(D, V + 3, bias=False)  # a padded vocabulary tail: 3 rows more
    hidden = torch.randn(B, T, D, requires_grad=True)
    t_hidden = torch.randn(B, T, D)
    labels = torch.randint(0, V, (B, T))
    labels[:, :2] = -100  # the prompt
    labels[1, 4:] = -100  # padding
    return head, t_head, hidden, t_hidden, labels


def _reference(head, t_head, hidden, t_hidden, labels, T, alpha, V):
    """The naive formula on full (B, T, V) logits."""
    z = head(hidden)[:, :-1]
    zt = t_head(t_hidden)[:, :-1, :V]
    y = labels[:, 1:]
    sel = y != -100
    q = torch.softmax(zt[sel] / T, -1)
    logp = torch.log_softmax(z[sel] / T, -1)
    kd = (q * (torch.log(q) - logp)).sum(-1) * T * T
    ce = F.cross_entropy(z[sel], y[sel], reduction="none")
    return ((1 - alpha) * ce + alpha * kd).sum()


@pytest.mark.parametrize("chunk", [1000, 3])
def test_chunked_kd_loss_equals_the_naive_formula(chunk):
    head, t_head, hidden, t_hidden, labels = _setup()
    loss, n = kd_loss_sum(hidden, labels, head, (t_hidden, t_head), None, temperature=2.0, kind="forward_kl",
                          beta=0.5, alpha=0.7, vocab=13, chunk=chunk)
    loss.backward()
    g = hidden.grad.clone()
    hidden.grad = None
    ref = _reference(head, t_head, hidden, t_hidden, labels, 2.0, 0.7, 13)
    ref.backward()
    assert n == int((labels[:, 1:] != -100).sum())
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert torch.allclose(g, hidden.grad, atol=1e-6)


def test_prompt_positions_are_excluded():
    head, t_head, hidden, t_hidden, labels = _setup()
    kw = dict(temperature=1.0, kind="forward_kl", beta=0.5, alpha=1.0, vocab=13)
    a, _ = kd_loss_sum(hidden, labels, head, (t_hidden, t_head), None, **kw)
    other = t_hidden.clone()
    other[:, 0] += 5.0  # position 0 predicts labels[1], a prompt token: no loss
    other[1, 4:] -= 3.0  # padding
    b, _ = kd_loss_sum(hidden, labels, head, (other, t_head), None, **kw)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_top_k_cache_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    head, t_head, hidden, t_hidden, labels = _setup()
    sel = labels[:, 1:] != -100
    logp = torch.log_softmax(t_head(t_hidden)[:, :-1][sel][:, :13], -1).detach()
    kw = dict(temperature=2.0, kind="forward_kl", beta=0.5, alpha=0.5, vocab=13)
    full, _ = kd_loss_sum(hidden, labels, head, (t_hidden, t_head), None, **kw)
    lp, ix = logp.topk(13, -1)  # k = V: the cache holds everything, so the loss is the same
    save_file({"logp": lp, "index": ix.to(torch.int32)}, str(tmp_path / "c.safetensors"))
    back = load_file(str(tmp_path / "c.safetensors"))
    cached, _ = kd_loss_sum(hidden, labels, head, None, (back["logp"], back["index"]), **kw)
    assert float(cached) == pytest.approx(float(full), rel=1e-5)
    lp4, ix4 = logp.topk(4, -1)  # k < V: both sides restricted to the teacher's 4 best tokens
    top4, _ = kd_loss_sum(hidden, labels, head, None, (lp4, ix4.int()), **kw)
    z = head(hidden)[:, :-1][sel]
    t4 = torch.log_softmax(lp4 / 2.0, -1)
    s4 = torch.log_softmax((z / 2.0).gather(-1, ix4), -1)
    ce = F.cross_entropy(z, labels[:, 1:][sel], reduction="none")
    ref = (0.5 * ce + 0.5 * 4.0 * (t4.exp() * (t4 - s4)).sum(-1)).sum()
    assert float(top4) == pytest.approx(float(ref), rel=1e-5)


def test_a_teacher_cache_fingerprint_names_the_teacher_by_path_and_dtype(tmp_path, monkeypatch):
    from tunelab.data.formats import Example
    from tunelab.teacher import examples_fingerprint

    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"weights")
    ex = [Example([1, 2, 3], [-100, 2, 3], "", "", "x")]
    monkeypatch.chdir(tmp_path)
    absolute = examples_fingerprint(ex, str(tmp_path / "teacher"), "float32")
    assert examples_fingerprint(ex, "teacher", "float32") == absolute  # the same directory, however named
    assert examples_fingerprint(ex, "teacher", "bfloat16") != absolute  # other log-probabilities
    assert examples_fingerprint([Example([1, 2, 4], [-100, 2, 4], "", "", "x")], "teacher", "float32") != absolute


def test_caches_written_with_the_earlier_fingerprint_still_match():
    """legacy_fingerprint is the formula caches were written with before the dtype was part of it."""
    import hashlib
    import json

    from tunelab.data.formats import Example
    from tunelab.teacher import legacy_fingerprint

    ex = [Example([1, 2, 3], [-100, 2, 3], "", "", "x")]
    h = hashlib.sha256()
    h.update(b"HuggingFaceTB/SmolLM2-360M-Instruct")
    h.update(json.dumps([[1, 2, 3], [-100, 2, 3]]).encode())
    assert legacy_fingerprint(ex, "HuggingFaceTB/SmolLM2-360M-Instruct") == h.hexdigest()[:16]
