"""Datastore and bigram drafters: the suffix index, its file format and checks, the CLI, the
proposals, and greedy exactness of decoding with them."""

import random
from collections import Counter

import numpy as np
import pytest
import torch

from treeopt.cli import main
from treeopt.decode.drafter import DrafterError, build_drafter
from treeopt.drafters.datastore import (
    SCAN_CAP,
    BigramDrafter,
    Datastore,
    DatastoreDrafter,
    DatastoreError,
    build_datastore,
    load_datastore,
    read_meta,
    tokenizer_fingerprint,
)
from treeopt.tree import Tree

# Continuations, counted on paper:
#   after 2:    3 (x3), 6 (x2), 4 (x1)      after 1 2: 3 (x2), 4
#   after 5 2:  6 (x2), 3                  after 8:   9, 10 (tie -> smaller id first)
#   3, 4, 6, 9 and 10 end their documents: they have no continuation.
DOCS = [[1, 2, 3], [1, 2, 3], [1, 2, 4], [5, 2, 3], [5, 2, 6], [5, 2, 6], [8, 10], [8, 9]]


class WordTokenizer:
    """A tokenizer-like object: whitespace words -> ids of a fixed word list."""

    def __init__(self, words, name="toy-words"):
        self.vocab = {w: i for i, w in enumerate(words)}
        self.name_or_path = name

    def encode(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return [self.vocab[w] for w in text.split()]

    def get_vocab(self):
        return dict(self.vocab)


WORDS = ["<s>", "the", "cat", "sat", "on", "mat", "dog", "ran", "a", "far", "away"]


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


def brute_candidates(docs, context, k, max_n):
    """Expected look-up: longest suffix (<= max_n) with a continuation inside a document,
    continuations by count desc then id asc."""
    for n in range(min(max_n, len(context)), 0, -1):
        suffix = list(context[-n:])
        nxt = Counter(d[i + n] for d in docs for i in range(len(d) - n)
                      if list(d[i:i + n]) == suffix)
        if nxt:
            return [t for t, _ in sorted(nxt.items(), key=lambda x: (-x[1], x[0]))][:k], n
    return [], 0


# ---------------------------------------------------------------------------- look-up
def test_hand_counted_candidates_and_order():
    s = Datastore.from_token_lists(DOCS, max_n=4)
    assert s.num_tokens == 22 and s.num_documents == 8
    assert s.candidates([2], 5) == [3, 6, 4]
    assert s.candidates([2], 2) == [3, 6]
    assert s.candidates([1, 2], 5) == [3, 4]
    assert s.candidates([8], 5) == [9, 10]  # tie: smaller id first
    assert s.candidates([2], 0) == []
    assert s.candidates([], 3) == []
    assert s.candidates([7], 3) == [] and s.candidates([1000], 3) == []
    assert s.candidates([3], 3) == []  # 3 only ends documents


def test_longest_suffix_wins():
    s = Datastore.from_token_lists(DOCS, max_n=4)
    assert s.candidates([5, 2], 5) == [6, 3]  # not [3, 6, 4] of the shorter suffix [2]
    assert s.match([5, 2]) == (2, 3)
    # 9 5 2 never occurs: falls back to 5 2
    assert s.candidates([9, 5, 2], 5) == [6, 3]
    assert s.match([9, 5, 2]) == (2, 3)
    assert s.match([2]) == (1, 6)
    # only max_n tokens of context count
    s2 = Datastore.from_token_lists([[1, 2, 3, 4, 5], [9, 2, 3, 4, 6]], max_n=2)
    assert s2.candidates([1, 2, 3, 4], 5) == [5, 6]
    s3 = Datastore.from_token_lists([[1, 2, 3, 4, 5], [9, 2, 3, 4, 6]], max_n=4)
    assert s3.candidates([1, 2, 3, 4], 5) == [5]


def test_matches_never_cross_documents():
    s = Datastore.from_token_lists([[1, 2, 3], [4, 5]], max_n=4)
    assert s.candidates([3], 3) == []  # 3 ends a document: 4 does not follow it
    assert s.match([2, 3, 4]) == (1, 1)  # "3 4" spans the boundary: only "4" matches
    assert s.candidates([2, 3, 4], 3) == [5]
    assert s.candidates([5], 3) == []


def test_candidates_equal_brute_force():
    rng = random.Random(0)
    for trial in range(20):
        vocab = rng.choice([3, 5, 12])
        docs = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
                for _ in range(rng.randrange(1, 8))]
        max_n = rng.choice([1, 2, 3, 8])
        s = Datastore.from_token_lists(docs, max_n=max_n)
        for _ in range(40):
            ctx = [rng.randrange(vocab + 1) for _ in range(rng.randrange(1, 10))]
            k = rng.randrange(1, 6)
            want, n = brute_candidates(docs, ctx, k, max_n)
            assert s.candidates(ctx, k) == want, (trial, docs, ctx, k, max_n)
            assert s.match(ctx)[0] == n


