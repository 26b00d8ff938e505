"""Position classification from where the device is: tip locator, tip pooling, the tip model's runs and predictions."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fedefm.data.synth.domains import render_position
from fedefm.errors import DataError, WeightsError
from fedefm.errors import ConfigError
from fedefm.finetune import classify
from fedefm.finetune.config import FinetuneConfig
from fedefm.finetune.predict import classify_images
from fedefm.models.heads import Classifier
from fedefm.models.position import (
    MaskPositionClassifier,
    PositionClassifier,
    locate_tip,
    locate_tips,
    pool_at,
    shape_encoder,
)
from fedefm.models.presets import get_preset
from fedefm.models.segmenters import TransUNet
from fedefm.models.weights import load_weights, model_metadata, save_weights

SIZE = 32


def quick_config(data, out, **changes):
    settings = dict(task="classify", pooling="tip", shots=3, epochs=1, batch_size=4, samples_per_epoch=8,
                    warmup_steps=1, image_size=SIZE, seed=0)
    return FinetuneConfig(data=data, out=out, **(settings | changes))


@pytest.mark.parametrize("cls", ["aortic_arch", "descending_aorta", "supra_aortic"])
def test_tip_locator_finds_the_end_of_a_synthetic_catheter_within_2_px(cls):
    for seed in range(4):
        _, mask, info = render_position(cls, 64, np.random.default_rng(seed))
        row, col = locate_tip(mask == 1)
        true_row, true_col = info["catheter"]["tip"]
        assert np.hypot(row - true_row, col - true_col) <= 2, (cls, seed, (row, col), info["catheter"]["tip"])


def test_tip_locator_takes_the_far_end_of_a_curve_not_the_entry():
    mask = np.zeros((40, 40), bool)
    mask[10:40, 20] = True  # enters at the bottom border, runs up ...
    mask[10, 20:31] = True  # ... and bends right
    assert locate_tip(mask) == (10.0, 30.0)
    assert locate_tip(np.zeros((8, 8), bool)) is None


def test_tips_and_pooled_features_move_with_the_catheter():
    mask = np.zeros((64, 64), np.float32)
    mask[30:64, 20] = 1.0
    mask[30, 20:36] = 1.0
    shifted = np.roll(mask, (-6, 9), axis=(0, 1))
    tips = locate_tips(torch.from_numpy(np.stack([mask, shifted])))
    assert tips.tolist() == [[30.0, 35.0], [24.0, 44.0]]
    features = torch.randn(1, 5, 64, 64)
    moved = torch.roll(features, (-6, 9), dims=(2, 3))
    here = pool_at(features, tips[:1], (64, 64), radius=3)
    there = pool_at(moved, tips[1:], (64, 64), radius=3)
    assert torch.allclose(here, there, atol=1e-6)
    assert not torch.allclose(here, pool_at(features, tips[1:], (64, 64), radius=3))


def test_no_catheter_falls_back_to_the_most_probable_pixel():
    probability = torch.full((1, 16, 16), 0.1)
    probability[0, 3, 11] = 0.4
    assert locate_tips(probability).tolist() == [[3.0, 11.0]]


def test_mean_pooling_builds_the_unchanged_baseline(positions, tmp_path):
    model, _ = classify.build_model(quick_config(positions, tmp_path / "run", pooling="mean"), 4)
    assert type(model) is Classifier and model.arch == "classifier"
    assert set(model.state_dict()) == set(Classifier(get_preset("tiny"), 4).state_dict())


def test_tip_model_takes_a_fine_tuned_segmenter_whole(positions, tmp_path):
    torch.manual_seed(5)
    segmenter = TransUNet(get_preset("tiny"))
    path = tmp_path / "segmenter.safetensors"
    save_weights(path, segmenter, model_metadata(segmenter) | {"classes": ["background", "catheter", "guidewire"]})
    model, transfer = classify.build_model(quick_config(positions, tmp_path / "run", init=str(path)), 4)
    assert isinstance(model, PositionClassifier) and transfer.parts == "all"
    state = segmenter.state_dict()
    for key in ("decoder.conv_more.0.weight", "segmentation_head.weight", "encoder.blocks.0.attn.qkv.weight"):
        if key in state:
            assert torch.equal(model.state_dict()[key], state[key])
    assert all(key.startswith("head.") for key in transfer.new)


def test_a_segmenter_of_another_preset_is_refused(positions, tmp_path):
    segmenter = TransUNet(get_preset("small"))
    path = tmp_path / "small.safetensors"
    save_weights(path, segmenter, model_metadata(segmenter))
    with pytest.raises(WeightsError, match="preset 'small' but the model is preset 'tiny'"):
        classify.run(quick_config(positions, tmp_path / "run", init=str(path)), progress=False)


@pytest.mark.parametrize("layout", ["class folders", "split folders"])
def test_a_class_of_one_image_is_refused(tmp_path, layout):
    root = tmp_path / "data"
    folders = ({"arch": 6, "branch": 1} if layout == "class folders"
               else {"train/arch": 4, "train/branch": 1, "val/arch": 2, "test/arch": 2})
    for name, count in folders.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            Image.fromarray(np.full((SIZE, SIZE), 40 * k, np.uint8)).save(root / name / f"{k}.png")
    with pytest.raises(DataError, match="class 'branch' (has only 1 image|holds a single image)"):
        classify.run(quick_config(root, tmp_path / "run", pooling="mean", shots=None), progress=False)


def segmenter_weights(tmp_path, preset="tiny"):
    """A TransUNet's weights file with the catheter classes, as `finetune --task segment` writes (random weights)."""
    torch.manual_seed(5)
    segmenter = TransUNet(get_preset(preset))
    path = tmp_path / f"segmenter_{preset}.safetensors"
    save_weights(path, segmenter, model_metadata(segmenter) | {"classes": ["background", "catheter", "guidewire"]})
    return path


