"""``treeopt chat`` and its library (``treeopt.chat.ChatSession``), driven by scripted input on
tiny random models with a word-level tokenizer built offline."""

from __future__ import annotations

import io
import os
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import chat_process, tiny_tokenizer, without_notices

from treeopt.api import encode_prompt
from treeopt.chat import Answer, ChatError, ChatSession, acceptance_by_depth, format_stats, summary
from treeopt.cli import main as cli_main
from treeopt.decode.drafter import registered
from treeopt.decode.engine import DecodeStats, StepStats, generate
from treeopt.decode.sampling import Sampling
from treeopt.shapes import chain, kary
from treeopt.testing import tiny_causal_lm
from treeopt.tree import Tree

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}w3{% endif %}")
EOS = [1]


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def target():
    return tiny_causal_lm("llama", num_layers=3, seed=7)


@pytest.fixture
def tok():
    t = tiny_tokenizer()
    t.chat_template = TEMPLATE
    return t


def session(target, tok, **kw) -> ChatSession:
    kw.setdefault("draft", "early-exit:1")
    kw.setdefault("max_new_tokens", 12)
    return ChatSession(target, tok, **kw)


def reference(target, ids: torch.Tensor, n: int) -> list[int]:
    """The target's own greedy decoding (no drafter): what every greedy answer must equal."""
    return generate(target, None, ids, max_new_tokens=n, eos_token_id=EOS).tokens


def one_line_error(reply: str) -> bool:
    return reply.startswith("error: ") and "\n" not in reply


# ---------------------------------------------------------------- commands
def test_each_command_changes_its_setting(target, tok):
    s = session(target, tok)
    assert s.speculative and not s.ngram and s.drafter_spec() == "early-exit:1"

    reply = s.command("/speculative")
    assert not s.speculative and s.drafter_spec() is None and "off" in reply
    assert s.drafter() is None
    s.command("/speculative on")
    assert s.speculative
    s.command("/SPECULATIVE off")
    assert not s.speculative

    reply = s.command("/ngram")  # turns speculation back on, with prompt lookup
    assert s.ngram and s.speculative and s.drafter_spec() == "ngram" and "ngram" in reply
    s.command("/ngram off")
    assert not s.ngram and s.drafter_spec() == "early-exit:1"

    reply = s.command("/gamma 3")
    assert s.gamma == 3 and s.tree is None and s.shape() == chain(draft_tokens=3)
    assert "3 drafted tokens" in reply and "chain:4" in reply
    assert s.drafter().shape == chain(4)
    reply = s.command("/tree kary:2x2")
    assert s.tree == kary(2, 2) and s.gamma is None and s.shape() == kary(2, 2)
    assert "7 nodes, depth 2" in reply
    assert s.drafter().shape == kary(2, 2)
    s.command("/tree default")
    assert s.tree is None and s.shape() is None

    reply = s.command("/draft early-exit:2")
    assert s.draft == "early-exit:2" and "early-exit:2" in reply
    assert s.drafter().model.config.num_hidden_layers == 2

    reply = s.command("/processor topk 5")
    assert s.sampling == Sampling(1.0, 5, 1.0) and "top-k 5" in reply
    s.command("/processor nucleus 0.9 0.7")
    assert s.sampling == Sampling(0.7, 0, 0.9)
    s.command("/processor topknucleus 8 0.5")
    assert s.sampling == Sampling(1.0, 8, 0.5)
    s.command("/processor multinomial")
    assert s.sampling == Sampling(1.0, 0, 1.0)  # temperature-1 sampling
    s.command("/processor multinomial 0.5")
    assert s.sampling == Sampling(0.5, 0, 1.0)
    s.command("/processor greedy")
    assert s.sampling.greedy

    reply = s.command("/length 7")
    assert s.max_new_tokens == 7 and "7" in reply
    assert s.command("/length") == "length: 7 new tokens per answer"

    help_text = s.command("/help")
    for name in ("/speculative", "/ngram", "/egag", "/gamma", "/tree", "/draft", "/processor",
                 "/length", "/stats", "/reset", "/help", "/quit"):
        assert name in help_text, name
    assert "early-exit:2" in help_text and "now: 7" in help_text

    assert not s.finished
    assert s.command("/quit") == "bye" and s.finished


def test_processor_keeps_the_rule_and_seed(target, tok):
    s = session(target, tok, sampling=Sampling(0.0, 0, 1.0, "specinfer", 5))
    s.command("/processor topk 3 0.8")
    assert s.sampling == Sampling(0.8, 3, 1.0, "specinfer", 5)


