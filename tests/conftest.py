import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TREEOPT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: real weights or minutes of CPU; set TREEOPT_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
