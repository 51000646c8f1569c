"""Batches: a deterministic order per (seed, epoch), length grouping, and padding.

The order of epoch ``e`` is a pure function of ``(seed, e)``, so a resumed run jumps straight to batch
``k`` of epoch ``e`` without iterating over the batches it skips.
"""

from __future__ import annotations

import torch

from .formats import IGNORE, Example

GROUP_CHUNK = 64  # batches per length-sorted chunk when grouping by length


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """Indices of each batch of one epoch.

    With grouping, a random permutation is cut into chunks of GROUP_CHUNK batches; each chunk is sorted
    by length (so batches hold similar lengths and little padding) and the batches are shuffled again.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        chunk = batch_size * GROUP_CHUNK
        perm = [i for s in range(0, len(perm), chunk)
                for i in sorted(perm[s:s + chunk], key=lambda j: -lengths[j])]
    batches = [perm[s:s + batch_size] for s in range(0, len(perm), batch_size)]
    if group_by_length:
        order = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in order]
    return batches


def collate(examples: list[Example], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example: input_ids (B, T), attention_mask (B, T), labels (B, T), weight (B,)."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, sl] = torch.tensor(e.input_ids)
        labels[b, sl] = torch.tensor(e.labels)
        mask[b, sl] = 1
    weight = torch.tensor([e.weight for e in examples], dtype=torch.float32)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "weight": weight}
    if examples[0].label >= 0:  # classification: one class index per example
        batch["class_labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return batch
