"""The README's drafter example runs as printed: it registers, builds from a spec string and
decodes token-exactly with the engine; every ``treeopt`` command the README shows parses."""

import re
import sys
import types
from pathlib import Path

import torch

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
