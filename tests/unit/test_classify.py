"""Classification head: pooling from the attention mask, the loss, metrics, save/load, export."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_model

from tunelab.classify import (
    SequenceClassifier,
    classification_ce_sum,
    export_sequence_classification,
    last_token_index,
    pool,
)
from tunelab.errors import TunelabError
from tunelab.evaluate import confusion_matrix, macro_f1, per_class


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(left).tolist() == [4, 4, 4]


def test_pooling_ignores_token_ids_when_pad_equals_eos():
    # pad == eos == 9: the row's own trailing eos (a real token) must be pooled, padding must not
    ids = torch.tensor([[5, 6, 9, 9, 9], [5, 9, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    assert torch.equal(pool(hidden, mask, "last"), torch.stack([hidden[0, 2], hidden[1, 4]]))
    assert ids.shape == mask.shape
    assert torch.equal(pool(hidden, mask, "first"), torch.stack([hidden[0, 0], hidden[1, 0]]))
    assert torch.allclose(pool(hidden, mask, "mean")[0], hidden[0, :3].mean(0))
    left = torch.tensor([[0, 0, 1, 1, 1]])
    assert torch.equal(pool(hidden[:1], left, "first"), hidden[0, 2][None])


def test_classification_ce_sum_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1])
    total, n = classification_ce_sum(logits, labels)
    e = math.exp
    expected = -math.log(e(2) / (e(2) + 2)) - math.log(e(1) / (1 + e(1) + e(3)))
    assert n == 2 and abs(float(total) - expected) < 1e-6
    weighted, _ = classification_ce_sum(logits, labels, torch.tensor([0.5, 2.0]))
    assert abs(float(weighted) - (0.5 * -math.log(e(2) / (e(2) + 2)) + 2 * -math.log(e(1) / (1 + e(1) + e(3))))) < 1e-6


def test_confusion_and_macro_f1_by_hand():
    gold = [0, 0, 1, 1, 2]
    pred = [0, 1, 1, 1, 0]
    m = confusion_matrix(gold, pred, 4)
    assert m == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    # F1: class0 2*1/(2+2)=0.5, class1 2*2/(2+3)=0.8, class2 0, class3 absent everywhere -> left out
    assert abs(macro_f1(m) - (0.5 + 0.8 + 0.0) / 3) < 1e-9
    # precision = tp / predicted as the class, recall = tp / its examples
    pc = per_class(m, ["a", "b", "c", "d"])
    assert pc["a"] == {"precision": 1 / 2, "recall": 1 / 2, "support": 2}
    assert pc["b"] == {"precision": 2 / 3, "recall": 1.0, "support": 2}
    assert pc["c"] == {"precision": 0.0, "recall": 0.0, "support": 1}
    assert pc["d"] == {"precision": 0.0, "recall": 0.0, "support": 0}


def test_the_printed_confusion_matrix_has_each_count_under_its_class():
    from tunelab.evaluate import format_confusion

    text = format_confusion({"labels": ["0", "1", "long-name"], "confusion": [[5, 0, 1], [0, 12, 0], [2, 0, 7]]})
    header, *rows = text.splitlines()
    assert header.startswith("true \\ predicted")
    # each count ends where its column's label ends (the labels sit right-aligned after the corner text)
    ends = [header.index(x, len("true \\ predicted")) + len(x) for x in ("0", "1", "long-name")]
    assert ends == sorted(ends)
    for row, counts in zip(rows, ([5, 0, 1], [0, 12, 0], [2, 0, 7])):
        for end, c in zip(ends, counts):
            assert row[:end].endswith(str(c)) and row[end:end + 1] in ("", " "), (row, end, c)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("clf") / "m")
    return path, AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_save_load_head_identical_logits_and_k_mismatch(tiny, tmp_path):
    path, lm, tok = tiny
    torch.manual_seed(0)
    clf = SequenceClassifier(lm, ["a", "b", "c"], "last", bias=True).eval()
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with torch.no_grad():
        ref = clf(ids, mask)
    clf.save_head(tmp_path)
    torch.manual_seed(1)
    again = SequenceClassifier(lm, ["a", "b", "c"], "last", bias=True).eval()
    with torch.no_grad():
        assert not torch.equal(again(ids, mask), ref)
        again.load_head(tmp_path)
        assert torch.equal(again(ids, mask), ref)
    with pytest.raises(TunelabError, match="3 classes"):
        SequenceClassifier(lm, ["a", "b"], "last", bias=True).load_head(tmp_path)


def test_padding_side_does_not_change_the_prediction(tiny):
    _, lm, tok = tiny
    clf = SequenceClassifier(lm, ["x", "y"], "last").eval()
    a = torch.tensor([[5, 6, 7, tok.pad_token_id]])
    b = torch.tensor([[tok.pad_token_id, 5, 6, 7]])
    with torch.no_grad():
        right = clf(a, torch.tensor([[1, 1, 1, 0]]))
        left = clf(b, torch.tensor([[0, 1, 1, 1]]), )
        alone = clf(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    assert torch.allclose(right, alone, atol=1e-5)
    # left padding shifts positions (RoPE is relative, the mask hides the pad): same logits
    assert torch.allclose(left, alone, atol=1e-4)


def test_class_probabilities_keep_no_graph(tiny):
    """Scoring builds no autograd graph: a critic scoring thousands of candidates once held every batch's
    activations alive through its probabilities (24 GB for 1200 texts)."""
    from tunelab.classify import class_probabilities
    from tunelab.data.formats import Example

    _, lm, _ = tiny
    clf = SequenceClassifier(lm, ["x", "y"], "last")
    assert any(p.requires_grad for p in clf.parameters())
    examples = [Example([5, 6, 7][: n + 1], [-100] * (n + 1), "t", "", f"f:{n}") for n in range(3)]
    probs = class_probabilities(clf, examples, 0, batch_size=2)
    assert probs.shape == (3, 2) and not probs.requires_grad and probs.grad_fn is None
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    assert clf.training  # left as it was


def test_export_to_transformers_sequence_classification(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    path, lm, tok = tiny
    torch.manual_seed(0)
    clf = SequenceClassifier(lm, ["neg", "pos", "mixed"], "last", bias=False).eval()
    export_sequence_classification(clf, tmp_path / "out", tok)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert hf.config.id2label == {0: "neg", 1: "pos", 2: "mixed"}
    pad = tok.pad_token_id
    ids = torch.tensor([[5, 6, 7, pad], [8, 9, 10, 11]])
    mask = (ids != pad).long()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids, attention_mask=mask).logits, clf(ids, mask), atol=1e-5)
    with pytest.raises(TunelabError, match="no bias"):
        export_sequence_classification(SequenceClassifier(lm, ["a", "b"], bias=True), tmp_path / "x", tok)
