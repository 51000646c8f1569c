"""The bad-input table: each case is a one-line error naming where the problem is, exit status 2, no
traceback, and no run directory or output file left behind. README's troubleshooting section lists them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tunelab, write_recipe

SEEDS = str(Path(__file__).resolve().parents[2] / "data" / "seed_tasks.jsonl")  # the shipped seed tasks

class Case:
    """Files for one case: the command line, the expected message, and paths that must not appear."""

    def __init__(self, tmp: Path, model: Path, chat_model: Path, names: Path) -> None:
        self.tmp, self.model, self.chat_model, self.names = tmp, model, chat_model, names
        self.recipe = tmp / "recipe.yaml"
        self.run = tmp / "run"

    def train(self, *overrides: str, **sections) -> list[str]:
        write_recipe(self.recipe, sections.pop("model", self.model), sections.pop("names", self.names), **sections)
        return ["train", str(self.recipe), *overrides]

    def jsonl(self, rows: list, name: str = "data.jsonl") -> Path:
        p = self.tmp / name
        p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return p

    def chat(self, rows: list, **chat) -> list[str]:
        data = self.jsonl(rows, "chat.jsonl")
        self.recipe.write_text(yaml.safe_dump({
            "task": "chat", "model": str(chat.pop("model", self.chat_model)),
            "data": {"train": str(data), "max_length": 200},
            "chat": {"template": "chatml", **chat}, "train": {"max_steps": 2, "batch_size": 2},
            "output": {"dir": str(self.run)}}))
        return ["train", str(self.recipe)]

    def sni(self, bad: dict, *overrides: str) -> list[str]:
        """A task directory holding a good task (evaluated) and a bad one (trained on)."""
        d = self.tmp / "tasks"
        d.mkdir()
        demos = [{"input": "a", "output": "a"}, {"input": "b", "output": "b"}]
        (d / "good.json").write_text(json.dumps({"Definition": ["Copy."], "Positive Examples": demos,
                                                 "Instances": [{"input": "c", "output": ["c"]}]}))
        (d / "bad.json").write_text(json.dumps(bad))
        self.recipe.write_text(yaml.safe_dump({
            "model": str(self.model), "sni": {"dir": str(d), "eval_tasks": ["good"], "positive": 0},
            "train": {"max_steps": 2, "batch_size": 2}, "output": {"dir": str(self.run)}}))
        return ["train", str(self.recipe), *overrides]

    def classify(self, rows: list | None = None, **classify) -> list[str]:
        src = {"path": str(self.jsonl(rows)) if rows else str(self.names), "text_field": "name"}
        self.recipe.write_text(yaml.safe_dump({
            "task": "classification", "model": str(self.model),
            "data": {"train": src, "max_length": 32},
            "classify": {"text": "Name: {name}.", "label": "{name|vowels}", **classify},
            "train": {"max_steps": 2, "batch_size": 2}, "output": {"dir": str(self.run)}}))
        return ["train", str(self.recipe)]

    def adapter_run(self, adapter_config: str) -> Path:
        """A LoRA run directory whose adapter_config.json holds ``adapter_config``."""
        d = self.fake_run(adapter=True)
        (d / "adapter" / "adapter_config.json").write_text(adapter_config)
        (d / "adapter" / "adapter_model.safetensors").write_bytes(b"")
        return d

    def truncated_model(self) -> Path:
        """A copy of the tiny model whose weights file is cut short (a download that died)."""
        import shutil

        d = self.tmp / "bad_model"
        shutil.copytree(self.model, d)
        w = d / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
        return d

    def fake_run(self, adapter: bool = False, **sections) -> Path:
        """A directory holding only a run's config.yaml (enough for commands that refuse early)."""
        write_recipe(self.recipe, self.model, self.names, **sections)
        d = self.tmp / "fake_run"
        d.mkdir()
        (d / "config.yaml").write_text(self.recipe.read_text())
        if adapter:
            (d / "adapter").mkdir()
        return d


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target, target_is_directory=True)
    return path


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def _mkdir(path: Path, with_file: bool = False) -> Path:
    path.mkdir()
    if with_file:
        (path / "f").write_text("x")
    return path


