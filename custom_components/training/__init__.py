"""Stage 3-4, training: network builders (``network``), device augmentation (``augment``), the
trainer (``trainer``), handlers (``handlers``), atomic checkpoints and resume (``checkpoint``), preflight
checks (``workflow``), batch and loader tuning (``autotune``)."""

from custom_components import lazy_submodules

__getattr__ = lazy_submodules(__name__)
