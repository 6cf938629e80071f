"""treeopt eval: greedy exactness in half precision (equal / numerical tie / differs), --dp
levels, prompts encoded as treeopt.api.encode_prompt does, and the plots' labels."""

import json

import pytest
import torch
from helpers import CharTokenizer, serve_pair

from treeopt.datasets import Prompt
from treeopt.decode.engine import generate as real_generate
from treeopt.evaluate import exactness
from treeopt.evaluate.methods import AR, dp_method, tree_method
from treeopt.evaluate.results import METRICS
from treeopt.evaluate.runner import EvalConfig, EvalError, run_eval
from treeopt.testing import tiny_pair
from treeopt.tree import Tree

KARY = "kary:2x2"
P_DEEP = [0.9, 0.05, 0.02]  # deep trees pay: the DP uses every level it may


def _token_prompts(n, vocab, length=12):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(2, vocab, (length,), generator=g).tolist()
        out.append(Prompt(str(i), "c", "", token_ids=tuple(ids)))
    return out


# ---------------------------------------------------------------------------- tolerance
def test_tolerance_per_dtype_and_gap_by_hand():
    assert exactness.rel_tolerance(torch.bfloat16) == 2.0 ** -3
    assert exactness.rel_tolerance(torch.float16) == 2.0 ** -3
    assert exactness.rel_tolerance(torch.float32) == 1e-4
    assert exactness.rel_tolerance("float64") == torch.finfo(torch.float64).eps
    # bfloat16's measured drift (scripts/bench_ties.py): 12 * 2**-3 = 1.5 at a logit of -12.
    assert exactness.tie_tolerance(torch.bfloat16, -12.0) == pytest.approx(1.5)
    # gap = best logit - the lower of the two tokens compared; scale = larger magnitude.
    assert exactness.tie_gap([1.0, 3.0, 2.9375, -5.0], 1, 2) == (0.0625, 3.0)
    assert exactness.tie_gap(torch.tensor([1.0, 3.0, 2.9375]), 2, 1) == (0.0625, 3.0)
    # A token below the best two is measured against the best, not against the runner-up.
    assert exactness.tie_gap([3.0, 2.99, 1.0], 0, 2) == (2.0, 3.0)
    assert exactness.first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert exactness.first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert exactness.first_mismatch([1, 2, 3], [1, 2]) == 2
    assert exactness.count_text(5, 1, 6) == "5/6 (+1 tie)"
    assert exactness.count_text(3, 2, 6) == "3/6 (+2 ties)"
    assert exactness.count_text(4, 0, 4) == "4/4"
    for key in ("exactness", "tie_gap", "tie_tolerance", "first_mismatch"):
        assert key in METRICS
    assert "tie" in METRICS["matches_ar"]


def test_compare_classifies_with_the_recomputed_logits(monkeypatch):
    logits = torch.tensor([0.0, 8.0, 7.96875, 6.5])  # tokens 1 and 2 one bf16 step apart
    monkeypatch.setattr(exactness, "logits_after", lambda target, ids: logits)
    same = exactness.compare(None, [5], [1, 1], [1, 1], torch.bfloat16)
    assert same == {"matches_ar": True, "exactness": "equal", "first_mismatch": None,
                    "tie_gap": None, "tie_tolerance": None}
    tie = exactness.compare(None, [5], [1, 1], [1, 2], torch.bfloat16)
    assert (tie["exactness"], tie["matches_ar"], tie["first_mismatch"]) == ("tie", False, 1)
    assert tie["tie_gap"] == 0.03125 and tie["tie_tolerance"] == pytest.approx(8 * 2 ** -3)
    # The same gap is far outside float32's tolerance; a third-ranked token never ties.
    assert exactness.compare(None, [5], [1], [2], torch.float32)["exactness"] == "differs"
    assert exactness.compare(None, [5], [1], [3], torch.bfloat16)["exactness"] == "differs"
    # Outputs that differ only in length are no tie (nothing to recompute).
    short = exactness.compare(None, [5], [1, 1], [1], torch.bfloat16)
    assert short["exactness"] == "differs" and short["tie_gap"] is None


# ---------------------------------------------------------------------------- bf16 ties
SAY = "say one"


def _twins(ids):
    """A bfloat16 tiny pair whose target rates tokens t and u exactly alike (equal LM-head
    rows), t being plain decoding's third token after ``ids``: from then on plain decoding of
    ``ids`` emits t or u within its first three tokens, tied with its twin."""
    target, draft = tiny_pair(dtype=torch.bfloat16)
    ref = real_generate(target, None, torch.tensor([list(ids)]), max_new_tokens=3).tokens
    t = ref[2]
    u = (t + 1) % 96
    with torch.no_grad():
        target.lm_head.weight[u] = target.lm_head.weight[t]
    return target, draft, (t, u)


