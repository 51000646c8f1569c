"""Verifiers for an augmented teacher: ``function(record, output) -> bool | float``.

``tunelab generate ... --verifier tunelab.verifiers:reversed_name`` scores every candidate the teacher
writes; a user's own verifier is any importable function with this signature.
"""

from __future__ import annotations


def reversed_name(record: dict, output: str) -> bool:
    """Is the output the record's name spelt backwards (the lecture's task)?"""
    return output.strip() == str(record["name"])[::-1]


def matches_completion(record: dict, output: str) -> bool:
    """Is the output the record's reference completion (after collapsing whitespace)?"""
    return " ".join(output.split()) == " ".join(str(record["completion"]).split())
