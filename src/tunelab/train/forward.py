"""The model side of the loss: hidden states from the body, the head only where there is loss.

Exact speed-ups over ``model(**batch).logits`` + cross-entropy, all on by default:
- the output head (V x D, the biggest matrix of a small model) runs only on supervised positions
  (``objectives.supervised_ce_sum``), never materialising (B, T, V) logits;
- a token prefix that every example of a batch shares (an instruction, a system prompt) is computed
  once per packed row instead of once per example: after it, the examples' own tokens are packed end to
  end into a few rows of about PACKED_ROW_TOKENS tokens, each token seeing the prefix and its own
  example only (a block-diagonal causal mask, position ids continuing the prefix): no padding, large
  matrix products (``prefix_packed_loss_sum``);
- without such a prefix (or with dropout, attention kernels other than sdpa/eager, batches over
  MAX_PACKED_TOKENS) the rows are regrouped by length and each group runs on its own, cut to its longest
  row (the loss is a sum over tokens, so the groups' sums add up to the batch's): for short examples
  this is cheaper than packed rows, whose attention grows with the row's square (measured);
- the last position of an example predicts nothing (there is no next token), so it is never computed.
``train.packing`` packs whole examples instead (no prefix sharing): the path for long examples on a GPU.
``train.compile`` compiles each decoder layer (``compile_layers``); evaluation and generation run eager.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import cast

import torch
from torch import nn

from ..data.types import IGNORE
from .objectives import masked_ce_sum, selected_ce_sum, supervised_ce_sum

MIN_SHARED_PREFIX = 2  # tokens; below this the second forward call costs more than it saves
MAX_PACKED_TOKENS = 8192  # prefix_packed_loss_sum: a batch's tokens after the prefix, at most
PACKED_ROW_TOKENS = 128  # prefix_packed_loss_sum: tokens a packed row aims at (attention cost ~ its square)


def compile_layers(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile each decoder layer in place (regional compilation: the layers share one code object,
    so one compiled graph serves them all, and the parameter names, hence checkpoints, do not change).
    Compiled for dynamic shapes from the start: a batch's length changes from batch to batch (length groups,
    packed rows), and compiling the first batch's shape before it costs a second compilation (cold, on the
    main job: 50 s to the first step instead of 71 s to the second; the same losses). Returns the count."""
    from ..dist import decoder_layers

    layers = decoder_layers(model)
    if not layers:
        from ..errors import TunelabError

        raise TunelabError("found no repeated decoder layers to compile in this model", "train.compile")
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def compile_unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``torch.compile`` with ``backend`` cannot generate code on ``device`` here, or None when it can:
    inductor needs a C++ compiler for the CPU and Triton for a GPU (the other backends need neither)."""
    if backend != "inductor":
        return None
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # torch raises InvalidCxxCompiler; older versions other errors
            return f"inductor found no C++ compiler for the CPU ({type(e).__name__})"
        return None
    from torch.utils._triton import has_triton

    return None if has_triton() else f"inductor needs Triton for {device.type}, which is not installed"


def eager() -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly (evaluation, generation: shapes change at every decoding step)."""
    if not hasattr(torch.compiler, "set_stance"):  # torch < 2.6: nothing can have been compiled (see config)
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def split_head(model) -> tuple[nn.Module, nn.Module] | None:
    """(body, output head) of a causal LM (PEFT-wrapped or not), or None when the logits are more than
    head(hidden) (soft-capping, logit scaling), in which case callers use the full forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                 "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0, 1):
            return None
    head = base.get_output_embeddings()
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if head is None or body is None or body is base:
        return None
    return body, head


def shared_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Length of the longest token prefix that every row shares, unpadded, leaving each row >= 1 token."""
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0)  # (T,)
    n = int(torch.cumprod(same.int(), 0).sum())
    shortest = int(attention_mask.sum(1).min())
    return min(n, shortest - 1)


def _has_active_dropout(model: nn.Module) -> bool:
    if not model.training:
        return False
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        attn_p = getattr(m, "attention_dropout", None)
        if isinstance(attn_p, float) and attn_p > 0:
            return True
    return False


