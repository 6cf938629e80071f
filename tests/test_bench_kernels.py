"""The kernel benchmark's variants (``python -m treeopt.bench.kernels``): what each
``--compare`` builds, so the measurement run by hand cannot rot."""

import pytest
import torch

from treeopt.bench.kernels import variants
from treeopt.models.cpu_kernels import PACK_ROWS, PackedLinear, available
from treeopt.testing import tiny_causal_lm

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN")


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "tiny"
    tiny_causal_lm("llama").save_pretrained(path)
    return str(path)


def layouts(model) -> set[int]:
    return {m.pack_rows for m in model.modules() if isinstance(m, PackedLinear)}


def test_packing_compares_the_one_row_layout_with_the_sixteen_row_one(folder):
    models = variants(folder, "packing")
    assert list(models) == ["packed for 1 row", "packed for 16 rows"] and PACK_ROWS == 1
    assert [layouts(m) for m in models.values()] == [{1}, {16}]
    ids = torch.randint(0, 96, (1, 12))
    with torch.inference_mode():
        one, sixteen = (m(input_ids=ids).logits for m in models.values())
    assert torch.allclose(one, sixteen, atol=1e-4)


def test_linear_compares_default_packed_and_measured_routing(folder):
    models = variants(folder, "linear")
    names = list(models)
    assert names[:2] == ["default", "onednn"] and names[2].startswith("onednn")
    assert layouts(models["default"]) == set() and layouts(models["onednn"]) == {PACK_ROWS}
