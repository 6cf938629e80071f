"""pass@1 of generated code on HumanEval-style problems, run in a sandbox.

A *problem* (:class:`Problem`) is a HumanEval record: ``task_id``, ``prompt`` (imports, any
helper functions and the signature and docstring of the function to write), ``test`` (a
``check(candidate)`` function of assertions) and ``entry_point`` (the function's name).
``load_problems("humaneval")`` reads the shipped HumanEval; a ``.jsonl`` / ``.jsonl.gz`` /
``.json`` file of records with those four fields (HumanEval+, a user's own set) works too.

Which code is run (:func:`extract_code`), for an answer ``A`` to a problem with entry point
``f``; the first rule that applies wins:

1. ``A`` has a fenced code block (a line starting with three backticks, the tag ``python``,
   ``py``, ``python3`` or none; other languages are ignored; an unclosed block runs to the
   end of the answer, as a generation cut at ``max_new_tokens`` leaves it) that defines
   ``def f(`` : the whole function. The first such block is taken ("fenced-function").
2. ``A`` has a line ``def f(`` at column 0 outside any fence (in the whole answer, or
   before its first fence line: small models start with bare code and close it with a fence
   they never opened): the answer restates the whole function without a fence
   ("function"); the code starts at the answer's first top-level
   line (``import``, ``from``, ``def``, ``class``, ``@``, an assignment), or at the ``def``
   itself when prose between them would cut the function off.
3. ``A`` has a fenced python block that does not define ``f``: its code continues the
   prompt (the body of ``f``; "fenced-continuation").
4. Otherwise ``A`` continues the prompt as a base model writes it (the HumanEval harness's
   rule; "continuation"), cut at its first non-blank line that starts at column 0: the body
   of ``f`` ends where top-level code begins (the Codex paper stops at ``\\ndef``,
   ``\\nclass``, ``\\nif``, ``\\nprint``, ``\\n#``; this rule covers them).

Whole-function code (rules 1 and 2) is cleaned as evalplus's ``sanitize`` does: the longest
prefix of its lines that parses, keeping only top-level imports, function and class
definitions and assignments (example calls, ``print``s and ``if __name__ == "__main__":``
blocks are dropped). The program is then the prompt followed by that code (the prompt's
stub of ``f``, a valid function with only a docstring, is redefined by the code; the prompt's
imports and helper functions stay available), or ``prompt + continuation`` for rules 3 and 4,
followed by ``test``, ``check(f)`` and a line printing a random marker: a sample *passes*
only when the program exits with status 0 **and** prints the marker, so code that exits early
(``sys.exit(0)``, ``os._exit(0)``) does not pass.

The sandbox (:func:`run_program`, built in ``treeopt.evaluate.sandbox``): a fresh temporary
folder per program, as another user (``nobody``), in its own PID, mount and network
namespaces, with the file system read-only outside that folder, an environment of only
``PATH``, ``HOME``, ``TMPDIR`` and ``LANG``, rlimits and a wall-clock timeout, each where
the platform allows it; what was achieved is reported per program. Scoring refuses to run
anything where only the rlimits hold, unless ``Limits.allow_unisolated``. On top, a guard
as the HumanEval harness's ``reliability_guard``: ``os.kill``, ``os.system``, ``os.fork``,
``os.remove``/``unlink``/``rmdir``/``rename``/``chmod``..., ``shutil.rmtree``,
``subprocess.Popen`` and a few more are replaced by ``None`` before the answer's code runs,
to stop accidents, not attacks (``ctypes`` gets around it).

Scoring a run (:func:`score_run`): every row of a ``treeopt eval`` results folder that has
its answer text (``output_text``) and whose prompt id is a problem is scored; identical
programs run once. Results are appended to ``pass_at_1.jsonl`` in the folder, one line per
program (keyed by the program's SHA-256, with the limits it ran under), so an interrupted
scoring keeps its work and a second scoring of the same folder runs nothing again (a verdict,
passed or failed, stands under any limits; a timeout or an error is run again under other
limits). The rows get ``pass_status`` (passed / failed / timeout / error) and
``pass_reason``; the summary gets ``pass_at_1`` per method and category: samples passed /
samples scored. With one sample per
prompt this is the unbiased pass@1 estimate (:func:`pass_at_k` with n = 1, k = 1). In
greedy mode every lossless method must have the same pass@1 (their outputs are plain
decoding's): :func:`disagreements` lists the prompts where they do not.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import secrets
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from treeopt import datasets
from treeopt.datasets import DatasetError, _read_lines
from treeopt.evaluate.outdir import locked
from treeopt.evaluate.results import RESULTS_JSON, load_results, summarise, write_results
from treeopt.evaluate.sandbox import (
    SANDBOX_PREFIX,
    ExecResult,
    Isolation,
    Limits,
    SandboxError,
    execute,
    require_isolation,
)
from treeopt.limits import MAX_RESULTS_BYTES, read_text

__all__ = ["ExecResult", "Isolation", "Limits", "SANDBOX_PREFIX", "run_program"]

STATUSES = ("passed", "failed", "timeout", "error")
CACHE_FILE = "pass_at_1.jsonl"
MAX_WORKERS = 2
PYTHON_TAGS = ("", "python", "py", "python3", "py3")
# The marker line a program prints after its tests pass: ``<MARKER_PREFIX> <random hex>``.
MARKER_PREFIX = "treeopt-passk-done"


class PassKError(SandboxError):
    """Problems or results that cannot be scored; the message is one line."""


# ---------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """One HumanEval-style problem: ``prompt`` + completion + ``test`` + ``check(entry)``."""

    task_id: str
    prompt: str
    test: str
    entry_point: str


def load_problems(spec: str | os.PathLike = "humaneval") -> dict[str, Problem]:
    """Problems by task id: ``"humaneval"`` (the shipped HumanEval, 164 problems) or a
    ``.jsonl`` / ``.jsonl.gz`` / ``.json`` file of records with ``task_id`` (or ``id``),
    ``prompt``, ``test`` and ``entry_point``. One-line ``PassKError`` otherwise."""
    from importlib import resources

    spec_s = str(spec)
    if spec_s == "humaneval":
        res = resources.files("treeopt").joinpath("data", "humaneval", "HumanEval.jsonl.gz")
        with resources.as_file(res) as path:
            return _problems_from(Path(path))
    if spec_s in datasets.SHIPPED or spec_s.startswith("hf:"):
        raise PassKError(f"{spec_s}: has no tests to run; pass@1 needs humaneval or a JSONL "
                         "file of problems with prompt, test and entry_point fields")
    path = Path(spec_s)
    if not path.is_file():
        raise PassKError(f"{path}: no such file; give humaneval or a JSONL file of problems "
                         "with prompt, test and entry_point fields")
    return _problems_from(path)


def _problems_from(path: Path) -> dict[str, Problem]:
    try:
        lines = _read_lines(path)
    except DatasetError as exc:
        raise PassKError(str(exc)) from None
    if path.name.lower().endswith(".json"):
        try:
            data = json.loads("\n".join(lines))
        except json.JSONDecodeError as exc:
            raise PassKError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        records = [(f"{path}: item {i}", r) for i, r in enumerate(
            data if isinstance(data, list) else [], start=1)]
    else:
        records = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise PassKError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    problems: dict[str, Problem] = {}
    for where, r in records:
        if not isinstance(r, dict):
            raise PassKError(f"{where}: expected a JSON object")
        tid = r.get("task_id", r.get("id"))
        missing = [k for k in ("prompt", "test", "entry_point")
                   if not isinstance(r.get(k), str) or not r.get(k).strip()]
        if tid is None or missing:
            raise PassKError(f"{where}: a pass@1 problem needs task_id, prompt, test and "
                             f"entry_point (missing: {', '.join(missing) or 'task_id'})")
        if not r["entry_point"].isidentifier():
            raise PassKError(f"{where}: entry_point {r['entry_point']!r} is not a Python name")
        problems[str(tid)] = Problem(str(tid), r["prompt"], r["test"], r["entry_point"])
    if not problems:
        raise PassKError(f"{path}: no problems")
    return problems


# ---------------------------------------------------------------------------- extraction
def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag, code) of every fenced block, in order; an unclosed block runs to the
    end of the text."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("```"):
            tag = line[3:].strip().split()[0].lower() if line[3:].strip() else ""
            body, i = [], i + 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((tag, "\n".join(body)))
        i += 1
    return blocks


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", code,
                     re.M) is not None


_KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
         ast.Assign, ast.AnnAssign)


def sanitize(code: str) -> str:
    """Whole-function code cleaned as evalplus does: the longest prefix of its lines that
    parses, keeping only top-level imports, function and class definitions and
    assignments (their source lines as written). Code none of whose prefixes parse is
    returned unchanged (running it reports the syntax error)."""
    lines = code.split("\n")
    tree = None
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
            break
        except (SyntaxError, ValueError):
            continue
    if tree is None:
        return code
    kept = []
    for node in tree.body:
        if isinstance(node, _KEEP):
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            kept.append("\n".join(lines[first - 1:node.end_lineno]))
    return "\n\n".join(kept) + "\n"


def _whole(code: str, entry_point: str) -> str:
    """``sanitize(code)``, or ``code`` itself when cleaning would lose the function (a
    syntax error before it: running the code reports it)."""
    clean = sanitize(code)
    return clean if _defines(clean, entry_point) else code


_TOP_LEVEL = re.compile(r"^(import\s|from\s|def\s|async\s+def\s|class\s|@|[A-Za-z_]\w*\s*=)")


def extract_code(answer: str, entry_point: str) -> tuple[str, str]:
    """(code, how) from an answer (see the module docstring): how is "fenced-function" or
    "function" (``code`` is the whole function, sanitized) or "fenced-continuation" or
    "continuation" (``code`` continues the prompt)."""
    text = answer.replace("\r\n", "\n").replace("\r", "\n")
    blocks = [code for tag, code in _fenced_blocks(text) if tag in PYTHON_TAGS]
    for code in blocks:
        if _defines(code, entry_point):
            return _whole(code, entry_point), "fenced-function"
    # Outside any fence: the whole answer, or what comes before its first fence line (a
    # small model may start with bare code and close it with a fence it never opened).
    head = re.split(r"^[ \t]*```", text, maxsplit=1, flags=re.M)[0]
    if _defines(head, entry_point):
        lines = head.split("\n")
        at = next((i for i, line in enumerate(lines)
                   if re.match(rf"(async\s+)?def\s+{re.escape(entry_point)}\s*\(", line)), None)
        if at is not None:
            first = next(i for i in range(at + 1) if _TOP_LEVEL.match(lines[i]))
            code = sanitize("\n".join(lines[first:]))
            if not _defines(code, entry_point):  # prose between the imports and the def
                code = _whole("\n".join(lines[at:]), entry_point)
            return code, "function"
    if blocks:
        return blocks[0].rstrip() + "\n", "fenced-continuation"
    out = []
    for line in text.split("\n"):
        if line.strip() and not line[0].isspace():
            break
        out.append(line)
    return "\n".join(out).rstrip() + "\n", "continuation"


def build_program(problem: Problem, answer: str, marker: str = "") -> tuple[str, str]:
    """(program text, how the code was extracted): guard, prompt and code, the problem's
    test, ``check(entry_point)`` and, when ``marker`` is given, a line printing it."""
    code, how = extract_code(answer, problem.entry_point)
    prompt = problem.prompt.replace("\r\n", "\n")
    if how in ("fenced-function", "function"):
        body = prompt.rstrip("\n") + "\n\n\n" + code
    else:
        body = prompt + code
    parts = [GUARD, body, "", problem.test, "", f"check({problem.entry_point})"]
    if marker:
        parts.append(f"print({marker!r}, flush=True)")
    return "\n".join(parts) + "\n", how


# The HumanEval harness's reliability_guard, shortened: it stops accidents, not attacks.
GUARD = '''\
def _treeopt_guard():
    import builtins, os, shutil, subprocess
    for name in ("kill", "killpg", "system", "fork", "forkpty", "putenv", "remove",
                 "removedirs", "rmdir", "unlink", "rename", "renames", "replace", "truncate",
                 "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot",
                 "setuid", "fchdir", "execv", "execve", "execvp", "execl", "spawnv"):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    builtins.help = None
    builtins.exit = builtins.quit = None


_treeopt_guard()
del _treeopt_guard
'''


# ---------------------------------------------------------------------------- the sandbox
def run_program(program: str, limits: Limits = Limits(), marker: str | None = None
                ) -> ExecResult:
    """Run ``program`` (Python source) in the sandbox (``treeopt.evaluate.sandbox``) and
    classify the outcome. ``marker``: the line the program prints when its tests finish;
    exit status 0 without it is an "error" (exited early). Without a marker, exit status 0
    passes."""
    raw = execute(program, limits)
    finished = marker is None or marker in raw.stdout_tail
    status, reason = _classify(raw.returncode, raw.stderr_tail, finished, limits)
    return ExecResult(status, reason, raw.seconds, raw.returncode, raw.stdout, raw.stderr,
                      raw.isolation)


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b")


def _last_line(text: str) -> str:
    """The last line naming an exception (``NameError: ...``), else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    return (named or lines or [""])[-1][:200]


