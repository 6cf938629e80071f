"""Acceptance and latency profiles of a draft/target pair on given hardware.

``treeopt.profile`` re-exports the Profile type (``model.py``); the measuring code lives in
``acceptance.py``, ``latency.py``, ``quality.py`` (draft quality: TV, KL, alpha per
position) and ``calibration.py`` (acceptance by draft confidence, for dynamic trees) and is
imported only where it is used.
"""

from treeopt.profile.model import (
    Latency,
    LatencyCurve,
    Profile,
    ProfileError,
    wilson_interval,
)

__all__ = ["Latency", "LatencyCurve", "Profile", "ProfileError", "wilson_interval"]
