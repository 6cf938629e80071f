"""An interactive chat session over tree speculative decoding (the library behind
``treeopt chat``).

A :class:`ChatSession` holds a loaded target and its tokenizer, the drafting settings, the
sampling settings, the answer length, the conversation and the last answer's statistics.
``command(line)`` applies a slash command and returns its reply text: a user mistake gives a
one-line ``"error: ..."`` reply, never an exception. ``answer(prompt, on_text)`` decodes a
reply to ``prompt`` after the conversation so far, streaming its text through ``on_text``.

What the next answer decodes with:

- ``/speculative`` off: plain autoregressive decoding (the same engine, no drafter);
- ``/ngram`` on: prompt lookup (the ``ngram`` drafter) over the conversation and the answer;
- ``/egag`` on: entropy-adaptive draft length around the model draft,
  ``egag:draft=SPEC[,gamma_max=GAMMA][,tree=SHAPE]``;
- otherwise the draft of ``/draft SPEC`` (any drafter spec; a model draft by default).

``/ngram`` and ``/egag`` exclude each other; turning either on turns speculation on.
``/gamma N`` drafts a chain of N tokens per step (the gamma of NASD / EGAG: drafted tokens,
not nodes; EGAG's longest draft); ``/tree SHAPE`` drafts (or fills at most) a shape string or
growmap file instead; the later of the two wins, and with neither each drafter uses its own
default. Drafters are built lazily, when an answer needs one after a setting changed (``/draft``
and ``/egag`` build theirs at once, so a bad spec is reported there); each drafter spec is
built once and kept (a model draft is loaded once), reshaped for other trees. EGAG takes gamma
and the tree in its spec, so it is rebuilt around the draft when either changes (one EGAG
drafter is kept at a time).

The conversation: with a chat template (the tokenizer has one and ``chat_template`` is true)
each answer's prompt is the system message (if any), the earlier turns and the new user
message, rendered by the template. Without one, the same messages' texts are joined by
newlines (``system``, user 1, answer 1, user 2, ...; ``encode_prompt``'s plain form): the
first prompt is fed exactly as typed. Every answer re-encodes and prefills the whole
conversation. When the conversation plus ``/length`` new tokens would not fit the model's
window the oldest turns are dropped (``Answer.dropped_turns``).

Interrupting an answer (``KeyboardInterrupt``, Ctrl-C in ``treeopt chat``) stops it: the
partial text comes back with ``interrupted=True`` and no statistics, and the exchange enters
the history with that partial answer (the user saw it and may refer to it or ask to go on),
unless nothing was generated yet. The session carries on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from treeopt.api import TextStream, encode_prompt
from treeopt.decode.drafter import Drafter, build_drafter, registered
from treeopt.decode.engine import DecodeStats, generate, model_window
from treeopt.decode.sampling import Sampling
from treeopt.errors import TreeoptError, one_line
from treeopt.models.loading import eos_ids
from treeopt.shapes import chain, resolve_tree
from treeopt.tree import Tree

#: The draft a session uses when none is named: ``auto`` (speculates only when it pays).
DEFAULT_DRAFT = "auto"
#: New tokens per answer when no length is given.
DEFAULT_LENGTH = 128
#: /processor names and their arguments (a trailing temperature is optional, default 1).
PROCESSORS = {"greedy": (), "multinomial": (), "topk": ("K",), "nucleus": ("P",),
              "topknucleus": ("K", "P")}
_ON = ("on", "1", "true", "yes")
_OFF = ("off", "0", "false", "no")


class ChatError(TreeoptError, ValueError):
    """A chat request that cannot be served (an empty prompt, a prompt longer than the
    model's window); the message says what to do."""


@dataclass
class Answer:
    """One answer: its ``text`` and generated ``tokens`` (prompt excluded), the engine's
    statistics (None when ``interrupted``) and how many of the oldest turns were dropped to
    fit the model's window."""

    text: str
    tokens: list[int]
    stats: DecodeStats | None
    interrupted: bool = False
    dropped_turns: int = 0


@dataclass
class _Last:
    """What the last answer ran with, for ``/stats``."""

    answer: Answer
    mode: str
    processor: str


@dataclass
class ChatSession:
    """An interactive session over a loaded ``target`` and ``tokenizer``; see the module
    docstring. ``draft``: the drafter spec of speculative decoding ("none" starts with
    speculation off and keeps ``DEFAULT_DRAFT`` for ``/speculative``); ``tree``: a Tree, a
    shape string or a growmap file; ``gamma``: drafted tokens per step as a chain (``tree``
    wins when both are given)."""

    target: Any
    tokenizer: Any
    draft: str = DEFAULT_DRAFT
    speculative: bool = True
    ngram: bool = False
    egag: bool = False
    gamma: int | None = None
    tree: Tree | str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    max_new_tokens: int = DEFAULT_LENGTH
    system: str | None = None
    chat_template: bool = True
    history: list[dict] = field(default_factory=list)
    finished: bool = False

    def __post_init__(self) -> None:
        spec = str(self.draft).strip() if self.draft is not None else "none"
        if spec.lower() in ("", "none", "ar"):
            self.speculative, spec = False, DEFAULT_DRAFT
        self.draft = spec
        self.tree_spec: str | None = None
        if self.tree is not None:
            self.tree_spec = _tree_text(self.tree)
            self.tree = resolve_tree(self.tree)
            self.gamma = None
        elif self.gamma is not None:
            self._check_gamma(self.gamma)
        if self.max_new_tokens < 1:
            raise ChatError(f"the answer length must be >= 1 new token, got "
                            f"{self.max_new_tokens}")
        self.last: _Last | None = None
        self._bases: dict[str, Drafter | None] = {}
        self._active: tuple[tuple, Drafter | None] | None = None

    # ------------------------------------------------------------------ settings
    @property
    def uses_template(self) -> bool:
        """Whether prompts go through the tokenizer's chat template."""
        return bool(self.chat_template and getattr(self.tokenizer, "chat_template", None))

    def shape(self) -> Tree | None:
        """The tree the next answer drafts: ``/tree``'s, a chain of ``/gamma`` drafted
        tokens, or None (the drafter's default)."""
        if self.tree is not None:
            return self.tree
        if self.gamma is not None:
            return chain(draft_tokens=self.gamma)
        return None

    def drafter_spec(self) -> str | None:
        """The drafter spec the next answer uses (None: plain decoding)."""
        if not self.speculative:
            return None
        if self.ngram:
            return "ngram"
        if self.egag:
            options = [f"draft={_nested(self.draft)}"]
            if self.gamma is not None:
                options.append(f"gamma_max={self.gamma}")
            if self.tree_spec is not None:
                options.append(f"tree={_nested(self.tree_spec)}")
            return "egag:" + ",".join(options)
        return self.draft

    def drafter(self) -> Drafter | None:
        """The drafter of the next answer, built only when the settings changed since the
        last call; raises the drafter's TreeoptError when it cannot be built."""
        spec = self.drafter_spec()
        in_spec = self.egag and not self.ngram  # EGAG gets gamma and the tree in its spec
        tree = None if spec is None or in_spec else self.shape()
        key = (spec, None if tree is None else tree.parents)
        if self._active is not None and self._active[0] == key:
            return self._active[1]
        drafter = None
        if spec is not None:
            base = self._base(spec)
            drafter = base.reshaped(tree) if tree is not None and base is not None else base
        self._active = (key, drafter)
        return drafter

    def _base(self, spec: str) -> Drafter | None:
        """The drafter of ``spec`` with its default tree, built once per spec."""
        if spec not in self._bases:
            drafter = build_drafter(spec, target=self.target, tokenizer=self.tokenizer)
            if spec.startswith("egag:"):  # one EGAG wrapper at a time (each holds a draft)
                for old in [k for k in self._bases if k.startswith("egag:")]:
                    del self._bases[old]
            self._bases[spec] = drafter
        return self._bases[spec]

    def mode(self) -> str:
        """One line: how the next answer decodes."""
        if not self.speculative:
            return "plain autoregressive decoding (speculative off)"
        if self.ngram:
            return f"speculative: ngram (prompt lookup), tree {self._tree_words()}"
        if self.egag:
            gamma = f", gamma_max {self.gamma}" if self.gamma is not None else ""
            tree = f", tree {self.tree_spec}" if self.tree_spec is not None else ""
            return f"speculative: egag around {self.draft}{gamma}{tree}"
        return f"speculative: {self.draft}, tree {self._tree_words()}"

    def _tree_words(self) -> str:
        if self.tree_spec is not None:
            return self.tree_spec
        if self.gamma is not None:
            return f"chain:{self.gamma + 1} (gamma {self.gamma})"
        spec = self.drafter_spec()
        shape = getattr(self._bases.get(spec), "shape", None) if spec else None
        if shape is None:
            return "the drafter's default"
        if shape.width == 1:
            return f"chain:{shape.size} (the drafter's default)"
        return f"{_nodes(shape.size)}, depth {shape.depth} (the drafter's default)"

    def processor(self) -> str:
        """The sampling settings in /processor words."""
        s = self.sampling
        if s.greedy:
            return "greedy"
        name = {(False, False): "multinomial", (True, False): "topk",
                (False, True): "nucleus", (True, True): "topknucleus"}[
            (s.top_k > 0, s.top_p < 1.0)]
        parts = [f"temperature {s.temperature:g}"]
        if s.top_k > 0:
            parts.append(f"top-k {s.top_k}")
        if s.top_p < 1.0:
            parts.append(f"top-p {s.top_p:g}")
        return f"{name} ({', '.join(parts)})"

    @staticmethod
    def _check_gamma(gamma: int) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise ChatError(f"gamma counts drafted tokens per step: an integer >= 1, got "
                            f"{gamma!r}")

        chain(draft_tokens=gamma)  # the tree-size cap

    # ------------------------------------------------------------------ commands
    def command(self, line: str) -> str:
        """Apply one slash command (``/help`` lists them) and return its reply. A mistake
        (unknown command, bad value) returns a one-line ``error: ...`` and changes
        nothing."""
        text = line.strip()
        name, _, rest = text.partition(" ")
        name, rest = name.lower(), rest.strip()
        handler = _COMMANDS.get(name)
        if handler is None:
            shown = name if len(name) <= 40 else name[:37] + "..."
            return f"error: unknown command {shown!r}; /help lists the commands"
        try:
            return handler(self, rest)
        except (TreeoptError, OSError) as exc:  # OSError: a file name too long, unreadable
            return "error: " + one_line(exc, 300)
        except Exception as exc:  # noqa: BLE001 - a session survives any line
            return f"error: {name} failed ({type(exc).__name__}: {one_line(exc, 300)})"

    def _toggle(self, rest: str, current: bool, what: str) -> bool:
        word = rest.lower()
        if not word:
            return not current
        if word in _ON:
            return True
        if word in _OFF:
            return False
        raise ChatError(f"{what} takes on or off (nothing toggles), got {rest!r}")

    def _cmd_speculative(self, rest: str) -> str:
        self.speculative = self._toggle(rest, self.speculative, "/speculative")
        return ("speculative decoding on: " if self.speculative else
                "speculative decoding off: ") + self.mode()

    def _cmd_ngram(self, rest: str) -> str:
        on = self._toggle(rest, self.ngram, "/ngram")
        if on:
            self.ngram, self.egag, self.speculative = True, False, True
            return "ngram drafting on: " + self.mode()
        self.ngram = False
        return "ngram drafting off: " + self.mode()

    def _cmd_egag(self, rest: str) -> str:
        on = self._toggle(rest, self.egag, "/egag")
        if on:
            if "egag" not in registered():
                raise ChatError("the egag drafter is not available in this installation")
            was = (self.egag, self.ngram, self.speculative)
            self.egag, self.ngram, self.speculative = True, False, True
            try:
                self._base(self.drafter_spec())  # build it now: a draft EGAG cannot use is
            except TreeoptError:                 # reported here, the settings kept
                self.egag, self.ngram, self.speculative = was
                raise
            return "egag drafting on: " + self.mode()
        self.egag = False
        return "egag drafting off: " + self.mode()

    def _cmd_gamma(self, rest: str) -> str:
        if not rest:
            return f"gamma: {self.gamma if self.gamma is not None else 'not set'}; " \
                   f"tree {self._tree_words()}"
        gamma = _integer(rest, "/gamma N (drafted tokens per step, >= 1)")
        self._check_gamma(gamma)
        self.gamma, self.tree, self.tree_spec = gamma, None, None
        return f"gamma {gamma}: a chain of {gamma} drafted tokens per step (chain:{gamma + 1})"

    def _cmd_tree(self, rest: str) -> str:
        if not rest:
            return f"tree: {self._tree_words()}"
        if rest.lower() in ("default", "none"):
            self.tree, self.tree_spec, self.gamma = None, None, None
            return "tree: the drafter's default"
        tree = resolve_tree(rest)
        self.tree, self.tree_spec, self.gamma = tree, rest, None
        return f"tree {rest}: {_nodes(tree.size)}, depth {tree.depth}"

    def _cmd_draft(self, rest: str) -> str:
        if not rest:
            return f"draft: {self.draft}"
        if rest.lower() in ("none", "ar"):
            raise ChatError("/speculative off decodes without a draft; /draft takes a drafter "
                            "spec such as early-exit:4 or a model folder")
        self._base(rest)  # load it now: a bad spec is reported here, the setting kept
        self.draft, self.ngram, self.speculative = rest, False, True
        return "draft " + rest + ": " + self.mode()

    def _cmd_processor(self, rest: str) -> str:
        args = rest.split()
        if not args or args[0].lower() not in PROCESSORS:
            given = f" {args[0]!r}" if args else ""
            raise ChatError(f"unknown processor{given}; use greedy, multinomial [T], topk K "
                            "[T], nucleus P [T] or topknucleus K P [T]")
        name, values = args[0].lower(), args[1:]
        needs = PROCESSORS[name]
        usage = f"/processor {name} {' '.join(needs)}{' ' if needs else ''}[T]"
        if name == "greedy":
            if values:
                raise ChatError("/processor greedy takes no values")
            temperature, top_k, top_p = 0.0, 0, 1.0
        else:
            if len(values) not in (len(needs), len(needs) + 1):
                raise ChatError(f"usage: {usage} (T: temperature, default 1)")
            named = dict(zip(needs, values))
            top_k = _integer(named["K"], usage) if "K" in named else 0
            top_p = _number(named["P"], usage) if "P" in named else 1.0
            temperature = _number(values[len(needs)], usage) if len(values) > len(needs) \
                else 1.0
            if "K" in named and top_k < 1:
                raise ChatError(f"top-k must be >= 1 for /processor {name}, got {top_k}")
            if "P" in named and not 0 < top_p <= 1:
                raise ChatError(f"top-p must be in (0, 1], got {named['P']}")
            if temperature <= 0:
                raise ChatError(f"temperature must be > 0 for /processor {name} (greedy is "
                                f"/processor greedy), got {values[-1]}")
        s = self.sampling
        self.sampling = Sampling(temperature, top_k, top_p, s.rule, s.seed)
        return "processor " + self.processor()

    def _cmd_length(self, rest: str) -> str:
        if not rest:
            return f"length: {self.max_new_tokens} new tokens per answer"
        n = _integer(rest, "/length N (new tokens per answer, >= 1)")
        if n < 1:
            raise ChatError(f"/length counts new tokens per answer: at least 1, got {n}")
        self.max_new_tokens = n
        return f"length {n}: at most {n} new tokens per answer"

    def _cmd_stats(self, rest: str) -> str:
        if self.last is None:
            return "no answer yet: /stats describes the last answer"
        answer = self.last.answer
        if answer.stats is None:
            return (f"the last answer was interrupted after {len(answer.tokens)} tokens: no "
                    "statistics")
        lines = [f"last answer: {self.last.mode}; processor {self.last.processor}"]
        lines += format_stats(answer.stats)
        if answer.dropped_turns:
            lines.append(f"history          {answer.dropped_turns} oldest turns dropped to "
                         "fit the model's window")
        return "\n".join(lines)

    def _cmd_reset(self, rest: str) -> str:
        turns = len(self.history) // 2
        self.history.clear()
        return f"conversation cleared ({turns} turns forgotten)"

    def _cmd_help(self, rest: str) -> str:
        return "\n".join([
            "type a prompt to get an answer; a line starting with // sends a prompt that "
            "starts with /",
            f"/speculative [on|off]   toggle speculative decoding        now: "
            f"{'on' if self.speculative else 'off'}",
            f"/ngram [on|off]         prompt-lookup drafting             now: "
            f"{'on' if self.ngram else 'off'}",
            f"/egag [on|off]          entropy-adaptive draft length      now: "
            f"{'on' if self.egag else 'off'}",
            f"/gamma N                a chain of N drafted tokens/step   now: "
            f"{self.gamma if self.gamma is not None else 'not set'}",
            f"/tree SHAPE|FILE        tree shape or growmap (default)    now: "
            f"{self._tree_words()}",
            f"/draft SPEC             the draft (model, early-exit:K...) now: {self.draft}",
            "/processor NAME ...     greedy | multinomial [T] | topk K [T] | nucleus P [T] | "
            "topknucleus K P [T]",
            f"                        (T: temperature, default 1)       now: "
            f"{self.processor()}",
            f"/length N               new tokens per answer              now: "
            f"{self.max_new_tokens}",
            "/stats                  tokens per step, acceptance by depth, time split of "
            "the last answer",
            f"/reset                  forget the conversation            now: "
            f"{len(self.history) // 2} turns"
            + (" (chat template)" if self.uses_template else " (no chat template)"),
            "/help                   this list",
            "/quit                   leave (Ctrl-D too); Ctrl-C stops an answer",
            f"decoding: {self.mode()}",
        ])

    def _cmd_quit(self, rest: str) -> str:
        self.finished = True
        return "bye"

    # ------------------------------------------------------------------ answers
    def messages(self, prompt: str, skip: int = 0) -> list[dict]:
        """The chat messages of an answer to ``prompt`` after the conversation so far,
        without its ``skip`` oldest turns (a turn: a user message and its answer)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history[2 * skip:] + [{"role": "user", "content": prompt}]

    def encode(self, prompt: str, drafter: Drafter | None = None) -> tuple[torch.Tensor, int]:
        """(prompt ids (1, L), turns dropped): the conversation plus ``prompt``, without its
        oldest turns while it and ``max_new_tokens`` new tokens exceed the model window.
        Raises ChatError when ``prompt`` alone does not fit."""
        limit = model_window(self.target, drafter)
        turns = len(self.history) // 2
        dropped = 0
        while True:
            ids = encode_prompt(self.tokenizer, self.messages(prompt, dropped),
                                self.chat_template)
            if limit is None or ids.shape[1] + self.max_new_tokens <= limit or dropped >= turns:
                break
            dropped += 1
        if limit is not None and ids.shape[1] >= limit:
            raise ChatError(f"the prompt is {ids.shape[1]} tokens but the model window is "
                            f"{limit}; shorten it")
        return ids, dropped

    def answer(self, prompt: str, on_text: Callable[[str], Any] | None = None) -> Answer:
        """Answer ``prompt`` after the conversation so far, streaming text pieces through
        ``on_text``; the exchange joins the history. A ``KeyboardInterrupt`` while decoding
        stops the answer (``interrupted=True``, see the module docstring). Raises a
        TreeoptError when the drafter cannot be built or the prompt cannot be decoded (or
        is not text: undecodable bytes read from a pipe); the history is then unchanged."""
        if not prompt.strip():
            raise ChatError("the prompt is empty; type some text")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ChatError("the line holds bytes that are not UTF-8 text; refused (type "
                            "text)") from None
        drafter = self.drafter()
        ids, dropped = self.encode(prompt, drafter)
        ids = ids.to(next(self.target.parameters()).device)
        stream = TextStream(self.tokenizer, on_text)
        eos = eos_ids(self.tokenizer, self.target)
        mode, processor = self.mode(), self.processor()
        try:
            with torch.inference_mode():
                result = generate(self.target, drafter, ids, max_new_tokens=self.max_new_tokens,
                                  sampling=self.sampling, eos_token_id=eos or None,
                                  on_tokens=stream.push)
        except KeyboardInterrupt:
            tokens = list(stream.ids)
            answer = Answer(stream.finish(tokens), tokens, None, True, dropped)
        else:
            answer = Answer(stream.finish(result.tokens), list(result.tokens), result.stats,
                            False, dropped)
        if dropped:
            del self.history[:2 * dropped]
        if answer.tokens:
            self.history += [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": answer.text}]
        self.last = _Last(answer, mode, processor)
        return answer


_COMMANDS: dict[str, Callable[[ChatSession, str], str]] = {
    "/speculative": ChatSession._cmd_speculative, "/ngram": ChatSession._cmd_ngram,
    "/egag": ChatSession._cmd_egag, "/gamma": ChatSession._cmd_gamma,
    "/tree": ChatSession._cmd_tree, "/draft": ChatSession._cmd_draft,
    "/processor": ChatSession._cmd_processor, "/length": ChatSession._cmd_length,
    "/stats": ChatSession._cmd_stats, "/reset": ChatSession._cmd_reset,
    "/help": ChatSession._cmd_help, "/quit": ChatSession._cmd_quit,
    "/exit": ChatSession._cmd_quit,
}


# ---------------------------------------------------------------------- statistics
def acceptance_by_depth(stats: DecodeStats) -> list[float]:
    """Share of verification steps that accepted at least d drafted tokens, for d = 1 up to
    the deepest tree verified (index d - 1); empty when nothing was drafted."""
    steps = stats.steps
    deepest = max((s.depth for s in steps), default=0)
    if not steps or deepest == 0:
        return []
    return [sum(s.accepted >= d for s in steps) / len(steps) for d in range(1, deepest + 1)]


def format_stats(stats: DecodeStats) -> list[str]:
    """``/stats`` lines for one answer's ``DecodeStats``."""
    total = stats.total_s
    tps = stats.generated_tokens / total if total > 0 else float("nan")
    lines = [
        f"tokens           {stats.generated_tokens} generated in {stats.target_forwards} "
        f"verification steps + the prefill (stop: {stats.stop_reason or 'n/a'})",
        f"tokens per step  {stats.tokens_per_step:.3f} (accepted drafted tokens + 1 per "
        "step)",
        f"acceptance rate  {stats.acceptance_rate:.3f} ({stats.accepted_tokens}/"
        f"{stats.drafted_tokens} drafted tokens accepted)",
    ]
    shares = acceptance_by_depth(stats)
    if shares:
        lines.append("acceptance/depth " + "  ".join(
            f">={d}: {100 * x:.0f} %" for d, x in enumerate(shares, 1))
            + " (share of steps accepting at least d drafted tokens)")
    else:
        lines.append("acceptance/depth nothing drafted (plain decoding steps)")
    sizes = Counter((s.nodes, s.depth) for s in stats.steps)
    if len(sizes) == 1:
        (nodes, depth), n = sizes.most_common(1)[0]
        lines.append(f"tree sizes       {_nodes(nodes)} (depth {depth}) in all {n} steps")
    elif sizes:
        mean = sum(s.nodes for s in stats.steps) / len(stats.steps)
        common = ", ".join(f"{_nodes(nodes)}/depth {depth} x{n}"
                           for (nodes, depth), n in sizes.most_common(4))
        more = f", {len(sizes) - 4} more sizes" if len(sizes) > 4 else ""
        lines.append(f"tree sizes       mean {mean:.1f} nodes: {common}{more}")

    def part(name: str, x: float) -> str:
        share = f" ({100 * x / total:.0f} %)" if total > 0 else ""
        return f"{name} {1000 * x:.1f} ms{share}"

    lines.append(f"time             {1000 * total:.1f} ms = " + " + ".join(
        part(n, x) for n, x in (("prefill", stats.prefill_s), ("draft", stats.draft_s),
                                ("verify", stats.verify_s), ("other", stats.other_s))))
    lines.append(f"tokens/s         {tps:.1f} (generated tokens only)")
    return lines


def summary(answer: Answer) -> str:
    """One line after an answer: tokens, tokens/s, tokens per step."""
    if answer.stats is None:
        return f"[interrupted after {len(answer.tokens)} tokens]"
    s = answer.stats
    tps = s.generated_tokens / s.total_s if s.total_s > 0 else float("nan")
    dropped = f", {answer.dropped_turns} old turns dropped" if answer.dropped_turns else ""
    return (f"[{s.generated_tokens} tokens, {tps:.1f} tokens/s, {s.tokens_per_step:.2f} "
            f"tokens/step{dropped}]")


# ---------------------------------------------------------------------- helpers
def _nodes(n: int) -> str:
    return f"{n} node" if n == 1 else f"{n} nodes"


def _tree_text(tree: Tree | str) -> str:
    if isinstance(tree, Tree):
        return "parents:[" + ",".join(str(p) for p in tree.parents) + "]"
    return str(tree).strip()


def _nested(spec: str) -> str:
    """A spec as an option value: parenthesised when it holds commas."""
    return f"({spec})" if "," in spec else spec


def _integer(text: str, usage: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ChatError(f"{text.strip()!r} is not an integer; usage: {usage}") from None


def _number(text: str, usage: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ChatError(f"{text.strip()!r} is not a number; usage: {usage}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ChatError(f"{text.strip()!r} is not a finite number; usage: {usage}")
    return value


__all__ = ["Answer", "ChatError", "ChatSession", "DEFAULT_DRAFT", "DEFAULT_LENGTH",
           "PROCESSORS", "acceptance_by_depth", "format_stats", "summary"]