def _signal_reason(sig: int) -> str:
    names = {getattr(signal, "SIGXCPU", -1): "CPU time limit",
             getattr(signal, "SIGXFSZ", -1): "file size limit (output too large?)",
             signal.SIGSEGV: "crashed (SIGSEGV)", signal.SIGABRT: "aborted (SIGABRT)",
             signal.SIGKILL: "killed (SIGKILL)"}
    if sig in names:
        return names[sig]
    try:
        return f"killed by {signal.Signals(sig).name}"
    except ValueError:
        return f"killed by signal {sig}"


def _classify(rc: int | None, stderr: str, finished: bool, limits: Limits) -> tuple[str, str]:
    if rc is None:
        return "timeout", f"timed out after {limits.timeout_s:g} s"
    if rc == 0:
        return ("passed", "") if finished else (
            "error", "exited with status 0 before the tests finished")
    if rc < 0:
        return "error", _signal_reason(-rc)
    last = _last_line(stderr)
    if last.startswith("AssertionError"):
        return "failed", last
    if last.startswith("MemoryError"):
        return "error", f"MemoryError (memory limit {limits.memory_mb} MiB)"
    return "error", last or f"exit status {rc}"


def check_answer(problem: Problem, answer: str, limits: Limits = Limits()) -> ExecResult:
    """Extract the code of ``answer``, build the program and run it (one sample)."""
    marker = f"{MARKER_PREFIX} {secrets.token_hex(8)}"
    program, _ = build_program(problem, answer, marker)
    return run_program(program, limits, marker)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c pass (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k); c / n for k = 1."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise PassKError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