def _cache_arg(body: nn.Module) -> str:
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def body_hidden(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                share_prefix: bool = True) -> torch.Tensor:
    """Final hidden states (B, T, D) of a right-padded batch."""
    B, T = input_ids.shape
    P = shared_prefix_len(input_ids, attention_mask) if share_prefix and B > 1 else 0
    if P < MIN_SHARED_PREFIX or _has_active_dropout(body):
        # (dropout would draw one mask for the shared prefix instead of one per row: not the same thing)
        return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    key = _cache_arg(body)
    pre = body(input_ids=input_ids[:1, :P], use_cache=True)  # (1, P, D) and the prefix's KV cache
    cache = getattr(pre, key)
    cache.batch_repeat_interleave(B)
    positions = torch.arange(P, T, device=input_ids.device)[None].expand(B, -1)
    rest = body(input_ids=input_ids[:, P:], attention_mask=attention_mask, position_ids=positions,
                use_cache=True, **{key: cache}).last_hidden_state  # (B, T-P, D)
    return torch.cat([pre.last_hidden_state.expand(B, -1, -1), rest], dim=1)


def length_groups(lengths: list[int], waste: float = 0.3) -> list[list[int]]:
    """Row indices in groups of similar length (shortest first): a group grows while its padding stays
    within ``waste`` of its real tokens, so most groups hold rows of one or two lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]  # sorted: the newest row is the longest of the group
        if cur and (len(cur) + 1) * n > (1 + waste) * (real + n):
            groups.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += n
    if cur:
        groups.append(cur)
    return groups


def _right_padded(mask: torch.Tensor) -> bool:
    lengths = mask.sum(1, keepdim=True)
    return bool((mask == (torch.arange(mask.shape[1], device=mask.device)[None] < lengths).long()).all())


def row_groups(batch: dict[str, torch.Tensor], regroup: bool = True):
    """The batch as groups of rows to run separately: (row indices or None, input_ids, attention_mask,
    labels), the inputs cut to the group's longest row minus its last position (which predicts nothing)
    and the labels to the longest row. Without regrouping (or for a batch that is not right-padded) the
    whole batch is one group with nothing cut."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if not (regroup and _right_padded(mask)):
        yield None, ids, mask, labels, False
        return
    lengths = mask.sum(1).tolist()
    for group in length_groups(lengths):
        L = max(lengths[i] for i in group)
        if L < 2:
            continue  # a one-token row predicts nothing
        idx = torch.tensor(group, device=ids.device)
        yield idx, ids[idx, :L - 1], mask[idx, :L - 1], labels[idx, :L], True


def pad_last(hidden: torch.Tensor, cut: bool) -> torch.Tensor:
    """Hidden states of a cut group back to the labels' length (the last position is shifted off anyway)."""
    return torch.nn.functional.pad(hidden, (0, 0, 0, 1)) if cut else hidden


def causal_lm_loss_sum(model, batch: dict[str, torch.Tensor], chunk: int = 2048,
                       share_prefix: bool = True, regroup: bool = True) -> tuple[torch.Tensor, int]:
    """Sum of CE over the supervised tokens of a padded batch, and their number."""
    parts = split_head(model)
    if parts is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return masked_ce_sum(logits, batch["labels"], batch.get("weight"))
    if share_prefix and regroup:
        done = prefix_packed_loss_sum(model, batch, chunk)
        if done is not None:
            return done
    body, head = parts

    def group_loss(idx, ids, mask, labels, cut, weight):
        hidden = pad_last(body_hidden(body, ids, mask, share_prefix), cut)
        return supervised_ce_sum(hidden, labels, head, weight, chunk)

    return sum_over_groups(batch, head, group_loss, regroup)