def test_common_context_is_sampled():
    docs = [[7, 1] for _ in range(3 * SCAN_CAP)] + [[7, 2] for _ in range(SCAN_CAP)]
    s = Datastore.from_token_lists(docs, max_n=2)
    assert s.match([7]) == (1, 4 * SCAN_CAP)
    assert s.candidates([7], 3) == [1, 2]


def test_empty_corpus_raises():
    tok = WordTokenizer(WORDS)
    with pytest.raises(DatastoreError) as e:
        build_datastore([], tok, progress=False)
    assert "no tokens" in one_line(e)
    with pytest.raises(DatastoreError):
        build_datastore(["", ""], tok, progress=False)
    with pytest.raises(DatastoreError):
        Datastore.from_token_lists([[], []])
    with pytest.raises(DatastoreError):
        Datastore.from_token_lists([[1, -3]])


def test_build_from_texts_with_tokenizer():
    tok = WordTokenizer(WORDS)
    s = build_datastore(["the cat sat on the mat", "the dog ran far away", "the cat ran"],
                        tok, max_n=3, progress=False, description="toy")
    ids = tok.vocab
    assert s.num_documents == 3 and s.num_tokens == 14
    # after "the": cat (x2), mat, dog (tie: smaller id first)
    assert s.candidates([ids["the"]], 3) == [ids["cat"], ids["mat"], ids["dog"]]
    assert s.candidates([ids["the"], ids["cat"]], 3) == [ids["sat"], ids["ran"]]
    assert s.meta["tokenizer"] == "toy-words" and s.meta["vocab_size"] == len(WORDS)
    assert s.meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert s.meta["description"] == "toy"


# ---------------------------------------------------------------------------- bigram table
def test_bigram_table_equals_brute_force():
    rng = random.Random(1)
    docs = [[rng.randrange(9) for _ in range(rng.randrange(1, 60))] for _ in range(12)]
    s = Datastore.from_token_lists(docs, max_n=3, meta={"vocab_size": 10})
    table = s.bigram_table(4)
    assert table.shape == (10, 4) and table.dtype == np.int32
    for a in range(10):
        counts = Counter(d[i + 1] for d in docs for i in range(len(d) - 1) if d[i] == a)
        want = [t for t, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0]))][:4]
        assert table[a].tolist() == want + [-1] * (4 - len(want))


# ---------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path):
    tok = WordTokenizer(WORDS)
    s = build_datastore(["the cat sat on the mat", "the dog ran"], tok, max_n=4,
                        progress=False)
    path = s.save(tmp_path / "sub" / "store.npz")
    t = load_datastore(path, tokenizer=tok, vocab_size=len(WORDS))
    assert np.array_equal(t.tokens, s.tokens) and np.array_equal(t.positions, s.positions)
    assert t.meta == s.meta and t.max_n == 4
    assert read_meta(path) == s.meta
    for ctx in ([1], [1, 2], [5], [4, 1]):
        assert t.candidates(ctx, 4) == s.candidates(ctx, 4)
    assert [p.name for p in path.parent.iterdir()] == ["store.npz"]  # no temp left


