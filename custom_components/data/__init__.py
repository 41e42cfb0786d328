"""Stage 1-2, data: TIFF I/O (``io``), synthetic scrolls (``synthetic``), input checks
(``validate_data``), datalists (``datalist``), nnU-Net conversion (``convert_nnunet``), the prepared cache
(``prepare``) of label-derived targets (``targets``), host patch sampling (``patch_dataset``)."""

from custom_components import lazy_submodules

__getattr__ = lazy_submodules(__name__)
