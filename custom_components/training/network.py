"""The networks the bundle builds, each recorded as a spec that checkpoints carry; DynUNet's topology
derived from the patch size, nnU-Net style, with an up-front patch check.

``build_network(kind, **settings)`` builds a network of ``NETWORK_BUILDERS[kind]`` and attaches
``network_spec = {"kind": kind, **settings}`` to it (plain JSON values). The checkpoint saver writes that
spec into every checkpoint and into ``models/model.pt``; inference, evaluation and export rebuild the
network from it (``network_from_spec``), so a network trained with other ``filters`` or ``patch_size``
needs no flag repeated after training.

MONAI's ``DynUNet`` takes explicit ``kernel_size`` and ``strides`` lists and does not check that a patch
fits them: a patch that is not divisible by the total stride fails deep inside ``forward`` with a
concatenation error. ``plan_dynunet`` derives the lists from the patch (as nnU-Net's planner does:
halve an axis while it stays >= ``min_feature_size``, at most ``max_levels`` - 1 times), and
``check_patch_size`` refuses a patch that the plan cannot take, naming the nearest valid patch.

``build_resenc`` builds nnU-Net's residual-encoder U-Net (``ResidualEncoderUNet`` of
``dynamic-network-architectures`` 0.4.4, installed with ``--no-deps``: its metadata pulls timm, torchvision and
another torch; ``architectures/unet.py`` imports only torch and numpy) on the same plan, as ``ResEncUNet``: in
training it returns the main head and ``deep_supr_num`` deep-supervision heads as a list at falling resolution
(full, 1/2, 1/4, ...), in eval mode the main head alone as a tensor (inference, ``ckpt_export --use_trace``,
``onnx_export``, ``verify_net_in_out``), like MONAI's ``DynUNet``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet

__all__ = ["plan_dynunet", "check_patch_size", "nearest_valid_patch", "build_dynunet", "build_resenc", "resenc_class",
           "build_network", "network_spec_of", "spec_differences", "NETWORK_BUILDERS", "RESENC_BLOCKS"]


def _levels_per_axis(patch_size: Sequence[int], min_feature_size: int, max_levels: int) -> list[int]:
    """Number of stride-2 downsamplings per axis: floor(log2(size / min_feature_size)), capped."""
    return [max(0, min(max_levels - 1, int(math.floor(math.log2(max(s, 1) / min_feature_size))))) for s in patch_size]


def plan_dynunet(patch_size: Sequence[int], min_feature_size: int = 4, max_levels: int = 6) -> dict:
    """Kernel sizes and strides for a 3D DynUNet at ``patch_size``.

    Returns ``{"kernel_size": [...], "strides": [...], "upsample_kernel_size": [...]}``: level 0 has
    stride 1; level i > 0 has stride 2 on each axis that still has downsamplings left, else 1.
    Kernels are 3 on every axis (nnU-Net uses 1 on axes much coarser than the others; our volumes are
    isotropic).
    """
    patch_size = [int(s) for s in patch_size]
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"patch_size must be 3 positive ints (Z, Y, X), got {patch_size}.")
    per_axis = _levels_per_axis(patch_size, min_feature_size, max_levels)
    n_down = max(per_axis)
    if n_down < 1:
        raise ValueError(
            f"patch_size {patch_size} is too small for a U-Net: each axis needs >= {2 * min_feature_size} voxels "
            f"for one downsampling (min_feature_size={min_feature_size})."
        )
    strides = [[1, 1, 1]] + [[2 if level <= per_axis[a] else 1 for a in range(3)] for level in range(1, n_down + 1)]
    kernels = [[3, 3, 3] for _ in strides]
    return {"kernel_size": kernels, "strides": strides, "upsample_kernel_size": strides[1:]}


def _total_stride(strides: Sequence[Sequence[int]]) -> list[int]:
    return [math.prod(int(s[a]) for s in strides) for a in range(3)]


def nearest_valid_patch(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[int]:
    """The patch closest to ``patch_size`` whose every axis is a multiple of the total stride."""
    total = _total_stride(strides)
    return [max(t, int(math.floor(s / t + 0.5)) * t) for s, t in zip(patch_size, total)]


def check_patch_size(patch_size: Sequence[int], strides: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Raise ``ValueError`` naming the patch and the nearest valid one if the network cannot take it.

    With ``strides=None`` the plan of ``plan_dynunet(patch_size)`` is used. Returns the patch as a list.
    """
    patch_size = [int(s) for s in patch_size]
    if strides is None:
        strides = plan_dynunet(patch_size)["strides"]
    total = _total_stride(strides)
    if any(s % t for s, t in zip(patch_size, total)):
        raise ValueError(
            f"patch_size {patch_size} cannot be taken by the network: every axis must be a multiple of the "
            f"total stride {total}. Nearest valid patch_size: {nearest_valid_patch(patch_size, strides)}."
        )
    return patch_size