def test_missing_truncated_and_wrong_format_files(tmp_path):
    with pytest.raises(DatastoreError) as e:
        load_datastore(tmp_path / "nope.npz")
    assert "no such datastore" in one_line(e)
    good = Datastore.from_token_lists(DOCS).save(tmp_path / "good.npz")
    data = good.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatastoreError) as e:
        load_datastore(cut)
    assert "rebuild" in one_line(e)
    flipped = bytearray(data)
    at = data.find(Datastore.from_token_lists(DOCS).tokens.tobytes())
    assert at > 0
    flipped[at + 40] ^= 0xFF  # inside the token array: the zip CRC catches it
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(DatastoreError):
        load_datastore(bad)
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(DatastoreError) as e:
        load_datastore(other)
    assert "not a treeopt datastore" in one_line(e)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, tokens=np.zeros(3, np.int32), positions=np.zeros(1, np.int32),
             meta=np.array('{"format": "something-else", "version": 1}'))
    with pytest.raises(DatastoreError) as e:
        load_datastore(wrong)
    assert "format" in one_line(e)
    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    with pytest.raises(DatastoreError) as e:
        load_datastore(text)
    one_line(e)
    with pytest.raises(DatastoreError):
        load_datastore(tmp_path)  # a folder


def test_foreign_tokenizer_is_refused(tmp_path):
    tok = WordTokenizer(WORDS)
    path = build_datastore(["the cat sat"], tok, progress=False).save(tmp_path / "s.npz")
    shuffled = WordTokenizer(list(reversed(WORDS)), name="other-words")
    with pytest.raises(DatastoreError) as e:
        load_datastore(path, tokenizer=shuffled)
    msg = one_line(e)
    assert "toy-words" in msg and "other-words" in msg and "datastore build" in msg
    with pytest.raises(DatastoreError) as e:
        load_datastore(path, tokenizer=WordTokenizer(WORDS + ["extra"]))
    one_line(e)
    with pytest.raises(DatastoreError) as e:
        load_datastore(path, vocab_size=50000)  # another tokenizer's vocabulary size
    assert "50000" in one_line(e)
    with pytest.raises(DatastoreError):
        load_datastore(path, vocab_size=3)  # tokens outside the vocabulary
    assert load_datastore(path, tokenizer=WordTokenizer(WORDS, name="same-vocab"),
                          vocab_size=len(WORDS) + 64).num_tokens == 3  # padded embedding ok


