"""Helpers several test files share (tiny tokenizers, models and data): the one place they are
defined, so that no test file imports another."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from lossless import exact_joint, peaked_lm

from treeopt.decode.attention import run_model
from treeopt.decode.drafter import Drafter, Proposal
from treeopt.evaluate.methods import AR, Method, ar_method
from treeopt.evaluate.results import METRICS, summarise, write_results
from treeopt.evaluate.runner import EvalConfig
from treeopt.tree import Tree

#: How the command line's measurement notices begin (treeopt.models.dtype.log): a first use
#: on a machine (every test's cache is fresh) says what it times before anything else.
NOTICES = ("treeopt: timing ", "treeopt: choosing ")


def without_notices(err: str) -> str:
    """``err`` without the measurement notices' lines."""
    return "".join(line for line in err.splitlines(keepends=True)
                   if not line.startswith(NOTICES))


def tiny_tokenizer(vocab_size: int = 96, shift: int = 0):
    """A word-level tokenizer: ids 0..2 are <s>, </s>, <unk>; then words w3, w4, ..."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i + shift}"] = i
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


class CharTokenizer:
    """Characters 'a'..'z' and ' ' as ids 2..28; no chat template."""

    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [2 + (ord(c) - 97 if c.isalpha() else 26) for c in text.lower()
                if c.isalpha() or c == " "]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i - 2) if 2 <= i < 28 else " " for i in ids)

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        """The call ``treeopt.api.encode_prompt`` makes (as Hugging Face tokenizers)."""
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": torch.tensor([ids], dtype=torch.long) if return_tensors == "pt"
                else ids}


class Sharpened(torch.nn.Module):
    """A hand-made draft: a tiny model's logits with 50 added to the best one (normalised
    entropy about 1e-20, so 1 - h == 1 in float64) at every position, except after the
    tokens in ``unsure``, where every logit is 0 (the uniform distribution: normalised
    entropy 1). Elsewhere its ranking of tokens is the tiny model's."""

    def __init__(self, inner, unsure=()):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.unsure = set(unsure)

    @property
    def dtype(self):
        return self.inner.dtype

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids=None, cache=None, **kw):
        kw.pop("use_cache", None)
        logits = run_model(self.inner, input_ids, cache, **kw).logits.clone()
        best = logits.argmax(-1, keepdim=True)
        logits.scatter_add_(-1, best, torch.full(best.shape, 50.0, dtype=logits.dtype))
        rows = input_ids[:, input_ids.shape[1] - logits.shape[1]:]
        flat = torch.tensor([int(t) in self.unsure for t in rows[0].tolist()])
        logits[0, flat] = 0.0
        return SimpleNamespace(logits=logits)


def eval_results(tmp_path, mismatch=False):
    rows = []
    for key, cat in (("a/0", "a"), ("b/1", "b")):
        rows.append(_row(AR, key, cat, [0] * 8, [[]] * 8, 0))
        rows.append(_row("kary", key, cat, [2, 1, 0, 2], [[1, 2], [2], [], [1, 1]], 6,
                         match=not (mismatch and key == "b/1")))
    df = pd.DataFrame(rows)
    methods = [ar_method(), Method("kary", KARY)]
    meta = {"settings": {"config": EvalConfig(max_new_tokens=9).to_dict(),
                         "methods": [m.to_dict() for m in methods]},
            "metrics": METRICS, "prompts": 2, "expected_tokens_per_step": {}}
    write_results(tmp_path, df, summarise(df, ["ar", "kary"]), meta)
    return tmp_path


#: The sampling tests' tiny pair: vocabulary, new tokens and prompt.
V = 8
NEW = 4
PROMPT = torch.tensor([[2, 3, 4]])


@lru_cache(maxsize=None)
def pair():
    return peaked_lm(0, V), peaked_lm(1, V)


@lru_cache(maxsize=None)
def exact(temperature: float, top_p: float) -> torch.Tensor:
    """(V,) * NEW joint probability of the first NEW generated tokens, by enumeration."""
    return exact_joint(pair()[0], PROMPT, NEW, temperature, top_p=top_p)