@pytest.mark.parametrize(("pooling", "arch"), [("tip", "position"), ("mask", "position_mask")])
def test_position_model_trains_and_predict_shows_where_it_looked(positions, tmp_path, pooling, arch):
    out = tmp_path / "run"
    result = classify.run(quick_config(positions, out, pooling=pooling, init=str(segmenter_weights(tmp_path))),
                          progress=False)
    assert result["best_epoch"] == 1
    assert load_weights(out / "model.safetensors")[1]["arch"] == arch
    images = sorted((positions / "looped").glob("*.png"))[:2]
    rows, _ = classify_images(out, images, tmp_path / "pred")
    for row, image in zip(rows, images):
        assert len(row["tip"]) == 2 and all(0 <= v < SIZE for v in row["tip"])
        overlay = np.asarray(Image.open(tmp_path / "pred" / f"{image.stem}_overlay.png"))
        assert overlay.shape == (SIZE, SIZE, 3)
        assert (overlay == (255, 0, 255)).all(-1).any()  # the tip's cross
    written = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert [row["tip"] for row in written] == [row["tip"] for row in rows]


@pytest.mark.parametrize("size", [(33, 47), (64, 96)])
def test_shape_encoder_keeps_a_4_by_4_map_at_odd_sizes_and_passes_gradients(size):
    encoder = shape_encoder(width=8)
    maps = torch.rand(2, 1, *size, requires_grad=True)
    features = encoder(maps)  # (2, 8 * 16)
    assert features.shape == (2, 8 * 16)
    features.sum().backward()
    assert maps.grad.abs().sum() > 0 and all(p.grad is not None for p in encoder.parameters())


def test_shape_encoder_output_moves_with_the_catheter():
    mask = torch.zeros(1, 1, 64, 64)
    mask[0, 0, 8:60, 10] = 1.0
    moved = torch.roll(mask, 32, dims=3)  # the same catheter, half the image to the right
    torch.manual_seed(0)
    encoder = shape_encoder(width=8).eval()
    empty = encoder(torch.zeros_like(mask))
    # how much each column of the 4 x 4 grid responds to the catheter: features (1, 8 * 16) as (channel, row, col)
    here, there = ((encoder(m) - empty).reshape(8, 4, 4).abs().sum(dim=(0, 1)) for m in (mask, moved))
    assert int(here.argmax()) == 0 and int(there.argmax()) == 2


def test_mask_model_holds_its_segmenter_and_learns_only_the_shape_head(tmp_path):
    model = MaskPositionClassifier(get_preset("tiny"), n_classes=4, width=8)
    model.load_state_dict(TransUNet(get_preset("tiny")).state_dict(), strict=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    assert not model.encoder.training and not model.decoder.training and model.shape_encoder.training
    logits = model(torch.rand(2, 1, 64, 96))  # (2, 4); a non-square image, both sides multiples of 32
    assert logits.shape == (2, 4)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(after[key], value)
        assert changed == key.startswith(("shape_encoder.", "head.")), key
    seen = model(torch.rand(1, 1, 64, 64), parts=("logits", "tip", "catheter"))
    assert seen["catheter"].shape == (1, 64, 64) and seen["tip"].shape == (1, 2)


def test_mask_model_needs_a_trained_segmentation_head(positions, tmp_path):
    with pytest.raises(ConfigError, match="--pooling mask --init scratch: classifies the catheter a segmenter"):
        classify.run(quick_config(positions, tmp_path / "a", pooling="mask"), progress=False)
    assert not (tmp_path / "a").exists()  # refused before the run folder is claimed
    classifier = Classifier(get_preset("tiny"), 4)
    path = tmp_path / "foundation.safetensors"
    save_weights(path, classifier, model_metadata(classifier) | {"classes": ["a", "b", "c", "d"]})
    with pytest.raises(ConfigError, match="foundation.safetensors: gives no trained segmentation head"):
        classify.build_model(quick_config(positions, tmp_path / "b", pooling="mask", init=str(path)), 4)


def test_mask_model_refuses_a_segmenter_of_another_preset(positions, tmp_path):
    path = segmenter_weights(tmp_path, "small")
    with pytest.raises(WeightsError, match="preset 'small' but the model is preset 'tiny'"):
        classify.build_model(quick_config(positions, tmp_path / "run", pooling="mask", init=str(path)), 4)
