"""The fast loss path equals the plain one: full logits + masked CE, for loss and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from tunelab.data.batching import collate
from tunelab.data.formats import Example, mask_prompt
from tunelab.errors import TunelabError
from tunelab.train.forward import body_hidden, causal_lm_loss_sum, length_groups, shared_prefix_len, split_head
from tunelab.train.objectives import masked_ce_sum


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("fwd") / "m")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _batch(tok, names, shared=True):
    exs = []
    for n in names:
        prompt = f"Reverse the name: {n}. Answer:" if shared else f"{n} reversed is"
        p = tok(prompt)["input_ids"]
        t = tok(" " + n[::-1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels = mask_prompt(p, t)
        exs.append(Example(ids, labels, prompt, n[::-1], "test"))
    return collate(exs, tok.pad_token_id)


def test_shared_prefix_len():
    ids = torch.tensor([[1, 2, 3, 4, 0], [1, 2, 3, 5, 6], [1, 2, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert shared_prefix_len(ids, mask) == 2
    assert shared_prefix_len(ids[:2], mask[:2]) == 3
    # never the whole of the shortest row: each row keeps at least one token of its own
    assert shared_prefix_len(torch.tensor([[1, 2], [1, 2]]), torch.ones(2, 2, dtype=torch.long)) == 1


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_all_match(results):
    """Each (loss, count, grads) after the first equals the first (the plain computation)."""
    (l0, n0, g0) = results[0]
    for loss, n, g in results[1:]:
        assert n == n0
        assert abs(loss - l0) < 1e-5 * max(1.0, abs(l0))
        assert g.keys() == g0.keys() and g
        for k in g0:
            assert torch.allclose(g[k], g0[k], atol=1e-5, rtol=1e-4), k


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fast_path_equals_full_logits(tiny, mode):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    torch.manual_seed(0)
    m = model
    if mode == "lora":
        import copy

        m = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             init_lora_weights=False))
    m.train()
    batch = _batch(tok, ["emma", "olivia", "ava", "isabella", "sophia", "jo", "christopher", "ella"])
    assert shared_prefix_len(batch["input_ids"], batch["attention_mask"]) >= 2
    assert len(set(batch["attention_mask"].sum(1).tolist())) >= 4  # rows of several lengths: regrouped

    results = []
    for how in ("plain", "fast", "fast-no-prefix", "fast-no-regroup"):
        m.zero_grad()
        if how == "plain":
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, n = masked_ce_sum(logits, batch["labels"])
        else:
            loss, n = causal_lm_loss_sum(m, batch, chunk=7, share_prefix=how != "fast-no-prefix",
                                         regroup=how != "fast-no-regroup")
        loss.backward()
        results.append((float(loss), n, _grads(m)))
    _assert_all_match(results)


def test_prefix_sharing_hidden_states_match(tiny):
    model, tok = tiny
    body, _ = split_head(model)
    batch = _batch(tok, ["emma", "jo", "christopher"])
    with torch.no_grad():
        a = body_hidden(body, batch["input_ids"], batch["attention_mask"], share_prefix=True)
        b = body_hidden(body, batch["input_ids"], batch["attention_mask"], share_prefix=False)
    mask = batch["attention_mask"].bool()
    assert torch.allclose(a[mask], b[mask], atol=1e-5)


def test_no_shared_prefix_falls_back(tiny):
    model, tok = tiny
    batch = _batch(tok, ["emma", "olivia"], shared=False)
    assert shared_prefix_len(batch["input_ids"], batch["attention_mask"]) < 2
    with torch.no_grad():
        loss, n = causal_lm_loss_sum(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref, n_ref = masked_ce_sum(logits, batch["labels"])
    assert n == n_ref and abs(float(loss) - float(ref)) < 1e-4


def test_length_groups():
    assert length_groups([5, 3, 5, 3, 9], waste=0.0) == [[1, 3], [0, 2], [4]]
    # a row one token longer joins while the padding stays within 10% of the real tokens
    assert length_groups([10, 10, 10, 11], waste=0.1) == [[0, 1, 2, 3]]
    assert length_groups([10, 20], waste=0.1) == [[0], [1]]
    groups = length_groups([7, 3, 12, 3, 8, 7, 15, 4], waste=0.25)
    assert sorted(i for g in groups for i in g) == list(range(8))
    for g in groups:
        lens = [[7, 3, 12, 3, 8, 7, 15, 4][i] for i in g]
        assert len(g) * max(lens) <= 1.25 * sum(lens)


def test_regrouped_loss_with_example_weights(tiny):
    model, tok = tiny
    batch = _batch(tok, ["emma", "olivia", "christopher", "jo"])
    batch["weight"] = torch.tensor([1.0, 0.5, 2.0, 0.0])
    with torch.no_grad():
        a, n = causal_lm_loss_sum(model, batch, regroup=True)
        b, m = causal_lm_loss_sum(model, batch, regroup=False)
    assert n == m and abs(float(a) - float(b)) < 1e-5 * max(1.0, abs(float(b)))


def test_pack_layout():
    from tunelab.train.forward import pack

    batch = {"input_ids": torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]),
             "labels": torch.tensor([[-100, 2, 3, -100], [4, 5, -100, -100], [-100, -100, 8, 9]]),
             "weight": torch.tensor([1.0, 0.5, 2.0])}
    p = pack(batch, capacity=6)
    # first fit in batch order: [ex0 + ex1] (5 tokens) and [ex2] (4), padded to 5 with a segment of its own
    assert p["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert p["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, -100, 8, 9, -100]]
    assert p["weight"].tolist() == [[1, 1, 1, 0.5, 0.5], [2, 2, 2, 2, 0]]
    assert pack(batch, capacity=2)["input_ids"].shape == (3, 4)  # capacity below the longest example: raised


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_packed_loss_and_grads_equal_the_padded_batch(tiny, mode):
    """Packing is exact: each example attends only to itself, so loss and gradients are the padded batch's."""
    from peft import LoraConfig, get_peft_model

    from tunelab.train.forward import packed_loss_sum

    model, tok = tiny
    m = model
    if mode == "lora":
        import copy

        m = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             init_lora_weights=False))
    m.train()
    batch = _batch(tok, ["emma", "olivia", "ava", "isabella", "sophia", "jo", "christopher", "ella"], shared=False)
    batch["weight"] = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.0, 1.5, 1.0])
    results = []
    for how in ("plain", "packed-one-row", "packed-rows"):
        m.zero_grad()
        if how == "plain":
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, n = masked_ce_sum(logits, batch["labels"], batch["weight"])
        else:
            loss, n = packed_loss_sum(m, batch, chunk=7, capacity=10_000 if how == "packed-one-row" else 24)
        loss.backward()
        results.append((float(loss), n, _grads(m)))
    _assert_all_match(results)


