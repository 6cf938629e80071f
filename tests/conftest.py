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


def _private_cache() -> None:
    """Tests write tune results, dtype choices and latency curves; they must not land in the
    user's cache (``treeopt.models.cache``), where a real ``--draft auto`` would read them.
    The session gets its own cache folder; the read-mostly model artifacts of the user's
    cache (converted GGUF weights, fetched models, their downloads) are linked into it, so
    real-weight tests do not convert again."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from treeopt.models.cache import cache_dir

    if os.environ.get("TREEOPT_CACHE"):
        return
    real = cache_dir()
    private = Path(tempfile.mkdtemp(prefix="treeopt-test-cache-"))
    for sub in ("gguf", "models", "downloads"):
        if (real / sub).is_dir():
            (private / sub).symlink_to(real / sub, target_is_directory=True)
    os.environ["TREEOPT_CACHE"] = str(private)
    atexit.register(shutil.rmtree, private, True)  # links are removed, never followed


_private_cache()