def sum_over_groups(batch: dict[str, torch.Tensor], head: nn.Module, group_loss, regroup: bool = True
                    ) -> tuple[torch.Tensor, int]:
    """Sum of ``group_loss(idx, ids, mask, labels, cut, weight)`` over the batch's row groups (see
    row_groups), with each group's example weights; a batch with nothing to compute gives a zero that
    still belongs to the graph (of ``head``'s parameters)."""
    weight = batch.get("weight")
    total: torch.Tensor | None = None
    count = 0
    for idx, ids, mask, labels, cut in row_groups(batch, regroup):
        w = weight if weight is None or idx is None else weight[idx]
        s, n = group_loss(idx, ids, mask, labels, cut, w)
        total = s if total is None else total + s
        count += n
    if total is None:  # (a head has parameters: the sum is a tensor)
        return cast(torch.Tensor, sum(p.sum() for p in head.parameters()) * 0.0), 0
    return total, count


def pack(batch: dict[str, torch.Tensor], capacity: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch as packed rows: each row holds whole examples end to end (first fit, in batch
    order) up to ``capacity`` tokens, with ``position_ids`` restarting at 0 for every example, so that
    transformers' masks keep each example to itself (a block-diagonal causal mask; varlen with flash
    attention). An example's first label is set to IGNORE: in a packed row the token before it belongs to
    the previous example. Per-token ``weight`` carries the examples' weights. Padding at a row's end is a
    segment of its own, without loss."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    weight = batch.get("weight")
    lengths = mask.sum(1).tolist()
    cap = max(capacity, max(lengths))
    rows: list[list[int]] = []
    used: list[int] = []
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        k = next((r for r in range(len(rows)) if used[r] + n <= cap), None)
        if k is None:
            rows.append([])
            used.append(0)
            k = len(rows) - 1
        rows[k].append(i)
        used[k] += n
    width = max(used)
    out_ids = torch.full((len(rows), width), pad_id, dtype=ids.dtype, device=ids.device)
    out_pos = torch.zeros((len(rows), width), dtype=torch.long, device=ids.device)
    out_lab = torch.full((len(rows), width), IGNORE, dtype=labels.dtype, device=ids.device)
    out_w = torch.zeros((len(rows), width), dtype=torch.float32, device=ids.device)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            out_ids[r, at:at + n] = ids[i, :n]
            out_pos[r, at:at + n] = torch.arange(n, device=ids.device)
            out_lab[r, at:at + n] = labels[i, :n]
            out_lab[r, at] = IGNORE
            out_w[r, at:at + n] = 1.0 if weight is None else float(weight[i])
            at += n
        if at < width:
            out_pos[r, at:] = torch.arange(width - at, device=ids.device)
    return {"input_ids": out_ids, "position_ids": out_pos, "labels": out_lab, "weight": out_w}


def packed_loss_sum(model, batch: dict[str, torch.Tensor], chunk: int = 2048, capacity: int = 8192
                    ) -> tuple[torch.Tensor, int]:
    """causal_lm_loss_sum's number over the batch packed (see ``pack``): no padding and one call per row."""
    parts = split_head(model)
    packed = pack(batch, capacity)
    if parts is None:
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        return masked_ce_sum(logits, packed["labels"], packed["weight"])
    body, head = parts
    hidden = body(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
                  ).last_hidden_state
    return supervised_ce_sum(hidden, packed["labels"], head, packed["weight"], chunk)


