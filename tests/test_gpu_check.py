"""scripts/gpu_check.sh and scripts/gpu_check.py on this CPU machine: they say there is no
CUDA and do nothing; the real configs have the published sizes (counted on the meta device,
nothing allocated) and build with tiny overrides; the time budget skips what does not fit;
and the whole check runs end to end on tiny models (``--device cpu --tiny``)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
ON_GPU = torch.cuda.is_available() or shutil.which("nvidia-smi") is not None


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gc = load_check()


@pytest.mark.skipif(ON_GPU, reason="this machine has a GPU: the script would run the check")
def test_shell_script_without_a_gpu_does_nothing(tmp_path):
    before = sorted((ROOT / "runs").glob("gpu-check-*")) if (ROOT / "runs").is_dir() else []
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU here" in proc.stdout and "nothing done" in proc.stdout
    after = sorted((ROOT / "runs").glob("gpu-check-*")) if (ROOT / "runs").is_dir() else []
    assert after == before


@pytest.mark.skipif(ON_GPU, reason="this machine has a GPU: the script would run the check")
def test_shell_script_with_a_gpu_but_no_cuda_python(tmp_path):
    """nvidia-smi lists a GPU but no Python has torch with CUDA: said so, exit 0."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake'\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}",
               PYTHON=sys.executable, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert "no Python here has torch with CUDA" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is visible here")
def test_python_part_without_cuda_does_nothing(capsys, tmp_path):
    assert gc.main(["--out", str(tmp_path / "out")]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert gc.main(["--device", "cpu"]) == 2  # full-size models on a CPU: refused
    assert gc.main(["--sections", "latency,nonsense"]) == 2


# Published parameter counts (model cards; Llama-2-7B's exactly 6,738,415,616).
PUBLISHED = {"llama-2-7b": 6.738e9, "llama-68m": 68.0e6, "llama-160m": 162.4e6,
             "qwen2.5-1.5b": 1.54e9, "qwen2.5-0.5b": 0.494e9}


def test_real_configs_have_the_published_sizes():
    assert set(PUBLISHED) == set(gc.CONFIGS)
    counts = {name: gc.param_count(name) for name in PUBLISHED}
    for name, count in PUBLISHED.items():
        assert counts[name] == pytest.approx(count, rel=0.01), name
    assert counts["llama-2-7b"] == 6_738_415_616
    for target, drafts in gc.PAIRS:  # a draft must share its target's vocabulary
        for draft in drafts:
            assert gc.CONFIGS[draft]["vocab_size"] == gc.CONFIGS[target]["vocab_size"]


@pytest.mark.parametrize("name", sorted(gc.CONFIGS))
def test_configs_build_with_tiny_overrides(name):
    model = gc.build_model(name, "cpu", torch.float32, **gc.TINY)
    config, real = model.config, gc.CONFIGS[name]
    assert config.model_type == real["arch"]
    assert config.hidden_size == gc.TINY["hidden_size"]
    for key in ("max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(config, key) == real[key], key
    if "rope_theta" in real:
        rope = getattr(config, "rope_parameters", None) or {}  # transformers 5; 4.x: rope_theta
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        assert theta == real["rope_theta"]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == real["tie_word_embeddings"]
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        logits = model(torch.tensor([[3, 4, 5, 6, 7]])).logits
    assert logits.shape == (1, 5, gc.TINY["vocab_size"])


def test_budget_skips_what_does_not_fit():
    now = [0.0]
    budget = gc.Budget(100.0, clock=lambda: now[0])
    calls = []

    def fine(b):
        calls.append("fine")
        now[0] += 5
        return {"notes": ["done"]}

    def broken(b):
        calls.append("broken")
        raise RuntimeError("boom")

    def slow(b):
        calls.append("slow")
        gc.guard(b, "first unit")
        now[0] += 30  # the unit overruns its section's 20 s
        gc.guard(b, "second unit")
        calls.append("never")

    def late(b):
        calls.append("late")

    records = gc.run_sections([("a", fine), ("b", broken), ("c", slow), ("d", late),
                               ("e", late)], budget,
                              {"a": 10, "b": 10, "c": 20, "d": 10, "e": 10}, log=lambda s: None)
    assert calls == ["fine", "broken", "slow", "late", "late"]
    status = {r["section"]: r["status"] for r in records}
    assert status == {"a": "ok", "b": "failed", "c": "skipped", "d": "ok", "e": "ok"}
    assert "boom" in records[1]["error"]
    assert "second unit" in records[2]["notes"][0]
    now[0] = 99.5  # the run's own deadline: nothing more starts
    assert gc.run_sections([("f", late)], budget, {"f": 10}, log=lambda s: None)[0][
        "status"] == "skipped"


def test_tiny_check_end_to_end(tmp_path, capsys):
    from treeopt.profile.latency import load_latency

    out = tmp_path / "check"
    threads = torch.get_num_threads()
    code = gc.main(["--device", "cpu", "--tiny", "--dtype", "float32", "--out", str(out),
                    "--sections", "env,exactness,latency,engine,attention"])
    assert torch.get_num_threads() == threads
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / "summary.json").read_text())
    assert [r["section"] for r in summary["sections"]] == ["env", "exactness", "latency",
                                                           "engine", "attention"]
    assert all(r["status"] == "ok" for r in summary["sections"]), summary
    assert all(row["same"] for row in json.loads((out / "exactness.json").read_text()))
    for target, drafts in gc.PAIRS:
        for draft in drafts:
            latency = load_latency(out / f"latency-tiny-{target}-{draft}.json")
            assert latency.target.tokens == [1, 2, 4] and latency.draft is not None
    rows = json.loads((out / "engine.json").read_text())
    assert len(rows) == 4 * len(gc.PAIRS) and all(r["steps"] > 0 for r in rows)
    assert (out / "attention" / "attention.csv").is_file()
    assert (tmp_path / "check.tar.gz").is_file()
    assert "all sections passed" in (out / "summary.txt").read_text()
