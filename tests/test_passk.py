"""pass@1 in a sandbox: code extraction, outcomes of hostile programs (each costs only its
own sample), the results cache, and scoring treeopt eval runs (tiny models, CLI)."""

import gzip
import json
import os
import resource
import time
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest
from helpers import CharTokenizer, serve_pair

from treeopt.evaluate.passk import (
    CACHE_FILE,
    Limits,
    PassKError,
    ResultCache,
    build_program,
    check_answer,
    disagreements,
    extract_code,
    load_problems,
    pass_at_k,
    run_program,
    sanitize,
    score_answers,
    score_run,
)
from treeopt.evaluate.sandbox import SandboxError

FAST = Limits(timeout_s=2.0, memory_mb=256, file_mb=1, output_chars=500)


def _records() -> dict:
    res = resources.files("treeopt").joinpath("data", "humaneval", "HumanEval.jsonl.gz")
    with resources.as_file(res) as path, gzip.open(path, "rt", encoding="utf-8") as fh:
        return {r["task_id"]: r for r in map(json.loads, fh)}


RECORDS = _records()
PROBLEMS = load_problems("humaneval")
P0 = PROBLEMS["HumanEval/0"]
CANONICAL = RECORDS["HumanEval/0"]["canonical_solution"]
FENCED_OK = """Here is the function:

```python
from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    return any(abs(a - b) < threshold
               for i, a in enumerate(numbers) for j, b in enumerate(numbers) if i != j)


print(has_close_elements([1.0, 2.0], 0.5))
if __name__ == "__main__":
    raise SystemExit(0)
```

It compares every pair."""


# ---------------------------------------------------------------------------- problems
def test_shipped_problems_keep_tests():
    assert len(PROBLEMS) == 164
    assert P0.entry_point == "has_close_elements" and "def check(candidate)" in P0.test
    assert P0.prompt == RECORDS["HumanEval/0"]["prompt"]


