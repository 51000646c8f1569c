"""A process that torchrun launched leaves through os._exit with main()'s status, its output flushed (the
interpreter's clean-up beside gloo's threads can abort a run that finished); any other caller gets the status."""

from __future__ import annotations

import pytest

from tunelab import cli


class Left(Exception):
    pass


def test_a_launched_worker_leaves_with_the_status_and_its_output_flushed(monkeypatch, capsys):
    codes: list[int] = []

    def exit_(code: int) -> None:
        codes.append(code)
        raise Left

    monkeypatch.setattr(cli.os, "_exit", exit_)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(Left):
        cli.main(["recipes"])
    assert codes == [0] and "reverse_names" in capsys.readouterr().out
    with pytest.raises(Left):
        cli.main(["--quiet", "train", "no/such/recipe.yaml"])
    assert codes == [0, 2]


def test_a_single_process_returns_its_status(monkeypatch):
    monkeypatch.setattr(cli.os, "_exit", lambda code: pytest.fail("os._exit outside a launched worker"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main(["--quiet", "train", "no/such/recipe.yaml"]) == 2
