"""Hostile datastore files (issue 19, items 1 and 7): metadata that would drive allocation,
deflate bombs and ``.npy`` headers that claim more than the file holds are refused with one
line, in bounded memory (an address-space limit), before anything is allocated."""

import io
import json
import zipfile

import numpy as np
import pytest
from helpers import needs_proc, run_with_memory_limit

from treeopt.drafters.datastore import Datastore, DatastoreError, check_compatible, load_datastore

DOCS = [[1, 2, 3], [1, 2, 4], [5, 2, 6]]

WARM = """
    import sys
    from treeopt.cli import main
    from treeopt.drafters.datastore import Datastore, DatastoreError, load_datastore
    from treeopt.decode.drafter import build_drafter
    warm = Datastore.from_token_lists([[1, 2, 3]]).save(sys.argv[2] + "/warm.npz")
    load_datastore(warm)
"""
LOAD = """
    try:
        if sys.argv[4] == "info":
            print("EXIT", main(["datastore", "info", sys.argv[1]]))
        elif sys.argv[4] == "bigram":
            build_drafter("bigram:" + sys.argv[1], target=None)
            print("LOADED")
        else:
            load_datastore(sys.argv[1])
            print("LOADED")
    except DatastoreError as exc:
        print("ERROR", str(exc))
    except SystemExit as exc:
        print("EXIT", exc.code)
"""


def load_limited(path, tmp_path, how="load", extra_mb=300):
    return run_with_memory_limit(WARM, LOAD, path, tmp_path, how, extra_mb=extra_mb,
                                 timeout=120)


def _meta(**changes):
    meta = dict(Datastore.from_token_lists(DOCS).meta)
    meta.update(changes)
    return meta


def _write(path, meta, tokens=None, positions=None):
    store = Datastore.from_token_lists(DOCS)
    np.savez(path, tokens=store.tokens if tokens is None else tokens,
             positions=store.positions if positions is None else positions,
             meta=np.array(json.dumps(meta)))
    return path


@needs_proc
@pytest.mark.parametrize("how", ["load", "info", "bigram"])
def test_huge_vocab_size_in_metadata_is_refused_in_bounded_memory(tmp_path, how):
    path = _write(tmp_path / "v.npz", _meta(vocab_size=1_500_000_000))
    assert path.stat().st_size < 10_000
    lines, growth_kb = load_limited(path, tmp_path, how)
    if how == "info":
        assert lines[0] == "EXIT 2", lines  # a one-line error, not exit 0 after 11.7 GB
    else:
        assert lines[0].startswith("ERROR") and "vocab_size" in lines[0], lines
    assert growth_kb < 100_000


@pytest.mark.parametrize("value", ["12", [12], 12.5, True, -3, {"a": 1}])
def test_wrong_metadata_types_are_one_line(tmp_path, value):
    for key in ("vocab_size", "max_n", "num_tokens", "num_documents"):
        path = _write(tmp_path / f"{key}.npz", _meta(**{key: value}))
        with pytest.raises(DatastoreError) as e:
            load_datastore(path)
        msg = str(e.value)
        assert "\n" not in msg and key in msg, msg


def test_metadata_must_agree_with_the_arrays(tmp_path):
    good = _meta()
    with pytest.raises(DatastoreError, match="num_documents"):
        load_datastore(_write(tmp_path / "d.npz", dict(good, num_documents=7)))
    with pytest.raises(DatastoreError, match="vocab_size"):
        load_datastore(_write(tmp_path / "v.npz", dict(good, vocab_size=3)))  # token 6 > 3
    with pytest.raises(DatastoreError, match="max_n"):
        load_datastore(_write(tmp_path / "n.npz", dict(good, max_n=10**6)))


def _deflate_bomb(path, n_elements):
    """A datastore whose ``tokens`` member is ``n_elements`` zeros, deflated: written in
    chunks, never held in memory here."""
    store = Datastore.from_token_lists(DOCS)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i4", "fortran_order": False,
                                                  "shape": (n_elements,)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("tokens.npy", "w", force_zip64=True) as fh:
            fh.write(header.getvalue())
            chunk = bytes(1 << 22)
            left = n_elements * 4
            while left:
                fh.write(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))
        for name, arr in (("positions", store.positions),
                          ("meta", np.array(json.dumps(dict(store.meta))))):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr)
            zf.writestr(name + ".npy", buf.getvalue())
    return path


@needs_proc
def test_deflate_bomb_is_refused_in_bounded_memory(tmp_path):
    path = _deflate_bomb(tmp_path / "bomb.npz", 150_000_000)  # 600 MB of zeros
    assert path.stat().st_size < 2_000_000
    lines, growth_kb = load_limited(path, tmp_path, extra_mb=300)
    assert lines[0].startswith("ERROR") and "compress" in lines[0], lines
    assert growth_kb < 100_000


def test_npy_header_claiming_more_than_the_file_holds(tmp_path):
    store = Datastore.from_token_lists(DOCS)
    path = tmp_path / "claim.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in (("tokens", store.tokens), ("positions", store.positions),
                          ("meta", np.array(json.dumps(dict(store.meta))))):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr)
            data = buf.getvalue()
            if name == "tokens":
                data = data.replace(f"({len(arr)},)".encode(), b"(10000000000,)", 1)
            zf.writestr(name + ".npy", data)
    with pytest.raises(DatastoreError) as e:
        load_datastore(path)
    msg = str(e.value)
    assert "\n" not in msg and "tokens" in msg and "elements" in msg, msg


def test_out_of_range_token_error_names_token_and_vocabulary():
    class Tok:
        name_or_path = "tiny-tok"

        def get_vocab(self):
            return {f"w{i}": i for i in range(6)}

    store = Datastore.from_token_lists(DOCS)  # holds token 6
    with pytest.raises(DatastoreError) as e:
        check_compatible(store, tokenizer=Tok())
    msg = str(e.value)
    assert "token id 6" in msg and "'tiny-tok'" in msg and "6 tokens" in msg, msg
    with pytest.raises(DatastoreError) as e:
        check_compatible(store, vocab_size=6)
    msg = str(e.value)
    assert "token id 6" in msg and "6 entries" in msg, msg


@needs_proc
@pytest.mark.parametrize("how", ["load", "bigram"])
def test_largest_allowed_vocab_size_costs_what_the_file_holds(tmp_path, how):
    from treeopt.limits import MAX_VOCAB_SIZE

    path = _write(tmp_path / "v.npz", _meta(vocab_size=MAX_VOCAB_SIZE))
    lines, growth_kb = load_limited(path, tmp_path, how, extra_mb=300)
    assert lines == ["LOADED"], lines
    assert growth_kb < 30_000  # not 32 MB of offsets nor a 128 MB bigram table
