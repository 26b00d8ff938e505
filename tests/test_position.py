"""Position classification from where the device is: tip locator, tip pooling, the catheter's traced course, the
position models' runs and predictions."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fedefm.data.synth.domains import render_position
from fedefm.errors import ConfigError, DataError, WeightsError
from fedefm.finetune import classify
from fedefm.finetune.config import FinetuneConfig
from fedefm.finetune.predict import classify_images, mark
from fedefm.models.heads import Classifier
from fedefm.models.position import (
    PATH_FEATURES,
    PATH_POINTS,
    POSITION_MODELS,
    PathPositionClassifier,
    PositionClassifier,
    catheter_path,
    course_head,
    locate_tip,
    locate_tips,
    path_features,
    pool_at,
    read_course,
    shape_encoder,
)
from fedefm.models.presets import get_preset
from fedefm.models.segmenters import TransUNet, build_segmenter
from fedefm.models.weights import build_from_weights, load_weights, model_metadata, save_weights

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


def segmenter_weights(tmp_path, preset="tiny", arch="transunet"):
    """A segmenter's weights file with the catheter classes, as `finetune --task segment` writes (random weights)."""
    torch.manual_seed(5)
    segmenter = build_segmenter(arch, get_preset(preset))
    path = tmp_path / f"segmenter_{arch}_{preset}.safetensors"
    save_weights(path, segmenter, model_metadata(segmenter) | {"classes": ["background", "catheter", "guidewire"],
                                                               "image_size": SIZE})
    return path


@pytest.mark.parametrize(("pooling", "arch", "segmenter"), [("tip", "position", "transunet"),
                                                            ("mask", "position_mask", "transunet"),
                                                            ("path", "position_path", "transunet"),
                                                            ("path", "position_path", "unet")])
def test_position_model_trains_and_predict_shows_where_it_looked(positions, tmp_path, pooling, arch, segmenter):
    out = tmp_path / "run"
    init = segmenter_weights(tmp_path, arch=segmenter)
    result = classify.run(quick_config(positions, out, pooling=pooling, init=str(init)), progress=False)
    assert result["best_epoch"] == 1
    metadata = load_weights(out / "model.safetensors")[1]
    assert metadata["arch"] == arch and metadata.get("segmenter_arch") == (segmenter if pooling != "tip" else None)
    if pooling != "tip":  # the held segmenter is the file's, tensor for tensor
        held = build_from_weights(out / "model.safetensors")[0].segmenter.state_dict()
        assert all(torch.equal(held[key], tensor) for key, tensor in load_weights(init)[0].items())
    images = sorted((positions / "looped").glob("*.png"))[:2]
    rows, _ = classify_images(out, images, tmp_path / "pred")
    for row, image in zip(rows, images):
        assert len(row["tip"]) == 2 and all(0 <= v < SIZE for v in row["tip"])
        overlay = np.asarray(Image.open(tmp_path / "pred" / f"{image.stem}_overlay.png"))
        assert overlay.shape == (SIZE, SIZE, 3)
        assert (overlay == (255, 0, 255)).all(-1).any()  # the tip's cross
        if pooling == "path":  # the course it read, entry to tip (drawn by mark, below)
            assert len(row["path"]) == PATH_POINTS and row["path"][-1] == row["tip"]
        else:
            assert "path" not in row
    written = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert [row["tip"] for row in written] == [row["tip"] for row in rows]
    assert [row.get("path") for row in written] == [row.get("path") for row in rows]


def test_overlay_marks_draw_a_cross_at_each_point_clipped_to_the_image():
    rgb = np.zeros((20, 30, 3), np.uint8)
    marked = mark(rgb, [[5.2, 6.8], [19.0, 29.0]], (0, 255, 0), arm=1)
    green = (marked == (0, 255, 0)).all(-1)
    assert green[[4, 5, 6, 5, 5], [7, 7, 7, 6, 8]].all() and green[[18, 19, 19], [29, 29, 28]].all()
    assert green.sum() == 5 + 3 and not rgb.any()  # two crosses, the second cut by the corner; the input untouched
    beyond = (mark(rgb, [[-4.0, 10.0]], (0, 255, 0), arm=1) == (0, 255, 0)).all(-1)
    assert beyond.sum() == 0  # a point off the image draws nothing (no slice wraps round)


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