def test_interrupted_save_leaves_destination_alone(tmp_path, monkeypatch):
    store = Datastore.from_token_lists(DOCS)
    dest = tmp_path / "store.npz"

    def broken_savez(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(np, "savez", broken_savez)
        with pytest.raises(OSError):
            store.save(dest)
    assert list(tmp_path.iterdir()) == []  # no destination, no temporary file

    store.save(dest)
    before = dest.read_bytes()
    bigger = Datastore.from_token_lists(DOCS + [[1, 2, 3, 4]])

    def broken_replace(src, dst):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("os.replace", broken_replace)
        with pytest.raises(KeyboardInterrupt):
            bigger.save(dest)
    assert [p.name for p in tmp_path.iterdir()] == ["store.npz"]
    assert dest.read_bytes() == before
    assert load_datastore(dest).num_tokens == store.num_tokens


# ---------------------------------------------------------------------------- CLI
@pytest.fixture
def toy_tokenizer(monkeypatch):
    tok = WordTokenizer(WORDS)
    monkeypatch.setattr("treeopt.cli.datastore.load_tokenizer", lambda spec: tok)
    return tok


def test_cli_build_and_info(tmp_path, toy_tokenizer, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n\nthe dog ran far away\nthe cat ran\n")
    out = tmp_path / "stores" / "toy.npz"
    assert main(["datastore", "build", "--corpus", str(corpus), "--tokenizer", "toy",
                 "--out", str(out), "--max-n", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "3 documents" in printed and "14 tokens" in printed and " s" in printed
    store = load_datastore(out, tokenizer=toy_tokenizer)
    assert store.max_n == 3 and store.num_tokens == 14
    assert store.meta["tokenizer_spec"] == "toy" and "corpus.txt" in store.meta["description"]

    assert main(["datastore", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "tokens:" in info and "14" in info and "toy" in info and "max_n:" in info
    assert main(["datastore", "info", str(out), "--json"]) == 0
    assert '"num_tokens": 14' in capsys.readouterr().out

    # overwriting a datastore is fine
    assert main(["datastore", "build", "--corpus", str(corpus), "--tokenizer", "toy",
                 "--out", str(out), "--no-progress"]) == 0
    assert load_datastore(out).max_n == 8


def test_cli_errors_are_one_line(tmp_path, toy_tokenizer, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat\n")
    precious = tmp_path / "precious.npz"
    precious.write_text("not a datastore")
    assert main(["datastore", "build", "--corpus", str(corpus), "--tokenizer", "toy",
                 "--out", str(precious), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and len(err.strip().splitlines()) == 1
    assert precious.read_text() == "not a datastore"

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for corpus_arg in (str(empty), str(tmp_path / "missing.txt")):
        assert main(["datastore", "build", "--corpus", corpus_arg, "--tokenizer", "toy",
                     "--out", str(tmp_path / "x.npz"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("treeopt datastore: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.npz").exists()

    assert main(["datastore", "info", str(tmp_path / "missing.npz")]) == 2
    assert "no such datastore" in capsys.readouterr().err


# ---------------------------------------------------------------------------- drafters
PROPOSAL_DOCS = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 5, 6], [7, 2, 5, 6]]
FORK = Tree((-1, 0, 0, 1, 2))  # two root children, one child each


def test_build_drafter_specs(tmp_path):
    with pytest.raises(DatastoreError) as e:
        build_drafter("datastore:/nonexistent.npz", target=None)
    one_line(e)
    with pytest.raises(DrafterError):
        build_drafter("datastore:", target=None)
    tok = WordTokenizer(WORDS)
    path = build_datastore(["the cat sat on the mat"], tok, progress=False).save(
        tmp_path / "s.npz")
    d = build_drafter(f"datastore:{path}", target=None, tokenizer=tok, tree=FORK)
    assert isinstance(d, DatastoreDrafter) and d.shape == FORK and d.k == 2
    b = build_drafter(f"bigram:{path}", target=None, tokenizer=tok)
    assert isinstance(b, BigramDrafter) and b.shape.size == 4  # the default shape
    with pytest.raises(DatastoreError):
        build_drafter(f"bigram:{path}", target=None,
                      tokenizer=WordTokenizer(list(reversed(WORDS))))


def test_datastore_drafter_proposes_expected_tree():
    s = Datastore.from_token_lists(PROPOSAL_DOCS, max_n=4)
    d = DatastoreDrafter(s, shape=FORK)
    d.start(torch.tensor([[9, 1, 2]]))
    p = d.propose([9, 1, 2], max_depth=5)
    # after "1 2" the corpus has 3 (x2), 5; after "1 2 3" -> 4, after "1 2 5" -> 6
    assert p.tree == FORK and p.tokens.tolist() == [2, 3, 5, 4, 6]
    assert p.tokens.dtype == torch.int64
    p = d.propose([9, 1, 2], max_depth=1)
    assert p.tree == Tree((-1, 0, 0)) and p.tokens.tolist() == [2, 3, 5]
    p = d.propose([9, 1, 2], max_depth=0)
    assert p.tree.size == 1 and p.tokens.tolist() == [2]
    # nothing known after 6: the root alone
    assert d.propose([9, 1, 2, 5, 6], max_depth=5).tree.size == 1
    # a chain of two drafted tokens (the default is a chain of three)
    assert DatastoreDrafter(s).shape == Tree((-1, 0, 1, 2))
    c = DatastoreDrafter(s, shape=Tree((-1, 0, 1)))
    c.start(torch.tensor([[1, 2]]))
    p = c.propose([1, 2], max_depth=5)
    assert p.tree == Tree((-1, 0, 1)) and p.tokens.tolist() == [2, 3, 4]
    # reshaped: the store is shared, the shape (and k = its width) and run index are new
    r = c.reshaped(FORK)
    assert r.store is s and r.k == 2 and c.k == 1 and r.index is not c.index
    r.start(torch.tensor([[9, 1, 2]]))
    assert r.propose([9, 1, 2], max_depth=5).tokens.tolist() == [2, 3, 5, 4, 6]


def test_run_text_comes_before_the_corpus():
    s = Datastore.from_token_lists(PROPOSAL_DOCS, max_n=4)
    d = DatastoreDrafter(s, shape=FORK)
    d.start(torch.tensor([[2, 8, 1, 2]]))
    # own text: 2 -> 8, 2 8 -> 1; corpus: 1 2 -> 3, 5; 1 2 3 -> 4
    p = d.propose([2, 8, 1, 2], max_depth=5)
    assert p.tokens.tolist() == [2, 8, 3, 1, 4] and p.tree == FORK
    # generated tokens are indexed as they are committed: now 2 -> 3 (recent) and 8
    p = d.propose([2, 8, 1, 2, 3, 7, 2], max_depth=5)
    assert set(p.tokens.tolist()[1:3]) == {8, 3}
    # a new text without start() is indexed afresh
    p = d.propose([1, 2], max_depth=5)
    assert p.tokens.tolist()[:3] == [2, 3, 5]


def test_bigram_drafter_proposals():
    s = Datastore.from_token_lists(PROPOSAL_DOCS, max_n=4)
    assert BigramDrafter.from_datastore(s).shape == Tree((-1, 0, 1, 2))
    b = BigramDrafter.from_datastore(s, shape=Tree((-1, 0, 1)))
    p = b.propose([9, 1], max_depth=5)
    assert p.tree == Tree((-1, 0, 1)) and p.tokens.tolist() == [1, 2, 3]  # 2 -> 3, 5: tie
    p = b.propose([3], max_depth=5)
    assert p.tree == Tree((-1, 0)) and p.tokens.tolist() == [3, 4]  # 4 has no successor
    assert b.propose([6], max_depth=5).tree.size == 1
    assert b.propose([1], max_depth=0).tree.size == 1
    f = BigramDrafter.from_datastore(s, shape=FORK)
    p = f.propose([1, 2], max_depth=5)
    assert p.tree == FORK and p.tokens.tolist() == [2, 3, 5, 4, 6]
    assert b.reshaped(FORK).propose([1, 2], max_depth=5).tokens.tolist() == [2, 3, 5, 4, 6]
    assert b.propose([1, 2], max_depth=5).tokens.tolist() == [2, 3, 4]


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_decoding_is_exact(arch):
    from treeopt.decode.engine import generate
    from treeopt.testing import tiny_causal_lm

    target = tiny_causal_lm(arch, vocab_size=96)
    with torch.no_grad():  # peaked, context-dependent predictions
        target.model.norm.weight.mul_(20.0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 96, (1, 10), generator=g) for _ in range(4)]
    plain = [generate(target, None, ids, max_new_tokens=40).tokens for ids in prompts]
    # the corpus: the target's own greedy text for the first three prompts
    docs = [ids[0].tolist() + out for ids, out in zip(prompts[:3], plain[:3])]
    store = Datastore.from_token_lists(docs, max_n=6, meta={"vocab_size": 96})
    drafters = [DatastoreDrafter(store), DatastoreDrafter(store, shape=FORK),
                BigramDrafter.from_datastore(store)]
    for drafter in drafters:
        accepted = 0
        for ids, want in zip(prompts, plain):
            gen = generate(target, drafter, ids, max_new_tokens=40)
            assert gen.tokens == want, (type(drafter).__name__, ids)
            accepted += gen.stats.accepted_tokens
        assert accepted > 0, type(drafter).__name__