def test_bad_values_give_one_line_errors_and_change_nothing(target, tok):
    s = session(target, tok, gamma=2)
    before = (s.speculative, s.ngram, s.egag, s.gamma, s.tree, s.draft, s.sampling,
              s.max_new_tokens)
    bad = ["/gamma 0", "/gamma -3", "/gamma two", "/gamma 99999", "/length -1", "/length 0",
           "/length ten", "/processor nucleus 2", "/processor nucleus 0", "/processor topk 0",
           "/processor topk", "/processor topk 2.5", "/processor nucleus 0.9 0",
           "/processor multinomial 1e-9", "/processor warm", "/processor", "/processor greedy 1",
           "/tree nonsense:3", "/tree " + "no/such/file.pt", "/draft nosuch:3",
           "/draft none", "/speculative maybe", "/ngram sideways"]
    for line in bad:
        reply = s.command(line)
        assert one_line_error(reply), (line, reply)
        after = (s.speculative, s.ngram, s.egag, s.gamma, s.tree, s.draft, s.sampling,
                 s.max_new_tokens)
        assert after == before, line
    assert "top-p" in s.command("/processor nucleus 2")
    assert "gamma" in s.command("/gamma 0")


def test_unknown_command_names_help(target, tok):
    s = session(target, tok)
    reply = s.command("/frobnicate now")
    assert one_line_error(reply) and "/frobnicate" in reply and "/help" in reply
    assert len(s.command("/" + "x" * 500)) < 120


def test_egag_toggle(target, tok):
    s = session(target, tok, gamma=3)
    if "egag" not in registered():
        reply = s.command("/egag")
        assert one_line_error(reply) and not s.egag
        pytest.skip("the egag drafter is not registered in this tree")
    s.command("/ngram")
    reply = s.command("/egag")
    assert s.egag and not s.ngram and s.speculative and "egag" in reply
    assert s.drafter_spec() == "egag:draft=early-exit:1,gamma_max=3"
    s.command("/tree kary:2x2")
    assert s.drafter_spec() == "egag:draft=early-exit:1,tree=kary:2x2"
    ids = encode_prompt(tok, "w5 w6")
    expect = reference(target, ids, 12)
    assert s.answer("w5 w6").tokens == expect  # lossless through egag, over a tree
    assert s.drafter().shape == kary(2, 2)
    s.command("/gamma 2")
    assert s.drafter_spec() == "egag:draft=early-exit:1,gamma_max=2"
    s.command("/reset")
    answer = s.answer("w5 w6")
    assert answer.tokens == expect and max(x.depth for x in answer.stats.steps) <= 2
    s.command("/egag off")
    assert not s.egag and s.drafter_spec() == "early-exit:1"

    shaped = session(target, tok, tree=Tree((-1, 0, 0, 1)))  # a Tree object: a nested spec
    shaped.command("/egag on")
    assert shaped.drafter_spec() == "egag:draft=early-exit:1,tree=(parents:[-1,0,0,1])"
    assert shaped.drafter().shape == Tree((-1, 0, 0, 1))

    lookup = session(target, tok, draft="ngram")  # EGAG needs a draft model
    reply = lookup.command("/egag")
    assert one_line_error(reply) and "draft model" in reply
    assert not lookup.egag and lookup.drafter_spec() == "ngram"


# ---------------------------------------------------------------- answers
def test_speculative_on_and_off_give_the_targets_greedy_tokens(target, tok):
    ids = encode_prompt(tok, "w5 w17 w40")
    expect = reference(target, ids, 12)
    for setup in ([], ["/tree kary:2x2"], ["/gamma 3"], ["/speculative off"], ["/ngram"],
                  ["/ngram", "/tree kary:2x2"]):
        s = session(target, tok)
        for line in setup:
            assert not s.command(line).startswith("error"), line
        pieces: list[str] = []
        answer = s.answer("w5 w17 w40", on_text=pieces.append)
        assert answer.tokens == expect, setup
        assert "".join(pieces) == answer.text == tok.decode(expect, skip_special_tokens=True)
        assert not answer.interrupted and answer.stats.generated_tokens == len(expect)
        assert (answer.stats.drafted_tokens > 0) == (setup != ["/speculative off"]), setup


def test_drafters_are_built_lazily_and_cached_by_spec(target, tok):
    s = session(target, tok)
    first = s.drafter()
    s.answer("w5 w6")
    assert s.drafter() is first  # nothing changed: not rebuilt
    s.command("/gamma 2")
    second = s.drafter()
    assert second is not first and second.shape == chain(3)
    assert second.model is first.model  # the same draft model, another tree
    s.command("/draft early-exit:2")
    s.command("/draft early-exit:1")
    assert s.drafter().model is first.model  # loaded once per spec