def _cache(tmp: Path) -> Path:
    """A teacher cache written for some other data."""
    import torch
    from safetensors.torch import save_file

    p = tmp / "teacher.safetensors"
    save_file({"logp": torch.zeros(1, 1), "index": torch.zeros(1, 1, dtype=torch.int32),
               "offsets": torch.zeros(2, dtype=torch.long)}, str(p),
              metadata={"fingerprint": "0" * 16, "examples": "1", "top_k": "1"})
    return p


def cases(c: Case) -> dict[str, tuple[object, str]]:
    """name -> (a function writing the case's files and returning the command line, the expected part of
    the error line). Each case writes only its own files, when it runs."""
    turn = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    return {
        # ---- configuration
        "config: unknown key": (lambda: c.train("train.lrr=1e-4"), "unknown key train.lrr (did you mean train.lr?)"),
        "config: unknown key in the recipe, with its line": (lambda: c.train(train={"warmup": 3}), "recipe.yaml:"),
        "config: wrong type": (lambda: c.train("train.batch_size=many"), "train.batch_size: expected an integer"),
        "config: value outside the choices": (lambda: c.train("train.mode=everything"),
                                              "train.mode: must be one of full, lora, head, freeze"),
        "config: invalid YAML": (lambda: ["train", str(_write(c.recipe, "train:\n  lr: [1e-4\n"))],
                                 "recipe.yaml:"),
        "config: negative learning rate": (lambda: c.train("train.lr=-1"), "train.lr: must be positive"),
        "config: override without =": (lambda: c.train("train.lr"), "expected key=value, got 'train.lr'"),
        "config: recipe not found": (lambda: ["train", str(c.tmp / "nope.yaml")], "nope.yaml: recipe not found"),
        "config: early stopping without evaluations": (
            lambda: c.train("train.early_stopping_patience=3"), "train.eval_every: early stopping needs periodic"),
        "config: duplicate class names": (lambda: c.classify(labels=["1", "1"]), "classify.labels: has duplicates"),
        "config: mixed precision in float16": (lambda: c.train("train.precision=mixed", "model.dtype=float16"),
                                               "train.precision: mixed keeps float32 weights and autocasts"),
        "config: a start token the tokenizer lacks": (lambda: c.train("model.bos_token=<nope>"),
                                                      "model.bos_token: '<nope>' is not a token"),
        # ---- data files
        "data: missing file": (lambda: c.train(names=c.tmp / "nope.txt"), "nope.txt: data file not found"),
        "data: malformed JSONL line": (lambda: c.train(data={
            "train": str(c.jsonl(['{"prompt": "a", "completion": "b"}', '{"prompt": "c", "completion": '])),
            "prompt": "{prompt}", "completion": "{completion}", "unique_by": None}), "data.jsonl:2: malformed JSON"),
        "data: template field absent": (lambda: c.train(data={
            "train": str(c.jsonl([{"prompt": "a", "output": "b"}])), "prompt": "{prompt}",
            "completion": "{completion}", "unique_by": None, "validation_size": 0}),
            "data.jsonl:1: missing field 'completion'"),
        "data: empty after filtering": (lambda: c.train(data={"max_length": 4}), "all 360 examples dropped"),
        "data: max_length shorter than a prompt": (lambda: c.train(data={"max_length": 4, "truncation": "truncate"}),
                                                   "shorter than the prompt"),
        "data: not UTF-8": (lambda: c.train(names=_write(c.tmp / "latin.txt", b"jos\xe9\n")),
                            "latin.txt: not UTF-8 text"),
        "data: unknown extension": (lambda: c.train(names=_write(c.tmp / "names.dat", "emma\n")),
                                    "names.dat: cannot tell the format from the extension '.dat'"),
        "data: hold-out larger than the data": (lambda: c.train("data.validation_size=400"),
                                                "data.validation_size: holding out 400 leaves no training"),
        "data: empty completion": (lambda: c.train(data={
            "train": str(c.jsonl([{"prompt": "a", "completion": " "}])), "prompt": "{prompt}",
            "completion": "{completion}", "unique_by": None, "validation_size": 0}), "data.jsonl:1: empty completion"),
        # ---- models and what trains
        "model: unknown alias": (lambda: c.train(model="smollm9-1t"), "unknown model alias 'smollm9-1t'"),
        "model: missing directory": (lambda: c.train(model=c.tmp / "no-model"), "does not exist"),
        "model: LoRA target matches nothing": (lambda: c.train(lora={"targets": ["q_prj"]}),
                                               "lora.targets: 'q_prj' matches no module"),
        "model: freeze pattern matches nothing": (lambda: c.train(train={"mode": "freeze", "trainable": ["nothing.*"]}),
                                                  "train.trainable: pattern 'nothing.*' matches no parameter"),
        # ---- chat records
        "chat: no assistant turn": (lambda: c.chat([{"messages": turn[:1]}]), "chat.jsonl:1: no assistant turn"),
        "chat: roles out of order": (lambda: c.chat([{"messages": turn[::-1]}]),
                                     "chat.jsonl:1: message 0: roles out of order"),
        "chat: unknown role": (lambda: c.chat([{"messages": [{"role": "robot", "content": "hi"}]}]),
                               "chat.jsonl:1: messages[0].role: unknown role 'robot'"),
        "chat: not a conversation": (lambda: c.chat([{"text": "hi"}]), "chat.jsonl:1: not a conversation"),
        "chat: unknown template": (lambda: c.chat([{"messages": turn}], template="nope"),
                                   "chat.template: unknown chat template 'nope'"),
        "chat: template without its special tokens": (lambda: c.chat([{"messages": turn}], model=c.model),
                                                      "chat.template: template chatml needs the special tokens"),
        "chat: a start token for every prompt": (lambda: c.chat([{"messages": turn}]) + ["model.bos_token=<s>"],
                                                 "model.bos_token: with task: chat the chat template decides"),
        "chat: unsafe template": (lambda: c.chat([{"messages": turn}], stop="<|im_end|>", template=str(
            _write(c.tmp / "t.jinja", "{{ ''.__class__.__mro__ }}"))), "tried something unsafe"),
        # ---- classification labels
        "classification: label outside the label set": (lambda: c.classify(labels=["0", "1"]),
                                                        "label '2' is not in the label set (0, 1)"),
        "classification: a single class": (lambda: c.classify([{"name": "bob"}, {"name": "tom"}]),
                                           "the training set has a single class ('1')"),
        "classification: empty text": (lambda: c.classify([{"name": "bob"}, {"name": " "}], text="{name}"),
                                       "data.jsonl:2: empty text"),
        # ---- distillation settings
        "kd: tokenizer mismatch": (lambda: c.train(kd={"teacher": str(c.chat_model)}),
                                   "kd.teacher: the teacher's tokenizer differs from the student's"),
        "kd: temperature not positive": (lambda: c.train(kd={"teacher": str(c.model), "temperature": 0}),
                                         "kd.temperature: must be positive, got 0.0"),
        "kd: alpha outside [0, 1]": (lambda: c.train(kd={"teacher": str(c.model), "alpha": 1.5}),
                                     "kd.alpha: must be in [0, 1], got 1.5"),
        "kd: cache for other data": (lambda: c.train(kd={"teacher": str(c.model), "cache": str(_cache(c.tmp))}),
                                     "teacher.safetensors: the cached teacher log-probabilities were computed for "
                                     "other data"),
        "kd: verifier that cannot be imported": (
            lambda: ["generate", str(c.model), "--recipe", c.train()[1], "--out", str(c.tmp / "g.jsonl"),
                     "--verifier", "no_such_module:check"], "--verifier: cannot import no_such_module"),
        "kd: verifier that raises": (
            lambda: ["generate", str(c.model), "--recipe", c.train()[1], "--out", str(c.tmp / "g.jsonl"), "--limit",
                     "2", "--max-new-tokens", "2", "--verifier", "json:loads"],
            "verifier json:loads raised TypeError"),
        "generate: a split without prompts": (
            lambda: ["generate", str(c.model), "--recipe", c.train()[1], "--split", "test", "--out",
                     str(c.tmp / "g.jsonl")], "recipe.yaml: the recipe's test split holds no prompts"),
        "generate: a critic that is not a classifier (found before generating)": (
            lambda: ["generate", str(c.model), "--recipe", c.train()[1], "--out", str(c.tmp / "g.jsonl"),
                     "--critic", str(c.fake_run())], "fake_run: the critic must be a classification run"),
        # ---- command-line arguments
        "cli: eval of a directory that is not a run": (lambda: ["eval", str(_mkdir(c.tmp / "empty"))],
                                                       "empty: not a run directory"),
        "cli: merge of a run without an adapter": (
            lambda: ["merge", str(c.fake_run(train={"mode": "full"})), str(c.tmp / "merged")], "no adapter/ to merge"),
        "cli: predict on a generation run": (lambda: ["predict", str(c.fake_run()), "emma"],
                                             "predict is for classification runs"),
        "cli: export of an unfinished run": (lambda: ["export", str(c.fake_run()), str(c.tmp / "exported")],
                                             "no adapter/ or model/ in the run directory"),
        "cli: chat with a recipe file": (lambda: ["chat", c.train()[1]], "not a recipe"),
        "cli: data show of a missing recipe": (lambda: ["data", "show", str(c.tmp / "x.yaml")], "recipe not found"),
        # ---- instruction tuning, prompt variations, control set
        "instruct: a template naming a field the record lacks": (
            lambda: c.train(instruct={"tasks": [{"name": "t", "templates": [
                {"prompt": "Reverse {nme}:", "completion": " {name|reverse}"}]}]}),
            "missing field 'nme' (used by instruct.tasks[t] template t/0 prompt)"),
        "instruct: an empty instruction": (
            lambda: c.train("data.format=alpaca", "data.unique_by=null", "data.validation_size=0",
                            data={"train": str(c.jsonl([
                {"instruction": "Reverse it.", "input": "ab", "output": "ba"},
                {"instruction": " ", "input": "ab", "output": "ba"}]))}),
            "data.jsonl:2: empty instruction (field 'instruction')"),
        "instruct: a negative mixture weight": (
            lambda: c.train(instruct={"mixing": "weighted", "tasks": [{"builtin": "reverse", "weight": -1}]}),
            "weight must be non-negative, got -1.0"),
        "instruct: all mixture weights zero": (
            lambda: c.train(instruct={"mixing": "weighted", "tasks": [{"builtin": "reverse", "weight": 0},
                                                                      {"builtin": "length", "weight": 0}]}),
            "all mixture weights are zero"),
        "instruct: held-out templates cover every template": (
            lambda: c.train(instruct={"tasks": [{"name": "t", "held_out_templates": [0, 1], "templates": [
                {"prompt": "A {name}", "completion": " {name}"}, {"prompt": "B {name}", "completion": " {name}"}]}]}),
            "held_out_templates covers all 2 templates"),
        "instruct: unknown built-in task": (lambda: c.train(instruct={"tasks": [{"builtin": "reverse_it"}]}),
                                            "unknown built-in task 'reverse_it'"),
        "instruct: every task held out": (
            lambda: c.train(instruct={"tasks": [{"builtin": "reverse"}], "held_out_tasks": ["reverse"]}),
            "every task is held out"),
        "eval: unknown prompt variations": (lambda: c.train("eval.variations=backwards"),
                                            "not a built-in task"),
        "eval: a control set in an unknown format": (
            lambda: c.train(eval={"control": str(c.jsonl([{"question": "2+2?", "expected": "4"}], "ctl.jsonl"))}),
            "ctl.jsonl:1: unknown control item format"),
        "eval: a control conversation the tokenizer cannot template (found before training)": (
            lambda: c.train("eval.before=false", eval={"control": str(c.jsonl(
                [{"messages": [{"role": "user", "content": "Hi?"}], "expected": "hi"}], "ctl.jsonl"))}),
            "chat.template: template chatml needs the special tokens <|im_start|>, <|im_end|>"),
        "generate: a top-p outside (0, 1] (found before loading the model)": (
            lambda: ["generate", str(c.model), "--input", str(c.jsonl([{"prompt": "hi"}], "p.jsonl")), "--top-p",
                     "1.5", "--temperature", "0.7", "--out", str(c.tmp / "g.jsonl")], "--top-p must be in (0, 1]"),
        "generate: a negative temperature": (
            lambda: ["generate", str(c.model), "--input", str(c.jsonl([{"prompt": "hi"}], "p.jsonl")),
                     "--temperature", "-1", "--out", str(c.tmp / "g.jsonl")], "--temperature must be 0 (greedy)"),
        "cli: eval --out a directory (found before evaluating)": (
            lambda: ["eval", str(c.fake_run()), "--out", str(_mkdir(c.tmp / "outdir"))],
            "outdir: is a directory: give a file to write"),
        "eval: max_examples below 1": (lambda: c.train("eval.max_examples=0"), "eval.max_examples: must be at least 1"),
        "eval: a split the data does not have": (lambda: c.train("eval.split=test"),
                                                 "eval.split: the data has no test split to evaluate"),
        "generate: self-instruct with one seed": (
            lambda: ["generate", str(c.model), "--self-instruct",
                     str(c.jsonl([{"instruction": "Say hi.", "output": "hi"}], "seeds.jsonl")),
                     "--out", str(c.tmp / "pool.jsonl")], "needs at least 2 seed tasks"),
        "generate: self-instruct with options it would ignore": (
            lambda: ["generate", str(c.model), "--self-instruct", SEEDS, "--limit", "1",
                     "--out", str(c.tmp / "pool.jsonl")], "--self-instruct builds its own prompts"),
        "generate: --out a directory (found before generating)": (
            lambda: ["generate", str(c.model), "--recipe", c.train()[1], "--out", str(_mkdir(c.tmp / "outdir")),
                     "--force"], "outdir: is a directory: give a file to write"),
        "generate: --out inside a file (found before generating)": (
            lambda: ["generate", str(c.model), "--self-instruct", SEEDS, "--out",
                     str(_write(c.tmp / "afile", "x") / "pool.jsonl")], "afile is a file, not a directory"),
        "instruct: a task weight under proportional mixing": (
            lambda: c.train(instruct={"tasks": [{"builtin": "reverse", "weight": 8}, {"builtin": "length"}]}),
            "instruct.tasks[reverse].weight: weight 8 has no effect with instruct.mixing: proportional"),
        "instruct: held-out evaluation with nothing held out": (
            lambda: c.train(instruct={"tasks": [{"builtin": "length"}], "eval_templates": "held_out"}),
            "instruct.eval_templates: no task has a held-out template or task to evaluate"),
        "sni: a task file without a Definition": (
            lambda: c.sni({"Instances": [{"input": "a", "output": ["b"]}]}), 'bad.json: missing "Definition"'),
        "sni: an instance without outputs": (
            lambda: c.sni({"Definition": ["Copy."], "Instances": [{"input": "a", "output": []}]}),
            'bad.json: "Instances"[0]: an instance without outputs'),
        "sni: more positive examples asked for than the task has": (
            lambda: c.sni({"Definition": ["Copy."], "Positive Examples": [{"input": "a", "output": "a"}],
                           "Instances": [{"input": "a", "output": ["a"]}]}, "sni.positive=2"),
            "bad.json: sni.positive=2, but the task has 1 positive examples"),
        "cli: merge into a file": (
            lambda: ["merge", str(c.fake_run(adapter=True)), str(_write(c.tmp / "afile", "x"))],
            "afile: exists and is not a directory"),
        "data: an empty prompt": (lambda: c.train(data={
            "train": str(c.jsonl([{"missing_ok": None, "name": "emma"}])), "prompt": "{missing_ok}",
            "completion": " {name}", "unique_by": None, "validation_size": 0}), "data.jsonl:1: empty prompt"),
        "data: a CSV quote never closed": (lambda: c.train(data={
            "train": str(_write(c.tmp / "d.csv", 'name\nemma\n"olivia\nava\n'))}),
            "d.csv:3: malformed CSV: unexpected end of data"),
        "data: a lone surrogate in JSON": (lambda: c.train(data={
            "train": str(c.jsonl(['{"name": "emma"}', '{"name": "bad \\ud800"}'])), "unique_by": None}),
            "data.jsonl:2: a string holds a lone UTF-16 surrogate"),
        "config: a recipe that is not UTF-8": (lambda: ["train", str(_write(c.tmp / "latin.yaml",
                                                                           b"model: caf\xe9\n"))],
                                                "latin.yaml: not UTF-8 text"),
        "eval: a display field the records lack (found before training)": (
            lambda: c.train("eval.display={nme}", "eval.before=false"), "missing field 'nme' (used by eval.display)"),
        "chat: a message that spells a special token": (
            lambda: c.chat([{"messages": [turn[0], {"role": "assistant", "content": "yes<|im_end|>"}]}]),
            "chat.jsonl:1: message 1 (assistant) contains the special token '<|im_end|>'"),
        "cli: merge of an adapter whose config is broken JSON": (
            lambda: ["merge", str(c.adapter_run('{')), str(c.tmp / "merged")],
            "adapter: a weights or config file here is corrupt or truncated"),
        "cli: student of a model whose weights file is truncated": (
            lambda: ["student", str(c.truncated_model()), str(c.tmp / "student"), "--layers", "0"],
            "bad_model: a weights or config file here is corrupt or truncated"),
        "cli: merge into a folder below a file (found before loading)": (
            lambda: ["merge", str(c.fake_run(adapter=True)), str(_write(c.tmp / "afile", "x") / "merged")],
            "afile is a file, not a directory"),
        "cli: student into a symbolic link": (
            lambda: ["student", str(c.model), str(_link(c.tmp / "link", _mkdir(c.tmp / "real"))), "--layers", "0",
                     "--force"], "link: is a symbolic link"),
        "cli: merge into a non-empty directory": (
            lambda: ["merge", str(c.fake_run(adapter=True)), str(_mkdir(c.tmp / "full", True))],
            "output directory exists and holds files tunelab did not make"),
    }