def serve_pair(monkeypatch, target, draft, **extra) -> None:
    """Make ``treeopt eval`` decode with this pair instead of loading models: its
    ``load_pair_for`` seam returns the pair with a ``CharTokenizer`` (``extra``: further
    fields of the pair, e.g. ``drafter=None``)."""
    import treeopt.cli.eval as cli_eval

    monkeypatch.setattr(cli_eval, "load_pair_for",
                        lambda args: SimpleNamespace(target=target, draft=draft,
                                                     tokenizer=CharTokenizer(), **extra))


def char_tokenizer():
    """A 96-symbol character tokenizer matching ``tiny_causal_lm``'s vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{chr(32 + i): i + 2 for i in range(94)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="</s>")


KARY = Tree.from_parents([-1, 0, 0, 1, 1, 2, 2])


def _row(method, key, cat, acc, ranks, drafted, match=True):
    steps = len(acc)
    return {"method": method, "prompt_key": key, "prompt_id": key, "category": cat, "turn": 1,
            "prompt_tokens": 20, "new_tokens": sum(acc) + steps + 1, "seconds": 0.5,
            "target_forwards": steps, "step_tokens": sum(acc) + steps, "steps": steps,
            "drafted": drafted * steps, "accepted": sum(acc), "accepted_per_step": acc,
            "ranks_per_step": ranks, "matches_ar": match,
            "first_mismatch": None if match else 3, "expected_tokens_per_step": None}


class cpu_budget:
    """``with cpu_budget(2.0): ...`` fails when the block uses more than that many seconds of
    this process's CPU time. CPU time, not wall time: other processes on a loaded machine
    cannot make it fail, while a check that scans, allocates or loops where it should refuse
    at once still does."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        self.start = time.process_time()
        return self

    def __exit__(self, *exc):
        self.used = time.process_time() - self.start
        if exc[0] is None:
            assert self.used < self.seconds, \
                f"used {self.used:.2f} s of CPU, budget {self.seconds}"
        return False


class FixedCandidates(Drafter):
    """A deterministic drafter: a fixed tree whose candidates depend on the context only."""

    name = "fixed"

    def __init__(self, shape: Tree):
        self.shape = shape

    def propose(self, committed, max_depth, sampling, generator=None):
        tree = self.shape
        if tree.depth > max_depth:
            tree = Tree(tree.parents[:sum(1 for d in tree.depths if d <= max_depth)])
        tokens = [committed[-1]]
        for v in range(1, tree.size):
            tokens.append((sum(committed) + 3 * tree.depths[v] + tree.ranks[v]) % V)
        return Proposal(tree, torch.tensor(tokens), fixed_shape=False)


ROOT = Path(__file__).resolve().parents[1]


def chat_process(folder: Path, *extra: str) -> subprocess.Popen:
    """``treeopt chat`` on ``folder`` in a child process with pipes (a real terminal's
    signals and streams)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "treeopt", "chat", "--target", str(folder), "--device", "cpu",
         "--threads", "1", *extra], cwd=ROOT, env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # Ctrl-C must reach the child even when the test runner ignores SIGINT.
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        if os.name == "posix" else None)


# ---------------------------------------------------------------- bounded-memory loads
ROOT = Path(__file__).resolve().parents[1]
needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="needs Linux /proc for the address-space limit")

_LIMIT = """
import resource, sys

def vm_bytes():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

limit = vm_bytes() + int(sys.argv[3]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

_GROWTH = """
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("GROWTH_KB", after - before)
"""


def run_with_memory_limit(warm: str, body: str, path, tmp_path, *args: str, extra_mb=300,
                          timeout=60):
    """Run ``warm`` (imports and a warm-up of every code path the test loads through), then
    ``body`` under an address-space limit of the warmed-up size + ``extra_mb`` MiB, in a fresh
    interpreter: ``sys.argv`` is [path, tmp_path, extra_mb, *args]. Returns (stdout lines,
    peak RSS growth in KiB during ``body``)."""
    script = (textwrap.dedent(warm) + _LIMIT + textwrap.dedent(body) + _GROWTH)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path),
                           str(extra_mb), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(tmp_path))
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines and lines[-1].startswith("GROWTH_KB"), (
        proc.stdout[-2000:] + proc.stderr[-3000:])
    return lines[:-1], int(lines[-1].split()[1])