def test_problem_files_and_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"task_id": "t/1", "prompt": "def f():\n", "test":
                                "def check(c):\n    assert c() == 1\n",
                                "entry_point": "f"}) + "\n")
    assert load_problems(good)["t/1"].entry_point == "f"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "t/1", "prompt": "x"}) + "\n")
    with pytest.raises(PassKError, match=r"bad.jsonl:1: .*missing: test, entry_point") as e:
        load_problems(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(PassKError, match="no tests"):
        load_problems("spec_bench")
    with pytest.raises(PassKError, match="no such file"):
        load_problems(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------- extraction
def test_fenced_whole_function_is_sanitized():
    code, how = extract_code(FENCED_OK, P0.entry_point)
    assert how == "fenced-function"
    assert code.startswith("from typing import List\n")
    assert "def has_close_elements(" in code
    assert "print(" not in code and "__main__" not in code and "It compares" not in code


def test_fence_tags_unclosed_fences_and_other_languages():
    answer = ("Run:\n```bash\npip install nothing\n```\n```py\ndef has_close_elements(n, t):\n"
              "    return False\n")  # a generation cut before the closing fence
    code, how = extract_code(answer, P0.entry_point)
    assert how == "fenced-function" and "pip" not in code and "return False" in code
    code, how = extract_code("```python\n    return True\n```\n", P0.entry_point)
    assert (code, how) == ("    return True\n", "fenced-continuation")


def test_bare_continuation_is_cut_at_top_level_code():
    answer = CANONICAL + "\n\ndef another():\n    pass\nprint('x')\n"
    code, how = extract_code(answer, P0.entry_point)
    assert how == "continuation"
    assert code == CANONICAL.rstrip() + "\n"
    # A base model's garbage that starts at column 0 leaves an empty body.
    assert extract_code("abc def\nghi", P0.entry_point) == ("\n", "continuation")


def test_unfenced_whole_function_after_prose():
    answer = ("Sure, here it is.\nimport math\n\ndef has_close_elements(numbers, threshold):\n"
              "    return math.inf < 0\n\nThat is all.")
    code, how = extract_code(answer, P0.entry_point)
    assert how == "function"
    assert code.startswith("import math\n") and "That is all" not in code
    assert "Sure" not in code


def test_code_closed_by_a_fence_it_never_opened():
    """Small chat models start with bare code and close it with a fence; the prose after
    the fence is not code."""
    answer = ("def has_close_elements(numbers, threshold):\n    return True\n\n"
              "print(has_close_elements([1.0], 0.5))\n```\n\nThis function checks pairs.")
    code, how = extract_code(answer, P0.entry_point)
    assert how == "function"
    assert code == "def has_close_elements(numbers, threshold):\n    return True\n"


def test_sanitize_keeps_definitions_only():
    src = "import os\nX = 1\nprint(X)\n@staticmethod\ndef f():\n    return X\nf()\nnot python("
    assert sanitize(src) == "import os\n\nX = 1\n\n@staticmethod\ndef f():\n    return X\n"


def test_program_layout():
    program, how = build_program(P0, FENCED_OK, marker="MARK")
    assert how == "fenced-function"
    # The prompt (its imports and the stub) first, then the answer's function, the test,
    # the check call and the marker, in that order.
    at = [program.index(s) for s in (P0.prompt.rstrip(), "return any(", "def check(",
                                     "check(has_close_elements)", "print('MARK'")]
    assert at == sorted(at)


# ---------------------------------------------------------------------------- outcomes
def test_correct_and_wrong_answers():
    assert check_answer(P0, CANONICAL, FAST).status == "passed"
    assert check_answer(P0, FENCED_OK, FAST).status == "passed"
    wrong = check_answer(P0, "    return False\n", FAST)
    assert (wrong.status, wrong.reason) == ("failed", "AssertionError")
    syntax = check_answer(P0, "```python\ndef has_close_elements(:\n```", FAST)
    assert syntax.status == "error" and "SyntaxError" in syntax.reason


def test_infinite_loop_times_out_and_the_run_goes_on():
    t0 = time.perf_counter()
    res = check_answer(P0, "    while True:\n        pass\n", FAST)
    took = time.perf_counter() - t0
    assert res.status == "timeout" and res.returncode is None
    assert took > 1.9  # the program ran until its limit (a lower bound: load cannot break it)
    assert check_answer(P0, CANONICAL, FAST).status == "passed"  # the next sample runs


@pytest.mark.parametrize("body, status, reason", [
    ("    import os\n    os._exit(3)\n", "error", "exit status 3"),
    ("    import os\n    os._exit(0)\n", "error", "before the tests finished"),
    ("    raise SystemExit(0)\n", "error", "before the tests finished"),
    ("    import ctypes\n    ctypes.string_at(0)\n", "error", "SIGSEGV"),
    ("    x = []\n    while True:\n        x.append(bytes(1 << 26))\n", "error",
     "MemoryError"),
    ("    while True:\n        print('x' * 1000)\n", "error", "File too large"),
])
def test_hostile_answers_cost_only_their_sample(body, status, reason):
    res = check_answer(P0, body, FAST)
    assert res.status == status and reason in res.reason, res
    assert len(res.stdout) <= FAST.output_chars


def test_files_stay_in_the_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run_program("open('marker.txt', 'w').write('x')\nprint(__file__)\n", FAST)
    assert res.status == "passed"
    folder = Path(res.stdout.strip()).parent
    assert folder != tmp_path and not folder.exists()  # removed after the run
    assert not (tmp_path / "marker.txt").exists()


def test_guard_and_environment(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:1")
    monkeypatch.setenv("TREEOPT_SECRET_TEST", "x")
    res = check_answer(P0, "    import os\n    print(sorted(os.environ))\n    os.system('true')"
                           "\n", FAST)
    assert res.status == "error" and "NoneType" in res.reason  # os.system is guarded
    env = eval(res.stdout.strip().splitlines()[0])  # a printed list of names
    assert "HTTP_PROXY" not in env and "TREEOPT_SECRET_TEST" not in env
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE"}


def test_network_is_unreachable_when_isolated():
    probe = run_program("pass\n", FAST)
    if not probe.network_isolated:
        pytest.skip("this kernel gives no network namespace to the sandbox")
    res = run_program("import socket\nsocket.create_connection(('192.0.2.1', 80), "
                      "timeout=1)\n", FAST)
    assert res.status == "error" and "unreachable" in res.reason


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def _running(program_path: str) -> list[int]:
    """Host pids of live (not zombie) processes running ``program_path``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if program_path.encode() in (d / "cmdline").read_bytes() and \
                    _state(int(d.name)) not in ("Z", "gone"):
                out.append(int(d.name))
        except OSError:
            continue
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_children_die_with_the_program():
    """A bounded fork bomb through ctypes (past the guard): the program times out and every
    child it left is killed (with its process group, or with its PID namespace). The pids
    it prints may be its namespace's, so the host's processes are searched by program."""
    bomb = ("import ctypes, time\nlibc = ctypes.CDLL(None)\npids = []\nfor _ in range(12):\n"
            "    pid = libc.fork()\n    if pid == 0:\n        libc.setsid()\n"
            "        time.sleep(120)\n        libc._exit(0)\n    pids.append(pid)\n"
            "print(__file__, *pids, flush=True)\nwhile True:\n    pass\n")
    res = run_program(bomb, FAST)
    assert res.status == "timeout"
    path, *pids = res.stdout.split()
    assert len(pids) == 12
    time.sleep(0.2)
    left = _running(path)
    if res.isolation.pid_ns:
        assert left == []  # even children that left the process group (setsid)
    for pid in left:  # without a PID namespace a setsid child escapes the group kill
        os.kill(pid, 9)


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_NPROC"), reason="no RLIMIT_NPROC")
def test_fork_bomb_is_stopped_by_the_process_limit():
    if run_program("pass\n", FAST).isolation.user == "same" and os.geteuid() == 0:
        pytest.skip("RLIMIT_NPROC does not bind root, and the sandbox cannot change user")
    res = run_program("import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.fork())\n",
                      Limits(timeout_s=2.0, nproc=1))
    assert res.stdout.strip() == "-1"  # no process may be started at all
    bomb = ("import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    if libc.fork() < 0:\n"
            "        raise OSError('fork refused')\n")
    res = run_program(bomb, Limits(timeout_s=2.0, nproc=1))
    assert (res.status, res.reason) == ("error", "OSError: fork refused")


def test_limits_are_checked():
    with pytest.raises(SandboxError, match="timeout"):
        Limits(timeout_s=0)
    with pytest.raises(SandboxError, match="memory"):
        Limits(memory_mb=8)
    with pytest.raises(PassKError, match="workers"):
        score_answers([], workers=3)


def test_pass_at_k_estimator():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(PassKError):
        pass_at_k(2, 3, 1)


def test_cache_runs_each_program_once(tmp_path):
    cache_path = tmp_path / CACHE_FILE
    exit3 = "    import os\n    os._exit(3)\n"
    samples = [(P0, CANONICAL), (P0, CANONICAL), (P0, "    return False\n"), (P0, exit3)]
    recs, ran = score_answers(samples, FAST, cache=ResultCache(cache_path), workers=2)
    assert ran == 3
    assert [r["status"] for r in recs] == ["passed", "passed", "failed", "error"]
    recs2, ran2 = score_answers(samples, FAST, cache=ResultCache(cache_path))
    assert ran2 == 0 and [r["status"] for r in recs2] == [r["status"] for r in recs]
    # Under other limits the verdicts stand; the error (a limit may cause one) runs again.
    recs3, ran3 = score_answers(samples, Limits(timeout_s=3.0, memory_mb=256),
                                cache=ResultCache(cache_path))
    assert ran3 == 1 and recs3[3]["status"] == "error"
    with open(cache_path, "a") as fh:
        fh.write('{"key": "cut sho')  # an interrupted line is ignored
    assert len(ResultCache(cache_path).results) == 3


def test_disagreements():
    rows = [{"prompt_key": "a", "method": "ar", "pass_status": "passed"},
            {"prompt_key": "a", "method": "chain:3", "pass_status": "failed"},
            {"prompt_key": "b", "method": "ar", "pass_status": "failed"},
            {"prompt_key": "b", "method": "chain:3", "pass_status": "timeout"},
            {"prompt_key": "c", "method": "ar", "pass_status": None}]
    assert disagreements(rows) == ["a: passes with ar; fails with chain:3"]


# ---------------------------------------------------------------------------- eval runs
@pytest.fixture(scope="module")
def models():
    from treeopt.testing import tiny_pair

    return tiny_pair()


@pytest.fixture(scope="module")
def humaneval_run(models, tmp_path_factory):
    from treeopt.datasets import load_prompts
    from treeopt.evaluate.methods import Method, chain_method
    from treeopt.evaluate.runner import EvalConfig, run_eval
    from treeopt.tree import Tree

    target, draft = models
    out = tmp_path_factory.mktemp("he")
    prompts = load_prompts("humaneval", n=3, seed=1)
    methods = [chain_method(2), Method("kary", Tree.from_parents([-1, 0, 0, 1, 1]))]
    res = run_eval(target, draft, prompts, methods, tokenizer=CharTokenizer(), out_dir=out,
                   config=EvalConfig(max_new_tokens=6, warmup=False), progress=False,
                   meta={"target": "tiny", "draft": "tiny-draft", "dataset": "humaneval"})
    assert res.failures == []
    return out, [p.id for p in prompts]


def test_tiny_model_pass_at_1_is_equal_for_every_method(humaneval_run):
    out, ids = humaneval_run
    scored = score_run(out, limits=FAST)
    assert scored.unscored == 0 and scored.disagreements == []
    assert set(scored.per_method) == {"ar", "chain:3", "kary"}
    assert {v for v in scored.per_method.values()} == {(0, 3)}  # garbage never passes
    csv = pd.read_csv(out / "summary.csv")
    assert "pass_at_1" in csv.columns and (csv["pass_at_1"] == 0.0).all()
    doc = json.loads((out / "results.json").read_text())
    assert {r["pass_status"] for r in doc["rows"]} <= {"failed", "error"}
    assert doc["pass_at_1"]["greedy_disagreements"] == []
    assert "output_text" not in pd.read_csv(out / "per_prompt.csv").columns
    again = score_run(out, limits=FAST)
    assert again.ran == 0  # every program was already scored


def test_known_completions_score_and_flag_disagreement(humaneval_run, tmp_path):
    """Known answers injected into a real run's rows: the canonical solutions pass for ar,
    a wrong one fails for chain:3, and the greedy disagreement is flagged in the report."""
    import shutil

    from treeopt.evaluate.report import write_report

    src, ids = humaneval_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    doc = json.loads((out / "results.json").read_text())
    for r in doc["rows"]:
        if r["method"] == "ar":
            r["output_text"] = RECORDS[r["prompt_id"]]["canonical_solution"]
        elif r["method"] == "chain:3":
            r["output_text"] = "    return None\n"
    (out / "results.json").write_text(json.dumps(doc))
    scored = score_run(out, limits=FAST)
    assert scored.per_method["ar"] == (3, 3) and scored.per_method["chain:3"] == (0, 3)
    assert len(scored.disagreements) == 3
    summary = scored.summary.set_index("method")
    assert summary.loc["ar", "pass_at_1"] == 1.0 and summary.loc["kary", "pass_at_1"] == 0.0
    page = write_report(out, out / "report", trees=False).read_text()
    assert "PASS@1 DIFFERS BETWEEN GREEDY LOSSLESS METHODS on 3 prompt(s)" in page
    assert "pass_at_1" in page and "100.0%" in page


def test_old_runs_without_outputs_are_refused(humaneval_run, tmp_path):
    import shutil

    src, _ = humaneval_run
    out = tmp_path / "old"
    shutil.copytree(src, out)
    doc = json.loads((out / "results.json").read_text())
    for r in doc["rows"]:
        r.pop("output_text", None)
    (out / "results.json").write_text(json.dumps(doc))
    with pytest.raises(PassKError, match="did not record its outputs"):
        score_run(out, limits=FAST)


def test_cli_eval_and_report_pass_at_1(models, tmp_path, monkeypatch, capsys):
    from treeopt.cli import main

    serve_pair(monkeypatch, *models)
    out = tmp_path / "run"
    rc = main(["eval", "--dataset", "humaneval", "-n", "2", "--chain", "2",
               "--max-new-tokens", "4", "--out", str(out), "--no-progress", "--no-warmup",
               "--no-report", "--pass-at-1", "--pass-timeout", "5"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "pass_at_1" in captured.out and "ar 0/2 = 0.0%  chain:3 0/2 = 0.0%" in captured.out
    assert (out / CACHE_FILE).exists()
    rc = main(["report", str(out), "--out", str(tmp_path / "rep"), "--pass-at-1",
               "--no-trees"])
    captured = capsys.readouterr()
    assert rc == 0 and "0 program(s) run now" in captured.out
    rc = main(["eval", "--dataset", "humaneval", "-n", "2", "--chain", "2", "--out",
               str(tmp_path / "x"), "--pass-at-1", "--pass-timeout", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "timeout" in err and len(err.strip().splitlines()) == 1
