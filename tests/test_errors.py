"""One error base class: the CLI prints treeopt's own errors in one line (exit 2) and lets
unexpected ones keep their traceback; bad settings fail fast with one line."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cpu_budget

import treeopt.cli as cli
from treeopt.cli import main
from treeopt.decode.sampling import Sampling, SamplingError
from treeopt.errors import TreeoptError, UserError
from treeopt.profile import Profile

ERRORS = {
    "treeopt.tree": "TreeError", "treeopt.growmap": "GrowmapError",
    "treeopt.shapes": "ShapeError", "treeopt.viz": "VizError",
    "treeopt.profile.model": "ProfileError", "treeopt.profile.latency": "LatencyError",
    "treeopt.profile.acceptance": "AcceptanceError", "treeopt.search.dp": "DPError",
    "treeopt.search.hardware": "HardwareError", "treeopt.pipeline": "PipelineError",
    "treeopt.search.optuna_search": "OptunaSearchError",
    "treeopt.decode.sampling": "SamplingError", "treeopt.decode.engine": "DecodeError",
    "treeopt.api": "GenerateError", "treeopt.decode.attention": "CacheError",
    "treeopt.models.loading": "ModelError", "treeopt.decode.drafter": "DrafterError",
    "treeopt.drafters.datastore": "DatastoreError", "treeopt.evaluate.runner": "EvalError",
    "treeopt.datasets": "DatasetError", "treeopt.evaluate.report": "ReportError",
    "treeopt.bench.attention": "BenchError",
}


def test_every_error_class_shares_the_base_and_stays_a_value_error():
    for module, name in ERRORS.items():
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, TreeoptError) and issubclass(cls, ValueError), name
    assert issubclass(UserError, TreeoptError) and cli.UserError is UserError


def test_no_treeopt_module_defines_an_error_outside_the_base():
    import pkgutil

    import treeopt

    strays = []
    for info in pkgutil.walk_packages(treeopt.__path__, "treeopt."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional dependency is missing
            continue
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Exception)
                    and obj.__module__ == module.__name__ and not issubclass(obj, TreeoptError)):
                strays.append(f"{module.__name__}.{obj.__name__}")
    assert strays == []


def _fake_command(monkeypatch, exc: BaseException):
    """Make ``treeopt boom`` raise ``exc``."""

    def build_parser(commands=None):
        parser = argparse.ArgumentParser(prog="treeopt")
        sub = parser.add_subparsers(dest="command")
        boom = sub.add_parser("boom")
        boom.add_argument("--threads", type=int)

        def run(args):
            raise exc

        boom.set_defaults(func=run)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)


def test_own_errors_are_one_line_exit_2(monkeypatch, capsys):
    from treeopt.profile.model import ProfileError

    for exc in (ProfileError("p.json: bad field 'x'\nmore detail"), UserError("--foo is bad"),
                FileNotFoundError(2, "No such file or directory", "missing.json")):
        _fake_command(monkeypatch, exc)
        assert main(["boom"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("treeopt boom: error: ")
        assert "Traceback" not in err
    _fake_command(monkeypatch, FileNotFoundError(2, "No such file or directory", "missing.json"))
    main(["boom"])
    assert "missing.json: No such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize("exc", [ValueError("shapes (3,) and (4,) not aligned"), KeyError("x"),
                                 RuntimeError("CUDA error"), OSError("no filename")])
def test_internal_errors_keep_their_traceback(monkeypatch, exc):
    _fake_command(monkeypatch, exc)
    with pytest.raises(type(exc)):
        main(["boom"])


def test_internal_value_error_in_a_real_command_is_not_a_user_error(tmp_path, monkeypatch):
    """A plain ValueError deep inside a command (numpy, torch) is a bug: traceback."""
    from treeopt.tree import Tree

    prof = Profile([0.6, 0.1, 0.05]).save(tmp_path / "p.json")

    def broken(self, table):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(Tree, "expected_tokens", broken)
    with pytest.raises(ValueError, match="broadcast"):
        main(["compare", "--profile", str(prof), "chain:4"])


def test_interrupt_note_is_printed(monkeypatch, capsys):
    _fake_command(monkeypatch, KeyboardInterrupt("partial results in x.json; rerun with --resume"))
    assert main(["boom"]) == 130
    err = capsys.readouterr().err
    assert err == "treeopt boom: interrupted; partial results in x.json; rerun with --resume\n"
    _fake_command(monkeypatch, KeyboardInterrupt())
    assert main(["boom"]) == 130
    assert capsys.readouterr().err == "treeopt boom: interrupted\n"


@pytest.mark.parametrize("threads", ["0", "-1"])
@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "hi", "--target", "/nonexistent/model"],
    ["profile", "latency", "--target", "/nonexistent/model", "--out", "x.json"],
    ["profile", "acceptance", "--target", "/nonexistent/model", "--draft", "early-exit:1",
     "--out", "x.json"],
    ["tune", "--target", "/nonexistent/model", "--draft", "early-exit:1", "--out-dir", "OUT"],
    ["bench", "attention", "--batch", "1", "--context", "4", "--tree-sizes", "2",
     "--repeats", "1", "--warmup", "0"],
    ["bench", "verify", "--target", "/nonexistent/model"],
    ["eval", "--target", "/nonexistent/model", "--out", "OUT"],
])
def test_threads_below_one_is_one_line_everywhere(command, threads, tmp_path, monkeypatch,
                                                  capsys):
    monkeypatch.chdir(tmp_path)
    command = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert main(command + ["--threads", threads]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--threads must be >= 1, got {threads}" in err


def test_bench_attention_bad_sizes_are_one_line(capsys):
    base = ["bench", "attention", "--batch", "1", "--context", "4", "--tree-sizes", "2",
            "--repeats", "1", "--warmup", "0"]
    for flag in ("--heads", "--head-dim"):
        assert main(base + [flag, "0"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag} must be >= 1" in err
    from treeopt.bench.attention import BenchError, bench_attention

    with pytest.raises(BenchError, match="heads"):
        bench_attention([1], [4], [2], heads=0, repeats=1, warmup=0)


# ------------------------------------------------------------------ Optuna storage
def test_bad_optuna_storage_is_refused_up_front(tmp_path):
    from treeopt.search.optuna_search import OptunaSearchError, resolve_storage

    with pytest.raises(OptunaSearchError, match="is a folder"):
        resolve_storage(str(tmp_path), tmp_path / "d.db")
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    with pytest.raises(OptunaSearchError, match="not an SQLite database"):
        resolve_storage(str(text), tmp_path / "d.db")
    with pytest.raises(OptunaSearchError, match="not an SQLite database"):
        resolve_storage(f"sqlite:///{text}", tmp_path / "d.db")
    with pytest.raises(OptunaSearchError, match="unknown or malformed"):
        resolve_storage("nosuchdb://host/study", tmp_path / "d.db")
    with pytest.raises(OptunaSearchError, match="is a file, not a folder"):
        resolve_storage(str(text / "sub" / "s.db"), tmp_path / "d.db")
    # what works still works: new files (folders created), URLs, the default
    assert resolve_storage(str(tmp_path / "new" / "s.db"), "x") == \
        f"sqlite:///{tmp_path / 'new' / 's.db'}"
    assert (tmp_path / "new").is_dir()
    assert resolve_storage(None, tmp_path / "d.db") == f"sqlite:///{tmp_path / 'd.db'}"
    assert resolve_storage("sqlite://", "x") == "sqlite://"


def test_bad_optuna_storage_in_the_cli_is_one_line_and_fast(tmp_path, capsys):
    pytest.importorskip("optuna")
    prof = Profile([0.6, 0.1, 0.05]).save(tmp_path / "p.json")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    for storage in (str(tmp_path), str(text), "nosuchdb://x/y"):
        with cpu_budget(5.0):
            assert main(["search", "--method", "optuna", "--profile", str(prof), "--budget",
                         "4", "--trials", "2", "--storage", storage,
                         "--out", str(tmp_path / "g.json")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Optuna storage" in err


# ------------------------------------------------------------------ sampling settings
def test_sampling_settings_are_checked_before_loading_models(tmp_path, capsys):
    missing = str(tmp_path / "no-model")
    cases = [
        (["generate", "--prompt", "hi", "--target", missing, "--temperature", "1e-40"],
         "too close to 0"),
        (["generate", "--prompt", "hi", "--target", missing, "--top-p", "0"], "top_p"),
        (["profile", "acceptance", "--target", missing, "--draft", "early-exit:1",
          "--top-p", "0", "--out", str(tmp_path / "a.json")], "top_p"),
        (["profile", "acceptance", "--target", missing, "--draft", "early-exit:1",
          "--top-k", "-5", "--out", str(tmp_path / "a.json")], "top_k"),
        (["profile", "acceptance", "--target", missing, "--draft", "early-exit:1",
          "--temperature", "1e-40", "--out", str(tmp_path / "a.json")], "too close to 0"),
        (["tune", "--target", missing, "--draft", "early-exit:1", "--top-k", "-5",
          "--out-dir", str(tmp_path / "t")], "top_k"),
    ]
    for argv, what in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err, (argv, err)


def test_acceptance_run_uses_the_sampling_checks():
    from treeopt.profile.acceptance import AcceptanceError, AcceptanceRun

    # the settings are one Sampling, which checks itself when it is made
    for bad in (dict(top_p=0.0), dict(top_k=-5), dict(temperature=1e-40), dict(top_p=1.5),
                dict(temperature=-1.0), dict(rule="medusa")):
        with pytest.raises(SamplingError):
            AcceptanceRun(sampling=Sampling(**bad)).check()
    with pytest.raises(AcceptanceError, match="Sampling"):
        AcceptanceRun(sampling={"temperature": 0.7}).check()
    AcceptanceRun(sampling=Sampling(temperature=0.7, top_k=5, top_p=0.9)).check()


# ------------------------------------------------------------------ OMP_WAIT_POLICY
def _policy_after_main(env: dict) -> str:
    code = ("import os\nfrom treeopt.cli import main\ntry:\n    main(['--version'])\n"
            "except SystemExit:\n    pass\nprint(os.environ.get('OMP_WAIT_POLICY'))")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_cli_sets_passive_openmp_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy_after_main(env) == "PASSIVE"
    assert _policy_after_main(dict(env, OMP_WAIT_POLICY="ACTIVE")) == "ACTIVE"


def test_passive_openmp_does_not_pretend_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cli.passive_openmp()
    assert "OMP_WAIT_POLICY" not in os.environ