NAMES = list(cases(Case(Path("."), Path("."), Path("."), Path("."))))


def test_the_table_has_at_least_thirty_cases():
    assert len(NAMES) >= 30


def run_cli(argv: list[str], capfd) -> tuple[int, str]:
    """tunelab's main() in this process (the table is long: a subprocess each would cost minutes)."""
    from tunelab.cli import main

    capfd.readouterr()
    code = main(["--quiet", *argv])
    return code, capfd.readouterr().err


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_gives_one_line_error(tmp_path, tiny_model, tiny_chat_model, names_file, name, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = Case(tmp_path, tiny_model, tiny_chat_model, names_file)
    build, expected = cases(c)[name]
    argv = build()
    made = {p for p in tmp_path.rglob("*")}
    code, err = run_cli(argv, capfd)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tunelab: "), err
    assert expected in lines[0], lines[0]
    assert not c.run.exists(), "a failed run must leave no run directory"
    left = {p for p in tmp_path.rglob("*")} - made
    assert not left, f"left behind: {sorted(map(str, left))}"


@pytest.mark.parametrize("name", ["config: unknown key", "data: malformed JSONL line", "chat: no assistant turn",
                                  "cli: predict on a generation run"])
def test_bad_input_as_a_subprocess(tmp_path, tiny_model, tiny_chat_model, names_file, name):
    """A few of the table's cases as a user meets them: a process of its own, its exit status and stderr."""
    c = Case(tmp_path, tiny_model, tiny_chat_model, names_file)
    build, expected = cases(c)[name]
    proc = tunelab("--quiet", *build(), check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr
    assert not c.run.exists()


def test_debug_shows_the_traceback(tmp_path, tiny_model, names_file):
    write_recipe(tmp_path / "recipe.yaml", tiny_model, names_file)
    proc = tunelab("--debug", "train", str(tmp_path / "recipe.yaml"), "train.lrr=1", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
