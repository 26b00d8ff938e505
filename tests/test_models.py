"""Hybrid encoder, classifier, TransUNet and MONAI baselines: shapes, sizes, norms and errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fedefm.errors import ConfigError
from fedefm.models.encoder import HybridEncoder, StdConv2d, group_count
from fedefm.models.presets import PRESETS, get_preset
from fedefm.models.segmenters import ARCHS, TransUNet, build_classifier, build_segmenter

# Measured with benchmarks/bench_params.py; a change here means the architecture changed.
PAPER_ENCODER_PARAMETERS = 44_394_688


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("preset_name", ["tiny", "small"])
@pytest.mark.parametrize("arch", ARCHS)
def test_segmenter_returns_logits_per_class_at_input_resolution(arch, preset_name):
    preset = get_preset(preset_name)
    model = build_segmenter(arch, preset, n_classes=3)
    x = torch.randn(1, 1, preset.image_size, preset.image_size)  # shape: (B, 1, H, W)
    with torch.no_grad():
        assert model(x).shape == (1, 3, preset.image_size, preset.image_size)


@pytest.mark.parametrize("preset_name", ["tiny", "small"])
def test_classifier_returns_one_logit_per_class_and_features_on_token_grid(preset_name):
    preset = get_preset(preset_name)
    model = build_classifier(preset, n_classes=6)
    x = torch.randn(1, 1, preset.image_size, preset.image_size)
    with torch.no_grad():
        assert model(x).shape == (1, 6)
        assert model.features(x).shape == (1, preset.hidden, preset.grid, preset.grid)


def test_paper_transunet_forward_at_batch_1_gives_256_px_logits():
    model = build_segmenter("transunet", get_preset("paper"))
    with torch.no_grad():
        assert model(torch.randn(1, 1, 256, 256)).shape == (1, 3, 256, 256)


def test_paper_encoder_parameter_count_is_pinned():
    assert count(HybridEncoder(get_preset("paper"))) == PAPER_ENCODER_PARAMETERS


def test_paper_preset_is_transunet_r50_vit_with_fedefm_edits():
    paper = get_preset("paper")
    assert (paper.stem_width, paper.block_units) == (64, (3, 4, 9))
    assert (paper.hidden, paper.mlp, paper.heads, paper.layers) == (768, 1024, 8, 8)
    assert (paper.image_size, paper.decoder_channels) == (256, (256, 128, 64, 16))
    encoder = HybridEncoder(paper)
    assert encoder.patch_embed.in_channels == 1024  # width 64 x 16 at stride 16
    assert encoder.position_embeddings.shape == (1, 256, 768)  # 16 x 16 tokens, no CLS token


def test_transformer_is_pre_norm_gelu_with_separate_attention_dropout():
    preset = dataclasses.replace(get_preset("tiny"), dropout=0.1, attention_dropout=0.25)
    transformer = HybridEncoder(preset).transformer
    assert len(transformer.layers) == preset.layers
    for layer in transformer.layers:
        assert layer.norm_first
        assert layer.activation is torch.nn.functional.gelu
        assert layer.self_attn.dropout == 0.25
        assert layer.dropout.p == 0.1
    assert isinstance(transformer.norm, nn.LayerNorm)


def test_classifier_pools_the_mean_of_all_tokens_not_token_0():
    model = build_classifier(get_preset("tiny"), 6).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        tokens = model.encoder(x).tokens
        torch.testing.assert_close(model(x), model.head(tokens.mean(dim=1)))
        assert not torch.allclose(model(x), model.head(tokens[:, 0]))


def test_tiny_encoder_returns_tokens_grid_and_skips_at_strides_8_4_2():
    tiny = get_preset("tiny")  # stem width 16
    tokens, grid, skips = HybridEncoder(tiny)(torch.randn(2, 1, 64, 64))
    assert tokens.shape == (2, 16, 96)  # (B, L = 4 x 4, D)
    assert grid == (4, 4)
    assert [s.shape for s in skips] == [(2, 128, 8, 8), (2, 64, 16, 16), (2, 16, 32, 32)]


@pytest.mark.parametrize("arch", ["transunet", "unet"])
def test_tiny_segmenters_accept_96_px_although_the_preset_is_128(arch):
    model = build_segmenter(arch, get_preset("tiny"))
    with torch.no_grad():
        assert model(torch.randn(1, 1, 96, 96)).shape == (1, 3, 96, 96)


def test_transunet_accepts_non_square_input():
    model = build_segmenter("transunet", get_preset("tiny"))
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 112)).shape == (1, 3, 64, 112)


@pytest.mark.parametrize("side", [72, 100, 8])
def test_input_side_not_a_multiple_of_16_is_refused(side):
    encoder = HybridEncoder(get_preset("tiny"))
    with pytest.raises(ConfigError, match=f"{side}x{side}.*multiples of 16"):
        encoder(torch.randn(1, 1, side, side))


def test_rgb_input_to_a_grey_preset_is_refused():
    with pytest.raises(ConfigError, match="3 channels"):
        HybridEncoder(get_preset("tiny"))(torch.randn(1, 3, 64, 64))


def test_position_embeddings_at_the_preset_grid_are_the_parameter_itself():
    encoder = HybridEncoder(get_preset("tiny"))
    assert encoder.position_grid((8, 8)) is encoder.position_embeddings


def test_position_embeddings_interpolate_bilinearly_to_a_larger_grid():
    preset = dataclasses.replace(get_preset("tiny"), name="grid2", image_size=32)  # 2 x 2 token grid
    encoder = HybridEncoder(preset)
    with torch.no_grad():
        # 2 x 2 grid holding 0 1 / 2 3 in every channel: value = 2 * row + col
        encoder.position_embeddings.copy_(torch.tensor([0.0, 1, 2, 3])[None, :, None].expand(1, 4, preset.hidden))
        resized = encoder.position_grid((4, 4))
    # Pixel centres of a 4-grid sit at -0.25, 0.25, 0.75, 1.25 on the 2-grid, clamped to [0, 1].
    coordinate = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = (2 * coordinate[:, None] + coordinate[None, :]).reshape(16)
    assert resized.shape == (1, 16, preset.hidden)
    torch.testing.assert_close(resized[0, :, 0], expected)
    torch.testing.assert_close(resized[0, :, -1], expected)


def test_token_map_places_token_i_w_plus_j_at_row_i_column_j():
    encoder = HybridEncoder(get_preset("tiny")).eval()
    x = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        tokens, (h, w), _ = encoder(x)
        dense = encoder.token_map(x)
    assert dense.shape == (1, 96, 4, 6)
    torch.testing.assert_close(dense[0, :, 2, 5], tokens[0, 2 * w + 5])
    torch.testing.assert_close(dense[0, :, 3, 0], tokens[0, 3 * w + 0])


@pytest.mark.parametrize("arch", ["classifier", *ARCHS])
def test_no_model_contains_batchnorm(arch):
    tiny = get_preset("tiny")
    model = build_classifier(tiny, 6) if arch == "classifier" else build_segmenter(arch, tiny)
    batchnorms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert batchnorms == []


def test_classifier_and_transunet_encoders_have_identical_tensor_names_and_shapes():
    tiny = get_preset("tiny")
    classifier, segmenter = build_classifier(tiny, 6), build_segmenter("transunet", tiny)
    shapes = lambda model: {k: v.shape for k, v in model.state_dict().items() if k.startswith("encoder.")}  # noqa: E731
    assert shapes(classifier) == shapes(segmenter)


def test_every_transunet_parameter_receives_a_gradient():
    model = build_segmenter("transunet", get_preset("tiny"))
    model(torch.randn(2, 1, 32, 32)).mean().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_n_skip_0_decoder_concatenates_no_cnn_features():
    tiny = get_preset("tiny")
    model = TransUNet(tiny, n_skip=0)
    first_conv = model.decoder.blocks[0].conv1[0]
    assert first_conv.in_channels == tiny.decoder_head_channels  # 128, no + 128 from the stride-8 skip
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_n_skip_3_decoder_concatenates_stride_8_4_2_features_and_the_full_resolution_stem():
    tiny = get_preset("tiny")  # width 16: skips of 128, 64, 16 channels; the stride-1 stem gives 8
    model = TransUNet(tiny, n_skip=3)
    assert [block.conv1[0].in_channels for block in model.decoder.blocks] == [128 + 128, 64 + 64, 32 + 16, 16 + 8]
    plain = TransUNet(tiny, n_skip=3, full_resolution=False)
    assert plain.decoder.blocks[-1].conv1[0].in_channels == 16 and plain.decoder.full_resolution is None


@pytest.mark.parametrize("shape", [(80, 112), (112, 80), (48, 48)])  # token grids 5x7, 7x5, 3x3
def test_full_resolution_path_runs_forward_and_backward_at_odd_grid_sizes(shape):
    model = build_segmenter("transunet", get_preset("tiny"))
    logits = model(torch.randn(2, 1, *shape))
    assert logits.shape == (2, 3, *shape)
    logits.mean().backward()
    stem = model.decoder.full_resolution
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters())


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_residual_encoder_unet_runs_forward_and_backward_at_odd_sizes(shape):
    model = build_segmenter("resunet", get_preset("tiny"))
    logits = model(torch.randn(2, 1, *shape))
    assert logits.shape == (2, 3, *shape)
    logits.mean().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_n_skip_above_3_is_refused():
    with pytest.raises(ConfigError, match="--n-skip 4"):
        TransUNet(get_preset("tiny"), n_skip=4)


@pytest.mark.parametrize(("channels", "groups"), [(64, 32), (16, 16), (8, 8), (48, 24), (96, 32), (40, 20), (1, 1)])
def test_group_count_is_the_largest_divisor_up_to_32(channels, groups):
    assert group_count(channels) == groups


def test_weight_standardised_conv_ignores_weight_scale_and_offset():
    conv = StdConv2d(2, 3, kernel_size=3, padding=1, bias=False)
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        conv.weight.normal_()  # unit variance, so the 1e-5 guard in the standardisation is negligible
        before = conv(x)
        conv.weight.mul_(5.0).add_(2.0)
        torch.testing.assert_close(conv(x), before, rtol=1e-4, atol=1e-4)


def test_unknown_preset_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"--preset tinny: did you mean 'tiny'\? Known: tiny, small, paper"):
        get_preset("tinny")


def test_unknown_arch_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"--arch unett: did you mean 'unet'\?"):
        build_segmenter("unett", get_preset("tiny"))


def test_preset_with_heads_not_dividing_hidden_is_refused():
    with pytest.raises(ConfigError, match="heads 5 does not divide hidden 96"):
        dataclasses.replace(PRESETS["tiny"], heads=5)