# ---------------------------------------------------------------------------- many samples
def program_key(problem: Problem, answer: str) -> str:
    """What identifies a scored sample: the SHA-256 of the program run (without its random
    marker)."""
    program, _ = build_program(problem, answer)
    return hashlib.sha256(program.encode("utf-8")).hexdigest()


def reusable(rec: dict | None, limits: Limits) -> bool:
    """Whether an earlier result stands for a run under ``limits``: always when it reached
    a verdict (passed, or a test assertion failed), else (a timeout, an error, which a
    limit may have caused) only under the same limits."""
    return rec is not None and (rec.get("status") in ("passed", "failed")
                                or rec.get("limits") == limits.key())


class ResultCache:
    """Results by program key, kept in a JSONL file (one line per program, appended and
    fsync'ed as each finishes; a line cut short by an interruption is ignored)."""

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self.results: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            text = read_text(self.path, lambda msg: PassKError(f"{self.path}: {msg}"),
                             max_bytes=MAX_RESULTS_BYTES, errors="replace")
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and rec.get("status") in STATUSES and "key" in rec:
                    self.results[rec["key"]] = rec

    def get(self, key: str) -> dict | None:
        return self.results.get(key)

    def add(self, key: str, rec: dict) -> None:
        rec = {"key": key, **rec}
        self.results[key] = rec
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                os.fsync(fh.fileno())