@pytest.fixture(scope="module")
def bf16_twins():
    prompt = _token_prompts(1, 96)[0]
    target, draft, pair = _twins(prompt.token_ids)
    return target, draft, prompt, pair


@pytest.fixture(scope="module")
def bf16_text_twins():
    """The same for the text prompt SAY through CharTokenizer (no chat template)."""
    return _twins(CharTokenizer()(SAY)["input_ids"])


def _flipping(pair, genuine=False, first_prompt_only=None):
    """A generate seam: drafting methods return plain decoding's output with the first t or u
    swapped for its twin (a real tie), or, ``genuine``, for the target's least likely token.
    ``first_prompt_only``: flip only prompts of that many tokens (the first turn)."""
    target = None

    def seam(tgt, drafter, input_ids, **kw):
        nonlocal target
        target = tgt
        gen = real_generate(tgt, drafter, input_ids, **kw)
        if drafter is None or (first_prompt_only is not None
                               and input_ids.shape[1] != first_prompt_only):
            return gen
        gen.tokens[:] = real_generate(tgt, None, input_ids, **kw).tokens
        for j, tok in enumerate(gen.tokens):
            if tok in pair:
                if genuine:
                    logits = exactness.logits_after(tgt, input_ids[0].tolist() + gen.tokens[:j])
                    gen.tokens[j] = int(logits.float().argmin())
                else:
                    gen.tokens[j] = pair[1] if tok == pair[0] else pair[0]
                break
        return gen

    return seam


def test_bf16_tie_is_reported_not_failed(bf16_twins):
    target, draft, prompt, pair = bf16_twins
    res = run_eval(target, draft, [prompt], [tree_method(KARY)],
                   config=EvalConfig(max_new_tokens=6, warmup=False), progress=False,
                   generate=_flipping(pair))
    row = res.rows.set_index("method").loc[KARY]
    assert (row["exactness"], bool(row["matches_ar"])) == ("tie", False)
    assert row["tie_gap"] == 0.0 and row["tie_tolerance"] > 0
    assert row["first_mismatch"] <= 2
    assert res.rows.set_index("method").loc[AR, "exactness"] == "equal"
    assert res.failures == []
    assert len(res.ties) == 1 and "numerical tie at new token" in res.ties[0]
    assert res.summary.set_index("method").loc[KARY, "matches_ar"] == "0/1 (+1 tie)"


def test_bf16_genuine_difference_still_fails(bf16_twins):
    target, draft, prompt, pair = bf16_twins
    res = run_eval(target, draft, [prompt], [tree_method(KARY)],
                   config=EvalConfig(max_new_tokens=6, warmup=False), progress=False,
                   generate=_flipping(pair, genuine=True))
    row = res.rows.set_index("method").loc[KARY]
    assert row["exactness"] == "differs" and row["tie_gap"] > row["tie_tolerance"]
    assert res.ties == [] and len(res.failures) == 1
    assert res.failures[0].startswith(f"{KARY} differs from ar on prompt c/0 turn 1 at new token")
    assert res.summary.set_index("method").loc[KARY, "matches_ar"] == "0/1"


def test_a_later_turn_after_a_tie_is_compared_on_its_own_prompt(bf16_text_twins):
    """The tie changes turn 2's prompt (it includes turn 1's answer): turn 2 is compared with
    plain decoding of that prompt, not with plain decoding's different turn-2 prompt."""
    target, draft, pair = bf16_text_twins
    tok = CharTokenizer()
    prompts = [Prompt("q", "c", SAY, (SAY, "and two"))]
    res = run_eval(target, draft, prompts, [tree_method(KARY)], tokenizer=tok,
                   config=EvalConfig(max_new_tokens=8, warmup=False), progress=False,
                   generate=_flipping(pair, first_prompt_only=len(tok.encode(SAY))))
    rows = res.rows[res.rows["method"] == KARY].set_index("turn")
    assert rows.loc[1, "exactness"] == "tie"
    assert (rows.loc[2, "exactness"], bool(rows.loc[2, "matches_ar"])) == ("equal", True)
    assert res.failures == []


