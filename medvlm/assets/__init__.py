"""Files bundled with medvlm (the demo chest X-ray, its attribution, the demo prompts)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_IMAGE = "nih_cxr14_00009745_000.png"


def asset_path(name: str) -> Path:
    """Path of a file bundled in ``medvlm/assets`` (``name``: its file name, e.g. ``DEMO_IMAGE``)."""
    return Path(str(resources.files("medvlm.assets").joinpath(name)))
