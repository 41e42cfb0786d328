"""Stage 7, inference: the networks checkpoints describe and the sliding window (``sliding_window``), logit
ensembles and TTA (``ensemble``), post-processing (``postprocess``) and its tuner (``tune_postprocess``),
``submission.zip`` (``submission``), report pictures (``report``); whole scrolls: Zarr in and out
(``zarr_io``), the whole volume's window grid (``window_grid``), per-block post-processing
(``block_postprocess``), the Dask driver (``predict_zarr``)."""

from custom_components import lazy_submodules

__getattr__ = lazy_submodules(__name__)