def test_history_grows_through_the_chat_template(target, tok):
    s = session(target, tok, system="w4")
    a1 = s.answer("w5 w6")
    assert s.history == [{"role": "user", "content": "w5 w6"},
                         {"role": "assistant", "content": a1.text}]
    a2 = s.answer("w7")
    assert len(s.history) == 4 and s.history[2]["content"] == "w7"
    messages = [{"role": "system", "content": "w4"}, {"role": "user", "content": "w5 w6"},
                {"role": "assistant", "content": a1.text}, {"role": "user", "content": "w7"}]
    ids = encode_prompt(tok, messages)
    assert ids[0, :4].tolist() == [0, 4, 0, 5]  # the template renders every turn
    assert a2.tokens == reference(target, ids, 12)
    assert "2 turns" in s.command("/reset") and s.history == []
    a3 = s.answer("w7")
    plain = [{"role": "system", "content": "w4"}, {"role": "user", "content": "w7"}]
    assert a3.tokens == reference(target, encode_prompt(tok, plain), 12)


def test_history_without_a_template_joins_turns_by_newlines(target, tok):
    s = session(target, tok, chat_template=False)
    assert not s.uses_template
    a1 = s.answer("w5 w6")
    assert a1.tokens == reference(target, torch.tensor([[5, 6]]), 12)  # fed as typed
    a2 = s.answer("w7")
    ids = tok("w5 w6\n" + a1.text + "\nw7", return_tensors="pt")["input_ids"]
    assert a2.tokens == reference(target, ids, 12)


def test_topk_processor_samples_within_the_targets_top_k(target, tok):
    s = session(target, tok, max_new_tokens=16, sampling=Sampling(0.0, 0, 1.0, seed=3))
    assert "top-k 5" in s.command("/processor topk 5")
    s.command("/tree kary:2x2")
    answer = s.answer("w5 w6")
    assert answer.stats.generated_tokens == len(answer.tokens) > 0
    ids = torch.cat([encode_prompt(tok, "w5 w6"), torch.tensor([answer.tokens])], dim=1)
    with torch.no_grad():
        logits = target(ids).logits[0]
    start = ids.shape[1] - len(answer.tokens) - 1
    for i, tok_id in enumerate(answer.tokens):
        top5 = logits[start + i].topk(5).indices.tolist()
        assert tok_id in top5, (i, tok_id, top5)
    assert s.answer("w5 w6").tokens  # and the session goes on
    again = session(target, tok, max_new_tokens=16, sampling=Sampling(1.0, 5, 1.0, seed=3))
    again.command("/tree kary:2x2")
    assert again.answer("w5 w6").tokens == answer.tokens  # same seed, same draw


def test_interrupt_during_an_answer_keeps_the_partial_text(target, tok):
    s = session(target, tok, max_new_tokens=12)
    full = s.answer("w5 w6")
    s.command("/reset")
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    s.command("/speculative off")  # one token per step
    cut = s.answer("w5 w6", on_text=on_text)
    n = len(cut.tokens)
    assert cut.interrupted and cut.stats is None and 3 <= n < len(full.tokens)
    assert cut.tokens == full.tokens[:n]
    assert cut.text == "".join(pieces) == tok.decode(cut.tokens, skip_special_tokens=True)
    assert s.history[-1] == {"role": "assistant", "content": cut.text}
    assert f"interrupted after {n} tokens" in s.command("/stats")
    assert summary(cut) == f"[interrupted after {n} tokens]"
    after = s.answer("w9")  # the session goes on, the partial answer in its history
    messages = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": cut.text},
                {"role": "user", "content": "w9"}]
    assert after.tokens == reference(target, encode_prompt(tok, messages), 12)


def test_interrupt_before_any_token_leaves_no_history(target, tok, monkeypatch):
    s = session(target, tok)
    import treeopt.chat as chat

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "generate", stopped)
    answer = s.answer("w5 w6")
    assert answer.interrupted and answer.tokens == [] and answer.text == ""
    assert s.history == []