def test_cli_exit_status_tie_versus_difference(bf16_text_twins, tmp_path, monkeypatch,
                                               capsys):
    import treeopt.evaluate.runner as runner
    from treeopt.cli import main

    target, draft, pair = bf16_text_twins
    serve_pair(monkeypatch, target, draft)
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"id": 0, "category": "x", "prompt": SAY}) + "\n")
    outcomes = {}
    for genuine in (False, True):
        monkeypatch.setattr(runner, "engine_generate", _flipping(pair, genuine=genuine))
        rc = main(["eval", "--dataset", str(data), "--tree", KARY, "--max-new-tokens", "8",
                   "--dtype", "bfloat16", "--out", str(tmp_path / f"run{genuine}"),
                   "--no-progress", "--no-warmup"])
        outcomes[genuine] = (rc, capsys.readouterr())
    rc, cap = outcomes[False]
    assert rc == 0, cap.err
    assert "(+1 tie)" in cap.out and "numerical tie" in cap.err and "FAILED" not in cap.err
    md = (tmp_path / "runFalse" / "report" / "report.md").read_text()
    assert "numerical tie" in md and "FAILED" not in md
    rc, cap = outcomes[True]
    assert rc == 1 and "GREEDY EXACTNESS FAILED for 1 output(s)" in cap.err
    md = (tmp_path / "runTrue" / "report" / "report.md").read_text()
    assert "GREEDY EXACTNESS FAILED for 1 output(s)" in md


def test_natural_bf16_differences_are_ties():
    """Trees verified in one batched bfloat16 pass break near-ties unlike one-token steps
    (on this model and these prompts some outputs differ): none may count as a failure."""
    target, draft = tiny_pair(dtype=torch.bfloat16, hidden_size=64, vocab_size=256)
    res = run_eval(target, draft, _token_prompts(4, 256), [tree_method(KARY)],
                   config=EvalConfig(max_new_tokens=24, warmup=False), progress=False)
    assert set(res.rows["exactness"]) <= {"equal", "tie"}
    assert res.failures == []
    ties = res.rows[res.rows["exactness"] == "tie"]
    assert (ties["tie_gap"] <= ties["tie_tolerance"]).all()


def test_float32_stays_exact():
    target, draft = tiny_pair(hidden_size=64, vocab_size=256)
    res = run_eval(target, draft, _token_prompts(4, 256), [tree_method(KARY)],
                   config=EvalConfig(max_new_tokens=24, warmup=False), progress=False)
    assert (res.rows["exactness"] == "equal").all() and res.rows["matches_ar"].all()


# ---------------------------------------------------------------------------- --dp levels
@pytest.mark.parametrize("size,levels", [(8, 3), (32, 6), (16, 2)])
def test_dp_method_counts_levels_with_the_root(size, levels):
    m = dp_method(P_DEEP, size, levels)
    assert m.tree.depth == levels - 1
    assert m.name == f"dp:{size}x{levels - 1}"
    # The name is a shape spec that builds the same tree again.
    assert tree_method(m.name, P_DEEP).tree == m.tree
    assert m.tree.size <= size


def test_dp_method_refuses_levels_below_two():
    with pytest.raises(EvalError, match="count the root"):
        dp_method(P_DEEP, 8, 1)
    assert dp_method(P_DEEP, 8).name == "dp:8"


def test_cli_dp_levels_count_the_root():
    from treeopt.cli import UserError, build_parser
    from treeopt.cli.eval import build_methods

    args = build_parser().parse_args(["eval", "--out", "x", "--dp", "32x6", "--dp", "8"])
    methods = build_methods(args, P_DEEP)
    by_name = {m.name: m for m in methods}
    assert list(by_name) == [AR, "dp:32x5", "dp:8"]
    assert by_name["dp:32x5"].tree.depth == 5 and by_name["dp:32x5"].kind == "dp"
    for bad in ("32x1", "32x", "x6", "abc"):
        args = build_parser().parse_args(["eval", "--out", "x", "--dp", bad])
        with pytest.raises(UserError, match="--dp"):
            build_methods(args, P_DEEP)


# ---------------------------------------------------------------------------- prompts
class _TemplateTokenizer(CharTokenizer):
    """A chat template whose tokenize=True path adds a BOS the text path does not: encoding
    through the template's text (encode_prompt) and through tokenize=True differ."""

    chat_template = "fake"
    BOS = 0

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f" {m['role'][0]} {m['content']}" for m in messages)
        text += " a" if add_generation_prompt else ""
        if tokenize:
            return [self.BOS] + self.encode(text)
        return text

    def encode(self, text, add_special_tokens=True):
        return ([self.BOS] if add_special_tokens else []) + super().encode(text)


