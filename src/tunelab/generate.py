"""Batched, KV-cached generation with left padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask with every row's last token in the last column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str | list[int]], max_new_tokens: int = 32,
             batch_size: int = 64, temperature: float = 0.0, top_p: float = 1.0, num_return_sequences: int = 1,
             progress: bool = False, seed: int | None = None, stop_ids: list[int] | None = None) -> list[list[str]]:
    """Completions for each prompt (``num_return_sequences`` each), decoded without special tokens.

    A prompt is text (tokenized as training tokenizes a prompt, special tokens included) or token ids
    (used as they are: a chat prompt rendered by its template). Prompts are sorted by length so each
    batch holds similar lengths, padded on the left so that every row's next token sits at the same
    position, and decoded with the model's KV cache (HF generate). temperature 0 is greedy. Generation
    stops at EOS and at any of ``stop_ids`` (a chat template's end-of-turn token).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows: list[list[int]] = [p if isinstance(p, list) else [] for p in prompts]  # a text's ids: filled below
    texts = [i for i, p in enumerate(prompts) if not isinstance(p, list)]
    if texts:
        enc = tokenizer([prompts[i] for i in texts], add_special_tokens=True)["input_ids"]
        for i, ids in zip(texts, enc):
            rows[i] = list(ids)
    order = sorted(range(len(prompts)), key=lambda i: len(rows[i]))
    out: list[list[str]] = [[] for _ in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # a model may end on several
    own = own if isinstance(own, list) else [own]
    stops = [s for s in dict.fromkeys([tokenizer.eos_token_id, *own, *(stop_ids or [])]) if isinstance(s, int)]
    if seed is not None:
        torch.manual_seed(seed)
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress, leave=False)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, mask = left_pad([rows[i] for i in idx], pad)
            sample = temperature > 0
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
                top_k=None, num_return_sequences=num_return_sequences, pad_token_id=pad, eos_token_id=stops,
            )
            decoded = []
            for row in gen[:, ids.shape[1]:].tolist():
                cut = next((k for k, t in enumerate(row) if t in stops), len(row))  # up to the first stop
                decoded.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
            for j, i in enumerate(idx):
                out[i] = decoded[j * num_return_sequences:(j + 1) * num_return_sequences]
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out
