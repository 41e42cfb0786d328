"""Python the bundle's configs name by ``_target_``: only what MONAI lacks (see docs/CONVENTIONS.md)."""

from pathlib import Path

__version__ = "0.1.0"


def bundle_root() -> str:
    """The ``bundle/`` folder of this checkout (the package is installed editable), from any directory."""
    return str(Path(__file__).resolve().parent.parent / "bundle")
