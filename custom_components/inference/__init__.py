"""Stage 7, inference: sliding window and ensembles (``sliding_window``), post-processing
(``postprocess``), ``submission.zip`` (``submission``), report pictures (``report``)."""

from custom_components import lazy_submodules

__getattr__ = lazy_submodules(__name__)
