"""Python the bundle's configs name by ``_target_``: only what MONAI lacks, one package per stage.

``data`` (TIFF I/O, synthetic scrolls, input checks, datalists, the prepared cache, label-derived
targets, host patch sampling) -> ``training`` (network, device augmentation, trainer, handlers,
checkpoints, preflight, autotune) -> ``losses`` (one module per term and their composite) ->
``metrics`` (the competition score, Betti matching, the evaluate CLI) -> ``inference`` (sliding window
and ensembles, post-processing, submission, report pictures). ``atomic`` holds the atomic file writes
every stage uses.
"""

import importlib
from pathlib import Path

__version__ = "0.1.0"


def bundle_root() -> str:
    """The ``bundle/`` folder of this checkout (the package is installed editable), from any directory."""
    return str(Path(__file__).resolve().parent.parent / "bundle")


def lazy_submodules(package: str):
    """A module ``__getattr__`` that imports ``package.<name>`` on first use.

    Configs then need only ``$import custom_components`` to reach
    ``custom_components.data.prepare.prepare_cache``, and a light command (the metric CLI) never pays
    for the imports of a stage it does not use.
    """

    def __getattr__(name: str):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{package}.{name}":
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
            raise

    return __getattr__


__getattr__ = lazy_submodules(__name__)
