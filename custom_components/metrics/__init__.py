"""Stage 6, metrics: the competition score (``score``), the Betti-Matching-3D loader and tile counts
(``betti_matching``), the evaluate command line (``evaluate``)."""

from custom_components import lazy_submodules

__getattr__ = lazy_submodules(__name__)