def test_oldest_turns_are_dropped_to_fit_the_window(tok):
    small = tiny_causal_lm("llama", num_layers=2, seed=4, max_positions=40)
    s = ChatSession(small, tok, draft="none", max_new_tokens=8)
    words = " ".join(f"w{i}" for i in range(10, 20))
    dropped = []
    for _ in range(4):
        turns = len(s.history) // 2
        answer = s.answer(words)
        dropped.append(answer.dropped_turns)
        assert len(s.history) // 2 == turns - answer.dropped_turns + 1
        used = encode_prompt(tok, s.history[:-1])  # the prompt this answer was decoded from
        assert used.shape[1] + 8 <= 40
        assert answer.tokens == reference(small, used, 8)
    # each turn holds at least 13 tokens, so the fourth prompt (>= 3 turns + 12) cannot fit
    assert dropped[0] == 0 and dropped[-1] >= 1
    assert "oldest turns dropped" in s.command("/stats")
    with pytest.raises(ChatError, match="window is 40"):
        s.answer(" ".join(["w9"] * 45))
    assert s.answer("w5").tokens  # still usable


def test_acceptance_by_depth_and_stats_lines_by_hand():
    steps = [StepStats(accepted=a, ranks=[1] * a, tokens=a + 1, nodes=4, depth=3)
             for a in (0, 2, 1, 3)]
    stats = DecodeStats(steps=steps, generated_tokens=11, target_forwards=4, drafted_tokens=12,
                        accepted_tokens=6, prefill_s=0.1, draft_s=0.2, verify_s=0.6,
                        total_s=1.0, stop_reason="eos")
    assert acceptance_by_depth(stats) == [0.75, 0.5, 0.25]
    text = "\n".join(format_stats(stats))
    assert ">=1: 75 %  >=2: 50 %  >=3: 25 %" in text
    assert "tokens per step  2.500" in text and "0.500 (6/12" in text
    assert "4 nodes (depth 3) in all 4 steps" in text
    assert "prefill 100.0 ms (10 %)" in text and "draft 200.0 ms (20 %)" in text
    assert "verify 600.0 ms (60 %)" in text and "other 100.0 ms (10 %)" in text
    assert "tokens/s         11.0" in text and "stop: eos" in text
    mixed = DecodeStats(steps=[StepStats(1, [1], 2, 4, 3), StepStats(0, [], 1, 1, 0),
                               StepStats(2, [1, 1], 3, 4, 3)], total_s=0.0)
    assert acceptance_by_depth(mixed) == [2 / 3, 1 / 3, 0.0]
    assert "mean 3.0 nodes: 4 nodes/depth 3 x2, 1 node/depth 0 x1" in "\n".join(
        format_stats(mixed))
    assert acceptance_by_depth(DecodeStats(steps=[StepStats(0, [], 1)])) == []
    assert summary(Answer("x", [5], stats)) == "[11 tokens, 11.0 tokens/s, 2.50 tokens/step]"


def test_stats_after_a_speculative_answer(target, tok):
    s = session(target, tok)
    assert "no answer yet" in s.command("/stats")
    s.command("/tree kary:2x2")
    answer = s.answer("w5 w6")
    text = s.command("/stats")
    assert "early-exit:1, tree kary:2x2" in text and "processor greedy" in text
    for key in ("tokens per step", "acceptance rate", "acceptance/depth", ">=2:",
                "tree sizes", "prefill", "verify", "other", "tokens/s"):
        assert key in text, key
    assert f"{answer.stats.tokens_per_step:.3f}" in text


# ---------------------------------------------------------------- the command
@pytest.fixture
def folder(tmp_path, target, tok):
    path = tmp_path / "tiny"
    target.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_chat(folder, script: str, monkeypatch, capsys, *extra) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    rc = cli_main(["chat", "--target", str(folder), "--draft", "early-exit:1",
                   "--max-new-tokens", "10", "--device", "cpu", *extra])
    out, err = capsys.readouterr()
    return rc, out, without_notices(err)


def test_cli_scripted_session(folder, target, tok, monkeypatch, capsys):
    script = "/help\n\n   \n/nonsense\nw5 w6\n/speculative\nw5 w6\n/stats\n/gamma 0\n"
    rc, out, err = run_chat(folder, script, monkeypatch, capsys, "--tree", "kary:2x2")
    assert rc == 0
    lines = out.splitlines()
    assert "> " not in out  # no prompt marker on a pipe
    unknown = [x for x in lines if "nonsense" in x]
    assert len(unknown) == 1 and "/help" in unknown[0] and unknown[0].startswith("error")
    first = reference(target, encode_prompt(tok, "w5 w6"), 10)
    text1 = tok.decode(first, skip_special_tokens=True)
    assert text1 in lines
    history = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": text1},
               {"role": "user", "content": "w5 w6"}]
    second = tok.decode(reference(target, encode_prompt(tok, history), 10),
                        skip_special_tokens=True)
    i = lines.index(text1)
    assert lines[i + 1].startswith("speculative decoding off") and lines[i + 2] == second
    assert "plain autoregressive decoding" in out.split("last answer:")[1]
    assert lines[-1].startswith("error: gamma")
    assert "" not in lines and "empty" not in out  # blank lines were skipped, not sent
    assert err.count("tokens/step]") == 2 and "/help" in err.splitlines()[0]