def score_answers(samples: Sequence[tuple[Problem, str]], limits: Limits = Limits(), *,
                  workers: int = 1, cache: ResultCache | None = None,
                  progress: bool = False) -> tuple[list[dict], int]:
    """Score (problem, answer) pairs; returns (one record per sample: status, reason,
    seconds, how, network_isolated, key; the number of programs actually run). Identical
    programs run once; ``cache`` supplies earlier results (those :func:`reusable` under
    ``limits``) and receives new ones.
    ``workers``: programs run at once (1 or 2)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or \
            not 1 <= workers <= MAX_WORKERS:
        raise PassKError(f"pass@1 workers must be 1 or {MAX_WORKERS}, got {workers!r}")
    cache = cache or ResultCache(None)
    keys = [program_key(p, a) for p, a in samples]
    todo: dict[str, tuple[Problem, str]] = {}
    for key, (p, a) in zip(keys, samples):
        if not reusable(cache.get(key), limits) and key not in todo:
            todo[key] = (p, a)
    if todo:
        require_isolation(limits)  # refuses where only the rlimits would hold

    def one(item):
        key, (p, a) = item
        res = check_answer(p, a, limits)
        _, how = extract_code(a, p.entry_point)
        return key, {"task_id": p.task_id, "status": res.status, "reason": res.reason,
                     "seconds": res.seconds, "how": how,
                     "network_isolated": res.network_isolated,
                     "isolation": res.isolation.describe(), "limits": limits.key()}

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="pass@1", unit="program", file=sys.stderr,
                   dynamic_ncols=True)
    try:
        if workers == 1:
            for item in todo.items():
                cache.add(*one(item))
                if bar is not None:
                    bar.update(1)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for key, rec in pool.map(one, todo.items()):
                    cache.add(key, rec)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    out = []
    for key in keys:
        rec = dict(cache.get(key))
        rec.pop("key", None)
        out.append({**rec, "key": key})
    return out, len(todo)


# ---------------------------------------------------------------------------- eval runs
@dataclass
class PassRun:
    """The outcome of scoring an eval run. rows: the run's rows with pass_status and
    pass_reason; summary: the run's summary with pass_at_1; per_method: method -> (passed,
    scored); disagreements: greedy prompts on which the methods' outcomes differ; ran:
    programs run now (the rest came from the results file); unscored: rows without an
    answer text or a problem; network_isolated: every program ran without network;
    isolation: what the sandbox achieved, one line (several joined by "; " if programs
    differed)."""

    rows: Any
    summary: Any
    per_method: dict[str, tuple[int, int]]
    disagreements: list[str]
    ran: int
    unscored: int
    network_isolated: bool
    out_dir: Path | None = None
    isolation: str = ""


def score_rows(rows: Any, problems: dict[str, Problem], limits: Limits = Limits(), *,
               workers: int = 1, cache: ResultCache | None = None,
               progress: bool = False) -> tuple[Any, int, int, bool]:
    """The eval rows (a DataFrame) with ``pass_status`` / ``pass_reason`` for every first-
    turn row whose ``prompt_id`` is a problem and that has ``output_text``; returns (rows,
    programs run, rows not scored, every program ran without network)."""
    rows = rows.copy()
    status: list[Any] = [None] * len(rows)
    reason: list[Any] = [None] * len(rows)
    picked, samples = [], []
    texts = rows["output_text"] if "output_text" in rows else [None] * len(rows)
    turns = rows["turn"] if "turn" in rows else [1] * len(rows)
    for i, (pid, text, turn) in enumerate(zip(rows["prompt_id"], texts, turns)):
        problem = problems.get(str(pid))
        if problem is None or not isinstance(text, str) or int(turn) != 1:
            continue
        picked.append(i)
        samples.append((problem, text))
    records, ran = score_answers(samples, limits, workers=workers, cache=cache,
                                 progress=progress)
    for i, rec in zip(picked, records):
        status[i], reason[i] = rec["status"], rec["reason"]
    rows["pass_status"] = status
    rows["pass_reason"] = reason
    isolated = bool(records) and all(r.get("network_isolated") for r in records)
    return rows, ran, len(rows) - len(picked), isolated


def per_method(rows: Any) -> dict[str, tuple[int, int]]:
    """method -> (samples passed, samples scored), in the rows' order of methods."""
    out: dict[str, tuple[int, int]] = {}
    if "pass_status" not in rows:
        return out
    for rec in rows.to_dict("records"):
        s = rec.get("pass_status")
        if not isinstance(s, str):
            continue
        passed, total = out.get(rec["method"], (0, 0))
        out[rec["method"]] = (passed + (s == "passed"), total + 1)
    return out


