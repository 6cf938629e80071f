import os

import pytest

# Tiny models gain nothing from intra-op threads and lose a lot to contention on a shared
# 2-core machine; one thread keeps the suite fast and its timing steady.
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TREEOPT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: real weights or minutes of CPU; set TREEOPT_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

# `--dtype auto` measures which dtype is faster for a model on this machine (treeopt.models.
# dtype); tests pin it to float32 so that their models load as they always did. The tests
# of that choice set the variable themselves.
os.environ.setdefault("TREEOPT_AUTO_DTYPE", "float32")