def test_packed_rows_isolate_examples_under_flex_attention(tiny):
    """train.packing with model.attention=flex_attention (the GPU benchmark's kernel): transformers builds
    flex's block mask from the restarting position_ids, so no token of one packed row attends across
    examples and the packed loss is the padded batch's. Forward only: FlexAttention has no backward on a CPU."""
    import copy

    from tunelab.train.forward import packed_loss_sum

    model, tok = tiny
    m = copy.deepcopy(model).eval()
    batch = _batch(tok, ["emma", "olivia", "ava", "isabella", "sophia", "jo", "christopher", "ella"], shared=False)
    batch["weight"] = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.0, 1.5, 1.0])
    with torch.no_grad():
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref, n_ref = masked_ce_sum(logits, batch["labels"], batch["weight"])
        m.config._attn_implementation = "flex_attention"
        loss, n = packed_loss_sum(m, batch, chunk=7, capacity=10_000)  # all eight examples in one row
    assert n == n_ref
    assert abs(float(loss) - float(ref)) < 1e-5 * max(1.0, abs(float(ref)))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_prefix_packed_loss_and_grads_equal_the_padded_batch(tiny, mode, attn):
    """The shared prefix once, then every row's rest packed in one row attending to its cache: exact."""
    import copy

    from peft import LoraConfig, get_peft_model

    from tunelab.train.forward import prefix_packed_loss_sum

    model, tok = tiny
    m = copy.deepcopy(model)
    m.config._attn_implementation = attn
    if mode == "lora":
        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    m.train()
    batch = _batch(tok, ["emma", "olivia", "ava", "isabella", "sophia", "jo", "christopher", "ella"])
    batch["weight"] = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.0, 1.5, 1.0])
    batch["labels"][2, 2] = batch["input_ids"][2, 2]  # a supervised token inside the shared prefix, for one row
    assert shared_prefix_len(batch["input_ids"], batch["attention_mask"]) >= 3
    results = []
    for how in ("plain", None, 8, 3):  # one packed row; rows of ~8 tokens (padded at their ends); one per example
        m.zero_grad()
        if how == "plain":
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, n = masked_ce_sum(logits, batch["labels"], batch["weight"])
        else:
            loss, n = prefix_packed_loss_sum(m, batch, chunk=7, row_tokens=how or 10_000)
        loss.backward()
        results.append((float(loss), n, _grads(m)))
    _assert_all_match(results)
    # where it does not apply it says so (the caller takes the length groups)
    other = _batch(tok, ["emma", "olivia", "christopher", "jo", "ava"], shared=False)
    assert shared_prefix_len(other["input_ids"], other["attention_mask"]) < 2
    assert prefix_packed_loss_sum(m, other) is None
    m.config._attn_implementation = "flex_attention"
    other = batch
    assert prefix_packed_loss_sum(m, other) is None


def test_compiled_layers_give_the_same_loss_and_gradients(tiny):
    """train.compile: each decoder layer compiled in place (aot_eager here: no code generation on the test
    machine); loss and gradients equal the eager model's, over batches of changing shapes; names unchanged."""
    import copy

    from tunelab.train.forward import compile_layers, eager

    model, tok = tiny
    ref, m = copy.deepcopy(model), copy.deepcopy(model)
    assert compile_layers(m, "aot_eager") == model.config.num_hidden_layers
    with pytest.raises(TunelabError, match="no repeated decoder layers"):
        compile_layers(torch.nn.Linear(2, 2), "aot_eager")
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    ref.train()
    m.train()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for names in (["emma", "olivia", "ava"], ["isabella", "sophia", "jo", "christopher"]):
        results = []
        for net in (ref, m):
            net.zero_grad()
            loss, n = causal_lm_loss_sum(net, _batch(tok, names, shared=False), chunk=5)
            loss.backward()
            results.append((loss.item(), n, _grads(net)))
        _assert_all_match(results)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the compiled layers did run
    with eager():  # evaluation runs the same layers without compiling for each decoding shape
        m.eval()
        ids = tok("Reverse the name: emma. Answer:", return_tensors="pt")["input_ids"]
        out = m.generate(ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(out, ref.eval().generate(ids, max_new_tokens=3, do_sample=False))