def disagreements(rows: Iterable[dict]) -> list[str]:
    """One line per prompt whose scored methods do not all pass or all fail (in greedy
    mode every lossless method must agree: their outputs are plain decoding's)."""
    by_prompt: dict[str, dict[str, bool]] = {}
    for r in rows:
        s = r.get("pass_status")
        if isinstance(s, str):
            by_prompt.setdefault(str(r.get("prompt_key")), {})[r["method"]] = s == "passed"
    lines = []
    for key, outcome in by_prompt.items():
        if len(set(outcome.values())) > 1:
            ok = [m for m, v in outcome.items() if v]
            bad = [m for m, v in outcome.items() if not v]
            lines.append(f"{key}: passes with {', '.join(ok)}; fails with {', '.join(bad)}")
    return lines


def score_run(results: str | Path, problems: dict[str, Problem] | str | None = None,
              limits: Limits = Limits(), *, workers: int = 1, progress: bool = False
              ) -> PassRun:
    """Score the outputs of a ``treeopt eval`` results folder and rewrite its results
    (results.json, summary.csv, per_prompt.csv) with ``pass_status`` per row and
    ``pass_at_1`` per summary row; programs already scored (``pass_at_1.jsonl``) are not
    run again. ``problems``: a dict, a problems spec for :func:`load_problems`, or None for
    the dataset the run recorded. The folder is locked while it is scored."""
    import pandas as pd

    out = Path(results)
    if out.is_file() and out.name == RESULTS_JSON:
        out = out.parent
    doc = load_results(out)
    if problems is None:
        if not doc.get("dataset"):
            raise PassKError(f"{out}: the run does not record its dataset; give the problems "
                             "(humaneval or a JSONL file with prompt, test and entry_point)")
        problems = str(doc["dataset"])
    if not isinstance(problems, dict):
        problems = load_problems(problems)
    rows = pd.DataFrame(doc.get("rows") or [])
    if not len(rows):
        raise PassKError(f"{out}: the run holds no rows to score")
    if "output_text" not in rows or not rows["output_text"].notna().any():
        raise PassKError(f"{out}: the run did not record its outputs' text (written by an "
                         "older treeopt, or without a tokenizer); run treeopt eval again")
    known = set(map(str, rows["prompt_id"])) & set(problems)
    if not known:
        raise PassKError(f"{out}: none of the run's prompts is a problem of the given set "
                         "(their prompt ids must be the problems' task ids)")
    with locked(out):
        cache = ResultCache(out / CACHE_FILE)
        rows, ran, unscored, isolated = score_rows(rows, problems, limits, workers=workers,
                                                   cache=cache, progress=progress)
        isolation = isolation_line(cache.results.values())
        methods = [m.get("name") for m in (doc.get("settings") or {}).get("methods", [])]
        methods = [m for m in methods if m in set(rows["method"])] or None
        summary = summarise(rows, methods=methods)
        meta = {k: v for k, v in doc.items()
                if k not in ("format", "version", "summary", "rows")}
        greedy = not ((doc.get("settings") or {}).get("config") or {}).get("temperature")
        lines = disagreements(rows.to_dict("records")) if greedy else []
        meta["pass_at_1"] = {"limits": asdict(limits), "programs_run": ran,
                             "results_file": CACHE_FILE, "network_isolated": isolated,
                             "isolation": isolation,
                             "greedy_disagreements": lines}
        write_results(out, rows, summary, meta)
    return PassRun(rows, summary, per_method(rows), lines, ran, unscored, isolated, out,
                   isolation)


def isolation_line(records: Iterable[dict]) -> str:
    """What the sandbox achieved for these results, one line: the distinct descriptions
    joined by "; " ("not recorded" for results of an older treeopt)."""
    seen = dict.fromkeys(str(r.get("isolation") or "not recorded") for r in records)
    return "; ".join(seen) or "nothing run"


def format_pass(result: PassRun) -> str:
    """A few lines for the terminal: pass@1 per method, what ran, any disagreement."""
    lines = ["pass@1 (samples passed / scored): " + "  ".join(
        f"{m} {p}/{n} = {p / n:.1%}" for m, (p, n) in result.per_method.items() if n)]
    lines.append(f"  {result.ran} program(s) run now, the rest from {CACHE_FILE}; network "
                 f"{'isolated' if result.network_isolated else 'NOT isolated'}")
    lines.append(f"  sandbox: {result.isolation}")
    if result.disagreements:
        lines.append(f"  WARNING: greedy lossless methods disagree on {len(result.disagreements)}"
                     " prompt(s) (their outputs must equal plain decoding's):")
        lines += [f"    {d}" for d in result.disagreements[:20]]
    return "\n".join(lines)

