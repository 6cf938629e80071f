"""The pass@1 sandbox isolates (issue 19): a program cannot read treeopt's environment
through /proc nor write outside its folder wherever the kernel gives the isolation, the
achieved isolation is reported either way, and scoring refuses where only rlimits hold."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from treeopt.evaluate import sandbox
from treeopt.evaluate.passk import load_problems, run_program, score_answers
from treeopt.evaluate.sandbox import Isolation, Limits, SandboxError, exposures

FAST = Limits(timeout_s=5.0, memory_mb=256, file_mb=1, output_chars=2000)
LINUX = Path("/proc/self/environ").exists()


def _attack(target: Path) -> str:
    return (
        "import os\n"
        f"try:\n    data = open('/proc/{os.getpid()}/environ', 'rb').read()\n"
        "    print('ENV-READ', len(data))\nexcept OSError as exc:\n"
        "    print('ENV-REFUSED', type(exc).__name__)\n"
        f"try:\n    open({str(target)!r}, 'w').write('escaped')\n    print('WROTE')\n"
        "except OSError as exc:\n    print('WRITE-REFUSED', type(exc).__name__)\n"
        "open('inside.txt', 'w').write('ok')\nprint('INSIDE-OK')\n")


@pytest.mark.skipif(not LINUX, reason="needs Linux /proc")
def test_program_cannot_read_parent_environment_nor_write_outside(monkeypatch):
    monkeypatch.setenv("TREEOPT_SECRET_TEST", "hunter2")
    outside = Path(tempfile.mkdtemp(prefix="treeopt-test-open-"))
    outside.chmod(0o777)  # writable by anyone: only a read-only file system stops it
    target = outside / "escaped.txt"
    try:
        res = run_program(_attack(target), FAST)
        escaped = target.exists()
    finally:
        shutil.rmtree(outside)
    assert res.status == "passed", res
    assert "INSIDE-OK" in res.stdout  # its own folder stays writable
    desc = res.isolation.describe()
    assert desc and "\n" not in desc  # reported in one line, isolated or not
    if res.isolation.user != "same" or res.isolation.pid_ns:
        assert "ENV-REFUSED" in res.stdout and "hunter2" not in res.stdout
    if res.isolation.read_only:
        assert "WRITE-REFUSED" in res.stdout and not escaped
    if os.geteuid() == 0 or _userns_allowed():
        # a machine like this one: every boundary is expected, not just allowed
        assert res.isolation == Isolation("nobody" if os.geteuid() == 0 else "userns",
                                          True, True, True), desc
        assert desc.startswith("user nobody") and "own PID namespace, read-only" in desc


def _userns_allowed() -> bool:
    try:
        return int(Path("/proc/sys/user/max_user_namespaces").read_text()) > 0 and \
            Path("/proc/sys/kernel/unprivileged_userns_clone").read_text().strip() != "0"
    except (OSError, ValueError):
        return False


@pytest.mark.skipif(not LINUX, reason="needs Linux /proc")
def test_no_other_process_is_visible_and_no_signal_reaches_treeopt():
    res = run_program("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if "
                      "p.isdigit()))\nprint(os.getuid())\n"
                      f"try:\n    os.kill({os.getpid()}, 0)\n    print('SIGNAL-OK')\n"
                      "except (OSError, TypeError) as exc:\n    print('SIGNAL-REFUSED')\n",
                      FAST)
    assert res.status == "passed", res
    pids, uid, sig = res.stdout.split("\n")[:3]
    if res.isolation.pid_ns:
        assert max(eval(pids)) < 10  # its own namespace: a handful of processes
    if res.isolation.user == "nobody" or (res.isolation.user == "userns"
                                          and res.isolation.pid_ns):
        assert sig == "SIGNAL-REFUSED"


def test_exposures_cover_unreachable_installations(tmp_path):
    locked = tmp_path / "home"
    (locked / "py" / "bin").mkdir(parents=True)
    (locked / "py" / "bin" / "python").write_text("")
    locked.chmod(0o700)
    try:
        [(cover, exposed)] = exposures([str(locked / "py" / "bin" / "python")])
        assert exposed == str(locked / "py")  # below the deepest folder nobody can enter
        assert str(locked).startswith(cover)  # the highest one is covered
        assert exposures(["/usr/bin"]) == []
    finally:
        locked.chmod(0o755)


def test_scoring_refuses_when_only_rlimits_hold(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "_PROBED", {True: Isolation(), False: Isolation()})
    problems = load_problems("humaneval")
    sample = [(problems["HumanEval/0"], "    return False\n")]
    with pytest.raises(SandboxError, match="allow-unisolated") as info:
        score_answers(sample, FAST)
    assert "\n" not in str(info.value)
    assert Isolation().describe().startswith("rlimits only")
    recs, ran = score_answers(sample, Limits(timeout_s=5.0, allow_unisolated=True))
    assert ran == 1 and "WARNING" in capsys.readouterr().err
    assert recs[0]["isolation"]  # what was achieved is recorded per program