@pytest.mark.parametrize("pooling", ["mask", "path"])
@pytest.mark.parametrize("arch", ["transunet", "unet"])
def test_held_segmenter_models_learn_only_what_reads_the_catheter(pooling, arch):
    model = POSITION_MODELS[pooling](get_preset("tiny"), n_classes=4, segmenter_arch=arch)
    assert model.segmenter.arch == arch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    assert not model.segmenter.training and model.head.training
    logits = model(torch.rand(2, 1, 64, 96))  # (2, 4); a non-square image, both sides multiples of 32
    assert logits.shape == (2, 4)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(after[key], value)
        assert changed == key.startswith(("shape_encoder.", "head.")), key
    seen = model.eval()(torch.rand(1, 1, 64, 64), parts=("logits", "tip", "catheter"))
    assert seen["catheter"].shape == (1, 64, 64) and seen["tip"].shape == (1, 2)


def test_course_head_learns_a_small_feature_beside_a_large_one_and_standardises_by_every_batch():
    torch.manual_seed(0)
    sign = torch.randint(0, 2, (256,))
    features = (100 + 10 * torch.randn(256, 1)).repeat(1, PATH_FEATURES)  # large and uninformative ...
    features[:, 0] = (sign * 2 - 1) * 1e-3 * (1 + torch.rand(256))  # ... beside a small one that decides the class
    head = course_head(2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for step in range(96):  # three passes over 32 batches of 8
        batch = slice(8 * (step % 32), 8 * (step % 32) + 8)
        loss = torch.nn.functional.cross_entropy(head(features[batch]), sign[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    assert (head(features).argmax(1) == sign).float().mean() > 0.95
    batch_means = features[: 8 * 32].reshape(32, 8, -1).mean(1)  # every batch counts alike, the first as the last
    assert torch.allclose(head.standardise.running_mean, batch_means.mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pooling", ["mask", "path"])
def test_held_segmenter_models_need_a_trained_segmentation_head(positions, tmp_path, pooling):
    with pytest.raises(ConfigError, match=f"--pooling {pooling} --init scratch: classifies the catheter a segmenter"):
        classify.run(quick_config(positions, tmp_path / "a", pooling=pooling), progress=False)
    assert not (tmp_path / "a").exists()  # refused before the run folder is claimed
    classifier = Classifier(get_preset("tiny"), 4)
    path = tmp_path / "foundation.safetensors"
    save_weights(path, classifier, model_metadata(classifier) | {"classes": ["a", "b", "c", "d"]})
    with pytest.raises(ConfigError, match=r"foundation.safetensors: gives no trained segmenter \(encoder; new: "
                                          r"decoder.\* \(33\), segmentation_head.\* \(2\)\)"):
        classify.build_model(quick_config(positions, tmp_path / "b", pooling=pooling, init=str(path)), 4)


def test_mask_model_refuses_a_segmenter_of_another_preset(positions, tmp_path):
    path = segmenter_weights(tmp_path, "small")
    with pytest.raises(WeightsError, match="preset 'small' but the model is preset 'tiny'"):
        classify.build_model(quick_config(positions, tmp_path / "run", pooling="mask", init=str(path)), 4)


@pytest.mark.parametrize("arch", ["transunet", "unet"])
def test_path_model_refuses_a_segmenter_of_another_preset(positions, tmp_path, arch):
    path = segmenter_weights(tmp_path, "small", arch)
    with pytest.raises(WeightsError, match="preset 'small' but the model is preset 'tiny'"):
        classify.run(quick_config(positions, tmp_path / "run", pooling="path", init=str(path)), progress=False)


def test_held_unet_segmenter_is_taken_whole_or_refused(positions, tmp_path):
    path = segmenter_weights(tmp_path, arch="unet")
    with pytest.raises(ConfigError, match="--init-parts encoder: a unet has no foundation encoder"):
        classify.build_model(quick_config(positions, tmp_path / "a", pooling="path", init=str(path),
                                          init_parts="encoder"), 4)
    tensors, metadata = load_weights(path)
    save_weights(path, tensors, metadata | {"classes": ["background", "vessel"]})
    with pytest.raises(WeightsError, match=r"unet_tiny.safetensors: its segmenter predicts \['background', 'vessel'\]"):
        classify.build_model(quick_config(positions, tmp_path / "b", pooling="path", init=str(path)), 4)
    save_weights(path, {k: v for k, v in tensors.items() if not k.startswith("model.2")}, metadata)
    with pytest.raises(WeightsError, match=r"unet_tiny.safetensors: does not match a unet \(tiny\) model: missing "
                                           r"model\.2"):
        classify.build_model(quick_config(positions, tmp_path / "c", pooling="mask", init=str(path)), 4)


def test_a_classifier_file_naming_a_segmenter_it_cannot_hold_is_refused(tmp_path):
    model = PathPositionClassifier(get_preset("tiny"), 4)
    path = tmp_path / "path.safetensors"
    save_weights(path, model, model_metadata(model) | {"segmenter_arch": "vnet"})
    with pytest.raises(WeightsError, match="path.safetensors: segmenter_arch 'vnet' for a position_path"):
        build_from_weights(path)
    tip = PositionClassifier(get_preset("tiny"), 4)
    save_weights(path, tip, model_metadata(tip) | {"segmenter_arch": "transunet"})
    with pytest.raises(WeightsError, match="segmenter_arch 'transunet' for a position; only position_mask and"):
        build_from_weights(path)


@pytest.mark.parametrize("cls", ["aortic_arch", "descending_aorta", "looped", "supra_aortic"])
def test_catheter_path_walks_a_synthetic_catheter_from_its_entry_to_its_tip(cls):
    for seed in range(3):
        _, mask, info = render_position(cls, 64, np.random.default_rng(seed))
        path = catheter_path(mask == 1)
        assert (mask[path[:, 0], path[:, 1]] == 1).all()
        assert np.abs(np.diff(path, axis=0)).max() == 1  # one 8-connected step at a time, never standing still
        assert path[0, 0] >= path[:, 0].max() - 2  # it enters from below
        if cls != "looped":  # a loop can put the far end of the walk at the loop, not the tip
            assert np.hypot(*(path[-1] - info["catheter"]["tip"])) <= 2, (cls, seed)


def hook(size: int, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A catheter entering at the bottom of a size² mask, running up and bending right; shifted by (rows, cols)."""
    mask = np.zeros((size, size), bool)
    unit = size // 8
    mask[3 * unit : size, 2 * unit] = True
    mask[3 * unit, 2 * unit : 5 * unit] = True
    return np.roll(mask, shift, axis=(0, 1))


def test_path_features_read_the_same_course_at_any_image_size_and_move_with_it():
    small, large = (path_features(catheter_path(hook(size)), hook(size)) for size in (64, 128))
    assert small.shape == (PATH_FEATURES,)
    # scale-free: the same hook at twice the size reads the same, but for one pixel's rounding at the corner
    assert np.abs(small - large).max() < 0.08
    moved = path_features(catheter_path(hook(64, (-8, 16))), hook(64, (-8, 16)))
    points, moved_points = small[: 2 * PATH_POINTS].reshape(-1, 2), moved[: 2 * PATH_POINTS].reshape(-1, 2)
    np.testing.assert_allclose(moved_points - points, np.tile([-16 / 63, 32 / 63], (PATH_POINTS, 1)), atol=1e-5)
    np.testing.assert_allclose(moved[2 * PATH_POINTS :], small[2 * PATH_POINTS :], atol=1e-6)


def test_path_features_tell_a_loop_from_a_hook():
    rows, cols = np.mgrid[:64, :64]
    looped = (np.abs(np.hypot(rows - 20, cols - 20) - 6) < 0.8) | ((cols == 20) & (rows >= 26))
    scalars = slice(4 * PATH_POINTS - 2, 4 * PATH_POINTS + 3)  # after the points and directions: length ... turning
    _, off_path, enclosed, _, turning = path_features(catheter_path(looped), looped)[scalars]
    _, hook_off_path, hook_enclosed, _, hook_turning = path_features(catheter_path(hook(64)), hook(64))[scalars]
    assert hook_off_path == 0 and hook_enclosed == 0 and abs(hook_turning - 0.25) < 0.05  # one right angle
    assert off_path > 0.15 and enclosed > 0.01  # the half of the loop the walk cut short, and what it encloses


def test_path_features_say_where_the_tip_lies_from_the_entry_and_the_crest():
    path = catheter_path(hook(64))  # from (63, 16) up to row 24, then right to (24, 39)
    features = path_features(path, hook(64))
    last_turning, from_entry, from_crest, spans = features[-8:-6], features[-6:-4], features[-4:-2], features[-2:]
    np.testing.assert_allclose(last_turning, [0, 0], atol=1e-6)  # the right angle lies before the last quarter
    np.testing.assert_allclose(from_entry, [(24 - 63) / len(path), (39 - 16) / len(path)], atol=1e-5)
    assert from_crest[0] == 0 and 0 < from_crest[1] < (39 - 16) / len(path)  # the crest is on row 24, left of the tip
    np.testing.assert_allclose(spans, [(63 - 24) / len(path), (39 - 16) / len(path)], atol=1e-5)


def test_catheter_path_bridges_the_gaps_of_a_broken_mask_and_not_a_speck_off_its_course():
    broken = hook(64)  # from (63, 16) up to row 24, then right to (24, 39)
    broken[44:50, 16] = False  # the segmenter lost 6 px of the shaft ...
    broken[24, 30:32] = False  # ... and 2 px before the tip
    broken[40:44, 40:44] = True  # a 16 px speck beside the course, not ahead of it
    alone = catheter_path(broken)  # the largest piece alone: it starts above the first gap and stops at the second
    assert tuple(alone[0]) == (43, 16) and tuple(alone[-1]) == (24, 29)
    path = catheter_path(broken, max_gap=0.15)
    assert tuple(path[0]) == (63, 16) and tuple(path[-1]) == (24, 39)
    assert np.abs(np.diff(path, axis=0)).max() == 1  # one 8-connected step at a time across the gaps too
    assert not broken[path[:, 0], path[:, 1]].all() and not (path[:, 1] >= 40).any()
    narrow = catheter_path(broken, max_gap=0.05)  # 3.2 px: the 3 px step to the tip, not the 7 px one to the entry
    assert tuple(narrow[0]) == (43, 16) and tuple(narrow[-1]) == (24, 39)
    whole = path_features(catheter_path(hook(64)), hook(64))
    np.testing.assert_allclose(path_features(path, broken), whole, atol=0.02)  # it reads as the unbroken hook


def test_path_model_reports_the_course_it_read_and_its_tip_at_its_end():
    model = PathPositionClassifier(get_preset("tiny"), n_classes=3).eval()
    images = torch.rand(2, 1, 64, 64)
    seen = model(images, parts=("logits", "path", "tip"))
    assert seen["logits"].shape == (2, 3) and seen["path"].shape == (2, PATH_POINTS, 2)
    assert torch.equal(seen["tip"], seen["path"][:, -1])
    course = [read_course(probability)[0] for probability in model.catheter(images).numpy()]
    assert seen["tip"].tolist() == [path[-1].tolist() for path in course]  # the end of the course it classified


def test_path_pooling_trains_its_head_at_a_higher_learning_rate(positions, tmp_path):
    init = str(segmenter_weights(tmp_path))
    assert quick_config(positions, tmp_path, pooling="path", init=init).validate().lr == 1e-2
    assert quick_config(positions, tmp_path, pooling="mask", init=init).validate().lr == 1e-3


def test_held_segmenter_runs_classify_at_the_size_their_segmenter_was_fine_tuned_at(positions, tmp_path):
    init = str(segmenter_weights(tmp_path))  # fine-tuned at SIZE, not the preset's 128
    assert quick_config(positions, tmp_path, pooling="path", init=init, image_size=None).validate().image_size == SIZE
    assert quick_config(positions, tmp_path, pooling="mean", init=init, image_size=None).validate().image_size == 128
    with pytest.warns(UserWarning, match=f"--image-size 64: the segmenter of --init .* was fine-tuned at {SIZE} px"):
        quick_config(positions, tmp_path, pooling="mask", init=init, image_size=64).validate()
