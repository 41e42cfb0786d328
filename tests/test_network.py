"""DynUNet planning from the patch size and the up-front patch check."""

import pytest
import torch

from custom_components.training.network import build_dynunet, check_patch_size, nearest_valid_patch, plan_dynunet


def test_plan_128_cube_has_five_downsamplings_to_4():
    plan = plan_dynunet([128, 128, 128])
    # 128 / 2^5 = 4 = min_feature_size: levels 1..5 stride 2
    assert plan["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert len(plan["kernel_size"]) == 6
    assert plan["upsample_kernel_size"] == plan["strides"][1:]


def test_plan_anisotropic_patch_stops_short_axis():
    plan = plan_dynunet([72, 136, 136])
    # 72/4 = 18 -> floor(log2 18) = 4 downsamplings on Z; 136/4 = 34 -> 5 on Y, X
    assert [s[0] for s in plan["strides"]] == [1, 2, 2, 2, 2, 1]
    assert [s[1] for s in plan["strides"]] == [1, 2, 2, 2, 2, 2]


def test_check_patch_names_patch_and_nearest_valid():
    strides = plan_dynunet([72, 136, 136])["strides"]
    # total stride (16, 32, 32): 136 is not a multiple of 32
    with pytest.raises(ValueError) as e:
        check_patch_size([72, 136, 136], strides)
    msg = str(e.value)
    assert "[72, 136, 136]" in msg and "[16, 32, 32]" in msg
    assert str(nearest_valid_patch([72, 136, 136], strides)) in msg
    assert nearest_valid_patch([72, 136, 136], strides) == [80, 128, 128]


def test_too_small_patch_rejected():
    with pytest.raises(ValueError, match="too small"):
        plan_dynunet([4, 6, 7])


def test_built_net_runs_on_valid_patch_and_has_deep_supervision():
    net = build_dynunet([32, 32, 32], filters=[4, 8, 16, 32], deep_supr_num=1)
    net.train()
    out = net(torch.zeros(1, 1, 32, 32, 32))
    assert out.shape == (1, 2, 1, 32, 32, 32)  # main head + 1 deep-supervision head, upsampled
    net.eval()
    assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)


def test_build_rejects_patch_before_forward():
    with pytest.raises(ValueError, match="Nearest valid patch_size"):
        build_dynunet([72, 136, 136], filters=[4, 8, 16, 32, 64, 64])


def test_filters_too_short():
    with pytest.raises(ValueError, match="filters"):
        build_dynunet([32, 32, 32], filters=[4, 8])


def test_seed_patch_fits_with_four_levels():
    # the earlier trainer's 72x136x136 patch: three downsamplings (total stride 8) divide it
    strides = plan_dynunet([72, 136, 136], max_levels=4)["strides"]
    assert check_patch_size([72, 136, 136], strides) == [72, 136, 136]