def build_dynunet(
    patch_size: Sequence[int],
    filters: Sequence[int] = (32, 64, 128, 256, 320, 320),
    in_channels: int = 1,
    out_channels: int = 1,
    deep_supervision: bool = True,
    deep_supr_num: int = 2,
    res_block: bool = True,
    norm_name: str | tuple = "instance",
    min_feature_size: int = 4,
    max_levels: int = 6,
) -> DynUNet:
    """A MONAI ``DynUNet`` planned for ``patch_size`` (checked first); ``filters`` truncated to the depth.

    ``deep_supr_num`` is capped at depth - 2, as DynUNet requires.
    """
    plan = plan_dynunet(patch_size, min_feature_size, max_levels)
    check_patch_size(patch_size, plan["strides"])
    depth = len(plan["strides"])
    if len(filters) < depth:
        raise ValueError(f"filters {list(filters)} has {len(filters)} entries; patch_size {list(patch_size)} needs {depth}.")
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=plan["kernel_size"],
        strides=plan["strides"],
        upsample_kernel_size=plan["upsample_kernel_size"],
        filters=list(filters)[:depth],
        norm_name=norm_name,
        deep_supervision=deep_supervision,
        deep_supr_num=max(1, min(deep_supr_num, depth - 2)),
        res_block=res_block,
    )


#: residual blocks per encoder stage of nnU-Net's ResEnc presets M and L (``nnUNetPlannerResEncM`` / ``...L``;
#: the presets share the blocks and differ in the GPU memory they plan patch and batch for)
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6)

#: the version ``ResEncUNet.forward`` was written against (it walks the decoder's ``transpconvs``, ``stages``
#: and ``seg_layers`` as ``UNetDecoder.forward`` of that version does)
RESENC_PACKAGE = "dynamic-network-architectures==0.4.4"


@functools.lru_cache(maxsize=None)
def resenc_class():
    """``ResEncUNet``, a subclass of nnU-Net's ``ResidualEncoderUNet`` (imported here, on first use, so that the
    bundle runs without the package as long as no ResEnc is built).

    ``ResidualEncoderUNet`` returns every deep-supervision head in training and evaluation alike (its decoder's
    ``deep_supervision`` flag). ``ResEncUNet`` returns ``[main, 1/2, ..., 1/2**k]`` resolution heads, k =
    ``deep_supr_num``, in training mode with ``deep_supervision`` on, and the main head alone, a (B, C, *S) tensor,
    otherwise; a head it never returns is not computed, and its 1x1 convolution is not built (no parameter
    without a gradient, which DDP would refuse), so its state dict lacks those ``decoder.seg_layers.<i>`` entries.
    """
    try:
        from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    except ImportError as e:
        raise ImportError(
            f"network kind 'resenc' needs nnU-Net's dynamic-network-architectures: pip install --no-deps {RESENC_PACKAGE} "
            "(`make venv` does; without --no-deps its metadata pulls timm, torchvision and another torch)."
        ) from e

    class ResEncUNet(ResidualEncoderUNet):
        """nnU-Net's ``ResidualEncoderUNet`` with a list of ``deep_supr_num + 1`` heads in training only."""

        def __init__(self, *args, deep_supervision: bool = True, deep_supr_num: int = 3, **kwargs):
            super().__init__(*args, deep_supervision=deep_supervision, **kwargs)
            n = len(self.decoder.stages)
            self.deep_supr_num = int(deep_supr_num) if deep_supervision else 0
            if not 0 <= self.deep_supr_num <= n - 1:
                raise ValueError(f"deep_supr_num {deep_supr_num} must be in 0..{n - 1} for {n + 1} stages.")
            for s in range(n - 1 - self.deep_supr_num):  # heads never returned: no parameters
                self.decoder.seg_layers[s] = torch.nn.Identity()

        def forward(self, x: torch.Tensor):
            skips = self.encoder(x)
            dec = self.decoder
            n = len(dec.stages)
            k = self.deep_supr_num if self.training else 0
            heads, low = [], skips[-1]
            for s in range(n):  # UNetDecoder.forward of 0.4.4, computing only the heads returned
                y = dec.stages[s](torch.cat((dec.transpconvs[s](low), skips[-(s + 2)]), 1))
                if s >= n - 1 - k:
                    heads.append(dec.seg_layers[s](y))
                low = y
            return heads[::-1] if k else heads[-1]

    ResEncUNet.__module__, ResEncUNet.__qualname__ = __name__, "ResEncUNet"  # the name __getattr__ resolves
    return ResEncUNet


