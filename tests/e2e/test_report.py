"""report.html (rendered in a real browser), `tunelab report` for one or several runs, and tracking:
TensorBoard event files, W&B and MLflow calls."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import pytest
from conftest import tunelab, write_recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, names_file):
    tmp = tmp_path_factory.mktemp("report")
    out = []
    for lr in ("5e-3", "1e-3"):
        recipe = write_recipe(tmp / f"r{lr}.yaml", tiny_model, names_file, train={"max_steps": 6, "lr": lr},
                              eval={"variations": "reverse", "max_examples": 4}, output={"dir": str(tmp / f"run{lr}")})
        tunelab("train", str(recipe))
        out.append(tmp / f"run{lr}")
    return out


def test_every_run_writes_a_self_contained_report(runs):
    page = (runs[0] / "report.html").read_text()
    for part in ("<h2>summary</h2>", "training loss (smoothed)", "learning rate", "gradient norm",
                 "before and after fine-tuning", "robustness to prompt variations", "<h2>data</h2>",
                 'class="sup"', "<h2>configuration</h2>", "Reverse the name: {name}. Answer:"):
        assert part in page, part
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert page.count("<svg") >= 4 and page.count("<polyline") >= 4


def test_report_command_rebuilds_and_compares(runs, tmp_path):
    (runs[0] / "report.html").unlink()
    proc = tunelab("report", str(runs[0]))
    assert proc.stdout.strip().endswith("report.html") and (runs[0] / "report.html").exists()
    cmp = tmp_path / "cmp.html"
    tunelab("report", *map(str, runs), "--out", str(cmp))
    page = cmp.read_text()
    assert runs[0].name in page and runs[1].name in page
    assert "what differs in the configurations" in page and "train.lr" in page
    bad = tunelab("report", str(tmp_path), check=False)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr
    isdir = tunelab("report", *map(str, runs), "--out", str(tmp_path), check=False)
    assert isdir.returncode == 2 and "is a directory" in isdir.stderr.strip().splitlines()[-1]
    # two runs in directories of the same name: both curves in every chart, told apart by their paths
    twins = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    for src, dst in zip(runs, twins):
        shutil.copytree(src, dst)
    tunelab("report", *map(str, twins), "--out", str(cmp))
    page = cmp.read_text()
    assert page.count("<polyline") == 2 * _curves_drawn(runs[0]) and "a/run" in page and "b/run" in page


def _curves_drawn(run) -> int:
    """How many curves a one-run report of ``run`` draws."""
    return (run / "report.html").read_text().count("<polyline")


def test_run_labels_tell_same_named_runs_apart(tmp_path):
    from tunelab.report import run_labels

    assert run_labels([tmp_path / "x" / "a", tmp_path / "y" / "b"]) == ["a", "b"]
    assert run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run", tmp_path / "z"]) == ["x/run", "y/run", "z"]
    assert run_labels([tmp_path / "r", tmp_path / "r"]) == ["r #1", "r #2"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium (make test installs Debian's chromium package)")
def test_the_report_renders_in_headless_chromium(runs, tmp_path):
    from PIL import Image

    url = (runs[0] / "report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2600"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<svg") >= 4 and "<table" in dom and "robustness to prompt variations" in dom
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2600)
    px = list(img.getdata())
    # the plots' first line colour (#1f77b4) and dark text are on the page: the charts and tables rendered
    blue = sum(1 for r, g, b in px if abs(r - 31) < 40 and abs(g - 119) < 40 and abs(b - 180) < 40)
    dark = sum(1 for r, g, b in px if r + g + b < 150)
    assert blue > 500, f"no plotted lines visible ({blue} blue pixels)"
    assert dark > 5000, "no text visible"
    assert len(set(px[:: 97])) > 20  # not a blank page


def test_tensorboard_event_files(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (runs[0] / "tensorboard").iterdir() if False else [runs[0] / "tensorboard"]
    acc = EventAccumulator(str(events))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    metrics = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [round(e.value, 4) for e in loss] == [round(m["loss"], 4) for m in metrics]
    assert "eval/exact_match" in acc.Tags()["scalars"]


FAKE = '''
import json, os
def _rec(*call):
    with open(os.environ["TUNELAB_FAKE_LOG"], "a") as f:
        f.write(json.dumps([__name__, *call], default=str) + "\\n")
'''


def test_wandb_and_mlflow_are_called_as_their_apis_expect(tmp_path, tiny_model, names_file):
    """Stand-ins record the calls (the real packages are not installed here); the run logs every step."""
    fakes = tmp_path / "fakes"
    (fakes / "wandb").mkdir(parents=True)
    (fakes / "mlflow").mkdir()
    (fakes / "wandb" / "__init__.py").write_text(FAKE + textwrap.dedent('''
        class _Run:
            summary = type("S", (), {"update": staticmethod(lambda d: _rec("summary", d))})()
            def log(self, values, step): _rec("log", step, values)
            def finish(self): _rec("finish")
        def init(**kw):
            _rec("init", kw)
            return _Run()
        '''))
    (fakes / "mlflow" / "__init__.py").write_text(FAKE + textwrap.dedent('''
        def set_tracking_uri(uri): _rec("set_tracking_uri", uri)
        def set_experiment(name): _rec("set_experiment", name)
        def start_run(run_name=None, run_id=None):
            _rec("start_run", run_name, run_id)
            return type("R", (), {"info": type("I", (), {"run_id": "ml-" + str(os.getpid())})})()
        def log_params(p): _rec("log_params", p)
        def log_metrics(m, step): _rec("log_metrics", step, m)
        def end_run(): _rec("end_run")
        '''))
    log = tmp_path / "calls.jsonl"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file, train={"max_steps": 3},
                          output={"dir": str(tmp_path / "run"), "report_to": ["wandb", "mlflow"]})
    import os

    env = {"PYTHONPATH": f"{fakes}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TUNELAB_FAKE_LOG": str(log)}
    env.pop("WANDB_MODE", None)
    tunelab("train", str(recipe), env=env)
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    wb = [c[1:] for c in calls if c[0] == "wandb"]
    assert wb[0][0] == "init" and wb[0][1]["mode"] == "offline" and wb[0][1]["config"]["train"]["max_steps"] == 3
    assert [c[1] for c in wb if c[0] == "log"] == [1, 2, 3] and wb[-1] == ["finish"]
    assert any(c[0] == "summary" and "eval/exact_match" in c[1] for c in wb)
    ml = [c[1:] for c in calls if c[0] == "mlflow"]
    assert ml[0][0] == "set_tracking_uri" and ml[0][1].startswith("file:") and ml[0][1].endswith("/run/mlruns")
    assert any(c[0] == "log_params" and c[1]["train.max_steps"] == "3" for c in ml)
    assert [c[1] for c in ml if c[0] == "log_metrics"][:3] == [1, 2, 3] and ml[-1] == ["end_run"]
    assert not (tmp_path / "run" / "tensorboard").exists()  # not asked for
    # a run killed and resumed continues the same W&B and MLflow runs; a fresh run starts new ones
    log.unlink()
    args = ["train", str(recipe), "train.max_steps=4", "train.checkpoint_every=1"]
    assert tunelab(*args, "output.overwrite=true", env={**env, "TUNELAB_FAULT": "kill-step:3"},
                   check=False).returncode != 0
    tunelab(*args, "--resume", env=env)
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    inits = [c[2]["id"] for c in calls if c[:2] == ["wandb", "init"]]
    starts = [c[2:] for c in calls if c[:2] == ["mlflow", "start_run"]]
    assert len(inits) == 2 and inits[0] == inits[1] and inits[0] != wb[0][1]["id"]
    first = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
    assert starts == [["r", None], [None, first]]
    ml = [c[1] for c in calls if c[0] == "mlflow"]
    second = [i for i, c in enumerate(ml) if c == "start_run"][1]
    assert "log_params" in ml[:second] and "log_params" not in ml[second:]  # parameters logged once


def test_an_uninstalled_tracker_is_a_one_line_error(tmp_path, tiny_model, names_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    for value, msg in (("[comet]", "unknown tracker 'comet'"), ("[wandb]", "wandb is not installed")):
        proc = tunelab("train", str(recipe), f"output.report_to={value}", check=False)
        assert proc.returncode == 2 and msg in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "run").exists()
