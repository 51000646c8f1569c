"""Best-of-K selection (the augmented teacher's pick) and pass@K, on hand-made scores."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.gen_data import Completion, PromptItem, best_of, pass_at_k


def completions(scored: list[list[tuple[str, float | None]]]) -> list[Completion]:
    """One prompt per inner list; each (text, score) a completion of it, in sample order."""
    out = []
    for p, samples in enumerate(scored):
        item = PromptItem({"name": f"n{p}"}, f"prompt {p}", f"f:{p + 1}")
        out += [Completion(item, j, text, score) for j, (text, score) in enumerate(samples)]
    return out


def test_best_of_picks_the_highest_score_per_prompt():
    comps = completions([[("a", 0.2), ("b", 0.9), ("c", 0.5)], [("x", 0.1), ("y", 0.0)]])
    assert [(c.item.where, c.text) for c in best_of(comps)] == [("f:1", "b"), ("f:2", "x")]


def test_ties_go_to_the_text_most_tied_samples_agree_on_then_the_earliest():
    comps = completions([[("p", 1.0), ("q", 1.0), ("q", 1.0), ("r", 0.3)], [("s", 1.0), ("t", 1.0)]])
    picked = best_of(comps)
    assert [c.text for c in picked] == ["q", "s"] and picked[0].sample == 1


def test_threshold_drops_prompts_whose_best_is_below_it():
    comps = completions([[("a", 0.4), ("b", 0.6)], [("c", 0.3), ("d", 0.2)], [("e", 0.5)]])
    assert [c.text for c in best_of(comps, min_score=0.5)] == ["b", "e"]


def test_unscored_completions_are_refused():
    with pytest.raises(TunelabError, match="best-of-K needs a score for every completion"):
        best_of(completions([[("a", None), ("b", 1.0)]]))


def test_pass_at_k_counts_prompts_with_any_right_completion():
    comps = completions([[("a", 0.0), ("b", 1.0)], [("c", 0.0), ("d", 0.0)], [("e", 1.0), ("f", 1.0)],
                         [("g", 0.0), ("h", 0.0)]])
    assert pass_at_k(comps) == 0.5
    assert pass_at_k(completions([[("a", 0.7)], [("b", 0.2)]]), threshold=0.5) == 0.5


def test_candidates_from_a_generated_file_are_grouped_by_prompt(tmp_path):
    from tunelab.gen_data import candidates_from_file

    rows = [{"name": "ab", "prompt": "P ab", "completion": " ba", "sample": 0, "score": 1.0},
            {"name": "ab", "prompt": "P ab", "completion": " ab", "sample": 1, "score": 0.0},
            {"name": "cd", "prompt": "P cd", "completion": " dc", "sample": 0},
            {"name": "ab", "prompt": "P ab", "completion": " x", "sample": 0}]  # the same prompt again, later
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, outputs = candidates_from_file(str(f))
    assert [i.record for i in items] == [{"name": "ab"}, {"name": "cd"}, {"name": "ab"}]
    assert [i.prompt for i in items] == ["P ab", "P cd", "P ab"]
    assert outputs == [[" ba", " ab"], [" dc"], [" x"]]
    f.write_text(json.dumps({"name": "ab", "prompt": "P ab"}) + "\n")
    with pytest.raises(TunelabError, match="field 'completion' must be a string") as e:
        candidates_from_file(str(f))
    assert e.value.where.endswith(":1")
