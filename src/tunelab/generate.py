"""Batched, KV-cached generation with left padding."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, num_return_sequences: int = 1,
             progress: bool = False, seed: int | None = None) -> list[list[str]]:
    """Completions for each prompt (``num_return_sequences`` each), decoded without special tokens.

    Prompts are sorted by length so each batch holds similar lengths, padded on the left so that every
    row's next token sits at the same position, and decoded with the model's KV cache (HF generate).
    temperature 0 is greedy.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[str]] = [[] for _ in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if seed is not None:
        torch.manual_seed(seed)
    try:
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress, leave=False)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            sample = temperature > 0
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=sample,
                temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
                num_return_sequences=num_return_sequences, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for j, i in enumerate(idx):
                out[i] = texts[j * num_return_sequences:(j + 1) * num_return_sequences]
            bar.update(len(idx))
        bar.close()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