def __getattr__(name: str):
    """``custom_components.training.network.ResEncUNet`` resolves to ``resenc_class()`` (PEP 562)."""
    if name == "ResEncUNet":
        return resenc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_resenc(
    patch_size: Sequence[int],
    filters: Sequence[int] = (32, 64, 128, 256, 320, 320),
    blocks_per_stage: Sequence[int] = RESENC_BLOCKS,
    decoder_convs: int = 1,
    in_channels: int = 1,
    out_channels: int = 1,
    deep_supervision: bool = True,
    deep_supr_num: int = 3,
    min_feature_size: int = 4,
    max_levels: int = 6,
):
    """nnU-Net's residual-encoder U-Net (ResEnc M / L blocks) planned for ``patch_size`` as ``plan_dynunet``
    plans DynUNet (checked first), nnU-Net's settings otherwise: 3^3 kernels, instance norm (eps 1e-5, affine),
    leaky ReLU, conv bias, ``decoder_convs`` convolutions per decoder stage, He initialisation with the last norm
    of each residual block at 0 (``ResidualEncoderUNet.initialize``, as nnU-Net's trainer applies it).

    ``filters`` (nnU-Net's ``features_per_stage``) and ``blocks_per_stage`` are truncated to the depth;
    ``deep_supr_num`` extra heads are returned in training (capped at depth - 2, as DynUNet's).
    At patch 128^3 this is the ``3d_fullres`` network of nnU-Net's ``nnUNetResEncUNetMPlans`` for the Kaggle
    volumes: 6 stages, strides 1, 2, 2, 2, 2, 2, features 32-320, blocks 1, 3, 4, 6, 6, 6, one decoder convolution.
    """
    plan = plan_dynunet(patch_size, min_feature_size, max_levels)
    check_patch_size(patch_size, plan["strides"])
    depth = len(plan["strides"])
    for name, values in (("filters", filters), ("blocks_per_stage", blocks_per_stage)):
        if len(values) < depth:
            raise ValueError(f"{name} {list(values)} has {len(values)} entries; patch_size {list(patch_size)} needs {depth}.")
    if depth < 2:
        raise ValueError(f"patch_size {list(patch_size)} plans {depth} stage; a U-Net needs 2 or more.")
    net = resenc_class()(
        in_channels, depth, [int(f) for f in filters[:depth]], torch.nn.Conv3d, plan["kernel_size"], plan["strides"],
        [int(b) for b in blocks_per_stage[:depth]], out_channels, [int(decoder_convs)] * (depth - 1),
        conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=deep_supervision, deep_supr_num=max(1, min(int(deep_supr_num), depth - 2)) if depth > 2 else 0,
    )
    net.apply(net.initialize)
    return net


#: the networks a spec's ``kind`` can name; each takes its settings as keyword arguments
NETWORK_BUILDERS = {"dynunet": build_dynunet, "resenc": build_resenc}


def _plain(value):
    """JSON-able copy of a setting (tuples to lists), so that a spec survives ``weights_only`` loading."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def build_network(kind: str = "dynunet", **settings):
    """``NETWORK_BUILDERS[kind](**settings)`` with ``network_spec = {"kind": kind, **settings}`` attached."""
    if kind not in NETWORK_BUILDERS:
        raise ValueError(f"network kind '{kind}' is unknown; known kinds: {sorted(NETWORK_BUILDERS)}.")
    net = NETWORK_BUILDERS[kind](**settings)
    net.network_spec = {"kind": kind, **{k: _plain(v) for k, v in settings.items()}}
    return net


def network_spec_of(network) -> dict | None:
    """The spec ``build_network`` attached (through a DDP wrapper), or None for a network built otherwise."""
    spec = getattr(getattr(network, "module", network), "network_spec", None)
    return dict(spec) if spec is not None else None


def spec_differences(a: dict, b: dict) -> list[str]:
    """``"name: A vs B"`` for every setting two specs give differently (a setting one of them lacks counts)."""
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if _plain(a.get(k)) != _plain(b.get(k))]
