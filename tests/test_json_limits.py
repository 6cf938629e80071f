"""Calibrations and every JSON file treeopt reads (issue 19, item 6): huge numbers are one
line, never an OverflowError; files past MAX_JSON_BYTES are refused before they are read
(a 124 MB calibration cost 1.3 GB), tested under a memory limit."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from treeopt.growmap import GrowmapError, load_growmap
from treeopt.limits import MAX_JSON_BYTES, LimitError, read_json
from treeopt.profile.calibration import Calibration, CalibrationError
from treeopt.profile.model import Profile, ProfileError
from treeopt.treeset import TreeSetError, load_treeset

ROOT = Path(__file__).resolve().parents[1]


def _calibration(**bin0) -> dict:
    b = {"lo": 0.0, "hi": 1.0, "count": 10, "accepted": 4, "mean_confidence": 0.5}
    b.update(bin0)
    return {"format": "treeopt-calibration", "version": 1, "bins": [b], "meta": {}}


def test_calibration_round_trip_still_works(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_calibration()))
    assert Calibration.load(path).counts == (10,)


@pytest.mark.parametrize("raw", ['"count": ' + "9" * 400, '"count": 1e400',
                                 '"count": Infinity', '"accepted": ' + "7" * 400,
                                 '"count": 5, "accepted": 9', '"count": -2'])
def test_huge_or_impossible_counts_are_one_line(tmp_path, raw):
    text = json.dumps(_calibration()).replace('"count": 10, "accepted": 4', raw)
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(CalibrationError) as e:
        Calibration.load(path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg


def _sparse(path: Path, size: int, head: str) -> Path:
    with open(path, "wb") as fh:
        fh.write(head.encode())
        fh.truncate(size)
    return path


@pytest.mark.parametrize("loader, error", [(Calibration.load, CalibrationError),
                                           (Profile.load, ProfileError),
                                           (load_growmap, GrowmapError),
                                           (load_treeset, TreeSetError),
                                           (lambda p: read_json(p), LimitError)])
def test_oversized_json_is_refused_by_every_reader(tmp_path, loader, error):
    path = _sparse(tmp_path / "big.json", MAX_JSON_BYTES + 1, '{"format": "x", "pad": "')
    with pytest.raises(error) as e:
        loader(path)
    msg = str(e.value)
    assert "\n" not in msg and ("limit" in msg or "more than" in msg), msg


LIMITED = textwrap.dedent("""
    import resource, sys
    from treeopt.profile.calibration import Calibration, CalibrationError

    def vm_bytes():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    limit = vm_bytes() + 300 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        Calibration.load(sys.argv[1])
        print("LOADED")
    except CalibrationError as exc:
        print("ERROR", exc)
    print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_124_mb_calibration_is_refused_in_bounded_memory(tmp_path):
    path = _sparse(tmp_path / "huge.json", 124 << 20, json.dumps(_calibration())[:-1]
                   + ', "pad": "')
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", LIMITED, str(path)], capture_output=True,
                          text=True, timeout=120, env=env)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[-1].startswith("GROWTH_KB"), proc.stderr[-2000:]
    assert lines[0].startswith("ERROR") and "limit" in lines[0], lines
    assert int(lines[-1].split()[1]) < 50_000