def test_text_prompts_are_encoded_as_encode_prompt_does(monkeypatch):
    from treeopt.api import encode_prompt

    target, draft = tiny_pair()
    tok = _TemplateTokenizer()
    seen = []

    def recording(tgt, drafter, input_ids, **kw):
        if drafter is None:
            seen.append(input_ids[0].tolist())
        return real_generate(tgt, drafter, input_ids, **kw)

    prompts = [Prompt("q", "c", "hi there", ("hi there", "more"))]
    res = run_eval(target, draft, prompts, [tree_method("chain:2")], tokenizer=tok,
                   config=EvalConfig(max_new_tokens=3, warmup=False), progress=False,
                   generate=recording)
    first = [{"role": "user", "content": "hi there"}]
    assert seen[0] == encode_prompt(tok, first)[0].tolist()
    assert seen[0] == encode_prompt(tok, "hi there")[0].tolist()
    assert seen[0][0] != tok.BOS  # the template's own text, no BOS added on top
    ar_rows = res.rows[res.rows["method"] == AR]
    answer = tok.decode(real_generate(target, None, torch.tensor([seen[0]]),
                                      max_new_tokens=3).tokens, skip_special_tokens=True)
    history = first + [{"role": "assistant", "content": answer},
                       {"role": "user", "content": "more"}]
    assert seen[1] == encode_prompt(tok, history)[0].tolist()
    assert list(ar_rows["prompt_tokens"]) == [len(seen[0]), len(seen[1])]
    # Without the chat template: the text through the tokenizer, as encode_prompt does.
    seen.clear()
    run_eval(target, draft, prompts[:1], [tree_method("chain:2")], tokenizer=tok,
             config=EvalConfig(max_new_tokens=3, warmup=False, chat_template=False),
             progress=False, generate=recording)
    assert seen[0] == encode_prompt(tok, "hi there", chat_template=False)[0].tolist()


def test_a_prompt_that_encodes_to_nothing_is_one_line():
    target, draft = tiny_pair()
    with pytest.raises(EvalError, match="prompt c/q: .*zero tokens"):
        run_eval(target, draft, [Prompt("q", "c", "!!", ("!!",))], [tree_method("chain:2")],
                 tokenizer=CharTokenizer(), config=EvalConfig(max_new_tokens=3, warmup=False,
                                                               chat_template=False),
                 progress=False)


# ---------------------------------------------------------------------------- pictures
def _boxes(anns, renderer):
    """The labels' text boxes (an annotation's own extent includes its leader line)."""
    from matplotlib.text import Text

    return [Text.get_window_extent(a, renderer) for a in anns]


def _overlap(a, b):
    return min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)


def test_place_labels_keeps_clustered_labels_apart():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from treeopt.viz import place_labels

    pts = [(1.84, 1.62, "chain:3"), (2.1, 1.78, "chain:4"), (1.9, 1.66, "kary:2x2"),
           (1.95, 1.7, "dp:8x2"), (2.35, 1.92, "dp:16x3"), (2.3, 1.95, "tree:tuned"),
           (1.0, 1.0, "ar"), (1.0, 1.3, "ngram@chain:3")]
    fig, ax = plt.subplots(figsize=(5.0, 4.6))
    ax.plot([0, 2.6], [0, 2.6], ls="--")
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    ax.set_xlim(0, 2.6)
    ax.set_ylim(0, 2.6)
    fig.tight_layout()
    anns = place_labels(ax, pts)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = _boxes(anns, renderer)
    assert [a.get_text() for a in anns] == [p[2] for p in pts]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not _overlap(boxes[i], boxes[j]), (pts[i][2], pts[j][2])
        for x, y, _ in pts:  # no label covers a point's centre
            cx, cy = ax.transData.transform((x, y))
            assert not boxes[i].contains(cx, cy), pts[i][2]
        assert ax.get_window_extent(renderer).contains(boxes[i].x0, boxes[i].y0)
    plt.close(fig)


def test_top1_path_is_clearly_thicker():
    from treeopt.viz import edge_styles, top1_path

    example = Tree.from_successors([[1, 2, 3], [4, 5], [6], [], [7], [], [], []])
    assert top1_path(example) == [0, 1, 4, 7]
    for profile in (None, [0.6, 0.1, 0.05], [0.3, 0.3, 0.3]):
        for points in (6.0, 20.0, 40.0):
            styles = edge_styles(example, profile, points)
            path = [styles[e][0] for e in ((0, 1), (1, 4), (4, 7))]
            rest = [w for e, (w, _) in styles.items() if e not in ((0, 1), (1, 4), (4, 7))]
            assert min(path) >= 2.5 * max(rest), (profile, points)
            assert min(path) >= 2.5  # points: visible at any node size