def _segment_mask(seg: torch.Tensor, attn: str, dtype) -> torch.Tensor:
    """(R, 1, L, L) attention mask of packed rows from each token's segment id (R, L): 0 is the shared
    prefix, which every token sees; otherwise a token sees, causally, its own segment. Boolean (True:
    attend) for sdpa; additive (0 or the dtype's minimum) for eager attention."""
    idx = torch.arange(seg.shape[1], device=seg.device)
    causal = idx[None, :] <= idx[:, None]  # (L, L)
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)  # (R, L, L)
    mask = (causal[None] & same)[:, None]
    if attn == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=seg.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def prefix_packed_loss_sum(model, batch: dict[str, torch.Tensor], chunk: int = 2048, row_tokens: int | None = None
                           ) -> tuple[torch.Tensor, int] | None:
    """causal_lm_loss_sum's number from one body call on a few packed rows: each row holds the prefix
    every example of the batch shares, then several examples' remaining tokens end to end, each token
    seeing the prefix and its own example, causally (a block mask; position ids continue the prefix),
    the head only on supervised positions. No padding to speak of (the rows are filled evenly), large
    matrix products, and rows short enough (about ``row_tokens``) that attention stays cheap. None when
    it does not apply (no split head, attention other than sdpa/eager, active dropout, a left-padded
    batch, no shared prefix of MIN_SHARED_PREFIX tokens, more than MAX_PACKED_TOKENS)."""
    parts = split_head(model)
    if parts is None:
        return None
    body, head = parts
    attn = getattr(body.config, "_attn_implementation", None)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if attn not in ("sdpa", "eager") or _has_active_dropout(body) or not _right_padded(mask):
        return None
    B = ids.shape[0]
    P = shared_prefix_len(ids, mask) if B > 1 else 0
    if P < MIN_SHARED_PREFIX:
        return None  # nothing to share: length groups are cheaper than packed rows (measured)
    lengths = mask.sum(1).tolist()
    segs = [n - 1 - P for n in lengths]  # an example's own positions P..n-2 (its last predicts nothing)
    total = sum(segs)
    if total > MAX_PACKED_TOKENS:
        return None  # long batches: length groups instead
    target = max(row_tokens or PACKED_ROW_TOKENS, max(segs))  # a row holds at least the longest example
    R = max(1, min(B, round(total / target)))
    load = [0] * R
    members: list[list[int]] = [[] for _ in range(R)]
    for i in sorted((i for i in range(B) if segs[i] > 0), key=lambda i: (-segs[i], i)):
        r = min(range(R), key=lambda k: (load[k], k))  # the emptiest row
        members[r].append(i)
        load[r] += segs[i]
    L = P + max(load)
    dev = ids.device
    pad = int(ids[0, 0])
    tok = torch.full((R, L), pad, dtype=ids.dtype, device=dev)
    pos = torch.zeros((R, L), dtype=torch.long, device=dev)
    seg = torch.zeros((R, L), dtype=torch.long, device=dev)
    where = {}  # example -> (row, first packed column of its own tokens)
    for r in range(R):
        tok[r, :P] = ids[0, :P]
        pos[r, :P] = torch.arange(P, device=dev)
        at = P
        for k, i in enumerate(members[r], 1):
            n = segs[i]
            tok[r, at:at + n] = ids[i, P:P + n]
            pos[r, at:at + n] = torch.arange(P, P + n, device=dev)
            seg[r, at:at + n] = k
            where[i] = (r, at)
            at += n
        if at < L:  # the row's end: a segment of its own, seeing itself only, without loss
            seg[r, at:] = len(members[r]) + 1
            pos[r, at:] = torch.arange(L - at, device=dev)
    amask = _segment_mask(seg, attn, body.dtype)
    h = body(input_ids=tok, position_ids=pos, attention_mask=amask, use_cache=False).last_hidden_state  # (R, L, D)
    h = h.reshape(R * L, -1)
    weight = batch.get("weight")
    wrow = torch.ones(B, device=dev) if weight is None else weight.to(dev, torch.float32)
    # position t of the prefix predicts token t+1 of every example (usually a prompt token: no loss)
    y_pre = labels[:, 1:P + 1]
    sel_pre = y_pre != IGNORE
    cols = [torch.arange(P, device=dev)[None].expand(B, P)[sel_pre]]  # row 0's prefix
    ys, ws = [y_pre[sel_pre]], [wrow[:, None].expand(B, P)[sel_pre]]
    for i, (r, at) in where.items():
        cols.append(r * L + at + torch.arange(segs[i], device=dev))
        ys.append(labels[i, P + 1:P + 1 + segs[i]])
        ws.append(wrow[i].expand(segs[i]))
    col, y, w = torch.cat(cols), torch.cat(ys), torch.cat(ws)
    sel = y != IGNORE
    if not bool(sel.any()):
        return h.sum() * 0.0, 0
    return selected_ce_sum(h[col[sel]], y[sel], w[sel], head, chunk)