class _Terminal(io.StringIO):
    """A terminal's stdin: lines, one Ctrl-C while waiting for the second, then Ctrl-D."""

    def __init__(self, text: str):
        super().__init__(text)
        self.reads = 0

    def isatty(self) -> bool:
        return True

    def readline(self, *args) -> str:
        self.reads += 1
        if self.reads == 2:
            raise KeyboardInterrupt
        return super().readline(*args)


def test_cli_on_a_terminal_shows_the_marker_and_survives_ctrl_c(folder, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", _Terminal("/length 2\n/length 3\n"))
    rc = cli_main(["chat", "--target", str(folder), "--draft", "none"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == ("> length 2: at most 2 new tokens per answer\n> > length 3: at most 3 new "
                   "tokens per answer\n> \n")
    assert "Ctrl-D or /quit leaves" in err.splitlines()[-1]


def test_cli_quit_stops_reading(folder, monkeypatch, capsys):
    rc, out, _ = run_chat(folder, "/length 3\n/quit\nw5 w6\n/help\n", monkeypatch, capsys)
    assert rc == 0 and out.splitlines() == ["length 3: at most 3 new tokens per answer", "bye"]


def test_cli_slash_escape_and_answer_errors(folder, monkeypatch, capsys):
    long = " ".join(["w9"] * 600)  # longer than the 512-token window
    rc, out, _ = run_chat(folder, f"{long}\n//w5\n", monkeypatch, capsys)
    lines = out.splitlines()
    assert rc == 0 and lines[0].startswith("error: the prompt is") and "window" in lines[0]
    assert re.fullmatch(r"(w\d+ ?)+", lines[1])  # "//w5" sent "/w5" as a prompt


def test_cli_bad_draft_fails_at_start(folder, monkeypatch, capsys):
    rc, out, err = run_chat(folder, "w5\n", monkeypatch, capsys, "--draft", "early-exit:9")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "error" in err
    rc, _, err = run_chat(folder, "w5\n", monkeypatch, capsys, "--gamma", "2", "--tree",
                          "chain:3")
    assert rc == 2 and "either" in err


def test_cli_draft_none_starts_plain(folder, target, tok, monkeypatch, capsys):
    rc, out, _ = run_chat(folder, "/help\nw5 w6\n/stats\n", monkeypatch, capsys, "--draft",
                          "none", "--no-chat-template")
    assert rc == 0 and "now: off" in out and "(no chat template)" in out
    text = tok.decode(reference(target, torch.tensor([[5, 6]]), 10), skip_special_tokens=True)
    assert text in out.splitlines() and "0/0 drafted tokens" in out


# ---------------------------------------------------------------- real pipes and signals
@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_ctrl_c_stops_the_answer_and_keeps_the_session_on_a_pipe(tmp_path, tok):
    # A model whose special tokens (ids 0-2) get logit 0: a greedy answer never ends early and
    # every token is visible text, so the answer is still streaming when SIGINT arrives.
    model = tiny_causal_lm("llama", num_layers=4, hidden_size=64, seed=11, max_positions=8192)
    with torch.no_grad():
        model.lm_head.weight[:3] = 0
    folder = tmp_path / "long"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    proc = chat_process(folder, "--draft", "none", "--max-new-tokens", "8000")
    proc.stdin.write(b"w5 w6\n")
    proc.stdin.flush()
    out = b""
    deadline = time.monotonic() + 120
    while not re.search(rb"w\d+ w\d+ w\d+", out):  # the answer is streaming
        assert time.monotonic() < deadline and proc.poll() is None, out
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            out += os.read(proc.stdout.fileno(), 65536)
    proc.send_signal(signal.SIGINT)
    # then a command, a prompt, and the end of the pipe (Ctrl-D): a clean exit
    rest, err = proc.communicate(b"/stats\n/length 5\nw7\n", timeout=120)
    out += rest
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].endswith(" [interrupted]"), lines[0][-80:]
    assert lines[1].startswith("the last answer was interrupted after")
    assert lines[2] == "length 5: at most 5 new tokens per answer"
    assert re.fullmatch(r"(w\d+ ?){5}", lines[3])  # the session went on
    assert b"Traceback" not in err
