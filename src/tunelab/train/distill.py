"""Knowledge distillation: the divergences as pure functions, and the chunked token-level KD loss.

Token-level KD (Hinton et al. 2015) trains the student p_θ on the teacher's soft labels q at every
supervised position: -Σ_v q(v|y<t,x) log p_θ(v|y<t,x), which has the gradient of KL(q‖p_θ). With a
temperature T both distributions are softened (logits / T) and the divergence is scaled by T², so its
gradients keep their size as T changes. It is mixed with the hard-label cross-entropy:

    loss_t = (1 - alpha) · CE(y_t, p_θ) + alpha · T² · D(q_T ‖ p_θ,T)

D is the forward KL (the default), the reverse KL(p_θ‖q), or the generalised Jensen-Shannon divergence
JSD_β = β KL(q‖m) + (1-β) KL(p_θ‖m) with m = β q + (1-β) p_θ. Only supervised positions are computed,
in chunks of positions, so the (B, T, V) logits of teacher and student never exist at once. A teacher
can also come from a cache of its top-k log-probabilities; both distributions are then restricted to
those k tokens and renormalised there (with k = V this is the full computation).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KINDS = ("forward_kl", "reverse_kl", "jsd")


def divergence(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
               kind: str = "forward_kl", beta: float = 0.5, teacher_index: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position divergence (n,), already multiplied by T².

    student_logits: (n, V). teacher: the teacher's logits (n, V), or with ``teacher_index`` (n, k) the
    teacher's log-probabilities of those k tokens (a top-k cache), in which case both sides are
    restricted to the k tokens and renormalised.
    """
    s = student_logits.float() / temperature
    if teacher_index is None:
        t = F.log_softmax(teacher.float() / temperature, dim=-1)
        s = F.log_softmax(s, dim=-1)
    else:
        t = F.log_softmax(teacher.float() / temperature, dim=-1)  # log-probs / T, renormalised over k
        s = F.log_softmax(s.gather(-1, teacher_index.long()), dim=-1)
    if kind == "forward_kl":
        d = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse_kl":
        d = (s.exp() * (s - t)).sum(-1)
    elif kind == "jsd":
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
        d = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    else:
        raise ValueError(f"unknown divergence {kind!r}")
    return d * temperature ** 2


def _chunk_kd(student_head: Callable, h_s: torch.Tensor, teacher_part: torch.Tensor, teacher_index,
              teacher_head: Callable | None, y, w, temperature: float, kind: str, beta: float, alpha: float,
              vocab: int) -> torch.Tensor:
    z_s = student_head(h_s)  # (c, V_s)
    loss = z_s.new_zeros(y.shape, dtype=torch.float32)
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(z_s.float(), y, reduction="none")
    if alpha > 0:
        if teacher_head is not None:  # teacher hidden states -> logits, here so that only a chunk exists
            with torch.no_grad():
                teacher_part = teacher_head(teacher_part)[:, :vocab]
        z = z_s[:, :vocab] if teacher_index is None else z_s
        loss = loss + alpha * divergence(z, teacher_part, temperature, kind, beta, teacher_index)
    return (loss * w).sum()


def kd_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: Callable,
                teacher: tuple[torch.Tensor, Callable] | None, cached: tuple[torch.Tensor, torch.Tensor] | None, *,
                temperature: float, kind: str, beta: float, alpha: float, vocab: int,
                weight: torch.Tensor | None = None, chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """Sum over supervised positions of the mixed KD loss, and their number.

    hidden: the student's final hidden states (B, T, D) aligned with labels (B, T) (position t predicts
    labels[t+1]). The teacher is either ``teacher`` = (its final hidden states (B, T, D_t) on the same
    tokens, its output head), or ``cached`` = (log-probs (n, k), token ids (n, k)) at the supervised
    positions in row-major order. ``vocab`` is the shared vocabulary size (padded tails cut off). Logits
    exist one chunk of positions at a time, recomputed in the backward pass.
    """
    from .objectives import IGNORE, shift, token_weights

    hidden, labels = shift(hidden, labels)
    sel = labels != IGNORE
    w = token_weights(labels, weight)[sel]
    h = hidden[sel]
    y = labels[sel]
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0, 0
    t_head = None
    t_idx = None
    if cached is not None:
        t_all, t_idx = cached
    elif teacher is not None:
        t_all, t_head = teacher[0][:, :-1][sel].detach(), teacher[1]
    else:
        t_all = h.new_zeros((n, 1))  # alpha == 0: no teacher needed
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        part = slice(s, s + chunk)
        args = (head, h[part], t_all[part], None if t_idx is None else t_idx[part], t_head, y[part], w[part],
                temperature, kind, beta, alpha, vocab)
        total = total + (_chunk_kd(*args) if n <= chunk else checkpoint(_chunk_kd, *args, use_reentrant=False))
    return total, n
