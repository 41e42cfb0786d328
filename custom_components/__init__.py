"""Python the bundle's configs name by ``_target_``: only what MONAI lacks (see docs/CONVENTIONS.md)."""

from pathlib import Path

__version__ = "0.1.0"


def bundle_root() -> str:
    """The ``bundle/`` folder of this checkout (the package is installed editable), from any directory."""
    return str(Path(__file__).resolve().parent.parent / "bundle")


def __getattr__(name: str):
    """Import submodules on first use, so configs need only ``$import custom_components``."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise
