"""Tests for the synthetic X-ray generator: physics, masks, reproducibility, dataset writing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from fedefm.data import synth
from fedefm.data.synth import (
    DOMAINS,
    GENERATOR_VERSION,
    POSITION_CLASSES,
    PRETRAIN_ANNOTATED,
    PRETRAIN_CLASSES,
    PRETRAIN_LABELS,
    catheter_position,
    render_fluoro,
    render_position,
    render_pretrain,
    render_pretrain_masked,
    write_pretrain_corpus,
    write_position_dataset,
    write_seg_dataset,
)
from fedefm.errors import ConfigError


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _render(domain, k, size=96):
    return render_fluoro(domain, size, np.random.default_rng([7, DOMAINS.index(domain), k]))


# --------------------------------------------------------------------------- physics


@pytest.mark.parametrize(
    "radius, offset, expected, tolerance",
    [
        (8.0, 0, 16.0, 0.4),  # 2 * sqrt(8^2 - 0^2); a wide tube goes through the half-resolution grid
        (8.0, 4, 13.856, 0.5),  # 2 * sqrt(64 - 16)
        (8.0, 6, 10.583, 0.8),  # 2 * sqrt(64 - 36), near the edge, which the antialiasing softens
        (8.0, 11, 0.0, 0.1),  # outside the tube
        (2.5, 0, 5.0, 0.3),  # a narrow tube goes through the full grid
        (2.5, 1, 4.583, 0.4),  # 2 * sqrt(6.25 - 1)
        (2.5, 4, 0.0, 0.1),
    ],
)
def test_tube_projection_is_the_chord_of_a_cylinder(radius, offset, expected, tolerance):
    # shape: a vertical tube, mu 1 per px, on column 64 of a 128 x 128 grid
    path = np.stack([np.linspace(-20, 148, 169), np.full(169, 64.0)], axis=1)
    line_integral = synth._project([synth._tube(path, radius, 1.0)], 128)
    assert line_integral[64, 64 + offset] == pytest.approx(expected, abs=tolerance)


@pytest.mark.parametrize("outer, inner", [(2.8, 1.8), (6.0, 4.0)])
def test_hollow_catheter_wall_is_darker_at_its_edges_than_at_its_centre(outer, inner):
    # shape: chord of the wall 2(sqrt(R^2-d^2) - sqrt(r^2-d^2)): 2(R - r) at the centre, 2 sqrt(R^2 - r^2) at d = r
    path = np.stack([np.linspace(-20, 148, 169), np.full(169, 64.0)], axis=1)
    profile = synth._project(synth._hollow_tube(path, outer, inner, 1.0), 128)[64, 64:76]
    assert profile[0] == pytest.approx(2 * (outer - inner), abs=0.3)
    assert profile[1 : int(outer) + 1].max() > 1.25 * profile[0]
    assert profile[int(outer) + 2 :] == pytest.approx(0.0, abs=0.1)


def test_tube_projection_conserves_the_cross_section_area():
    # shape: the integral across a tube of radius r is mu * pi * r^2, for thin and thick tubes
    path = np.stack([np.linspace(-20, 148, 169), np.full(169, 63.6)], axis=1)
    for radius in (0.4, 1.3, 7.0, 12.0):
        line_integral = synth._project([synth._tube(path, radius, 1.0)], 128)
        assert line_integral[64].sum() == pytest.approx(np.pi * radius**2, rel=0.02)


# --------------------------------------------------------------------------- frames and masks


@pytest.mark.parametrize("domain", DOMAINS)
def test_frames_are_uint8_and_masks_hold_only_background_catheter_guidewire(domain):
    image, mask, info = render_fluoro(domain, 33, np.random.default_rng(3))
    assert image.shape == mask.shape == (33, 33)
    assert image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1, 2}
    json.dumps(info)


@pytest.mark.parametrize("domain", DOMAINS)
def test_both_devices_are_in_the_mask_of_most_frames(domain):
    both = sum({1, 2} <= set(np.unique(_render(domain, k)[1])) for k in range(10))
    assert both >= 6


@pytest.mark.parametrize("domain", DOMAINS)
def test_devices_are_darker_than_the_pixels_around_them(domain):
    # Display convention: more attenuation is darker, so a device's pixels beat a ring 2-3 px outside it
    # (not always: a sub-pixel wire's short lead can sit in the bright halo that edge enhancement draws
    # around the catheter tip; test_synth_devices checks the wire alone at 128 px).
    darker: dict[int, list[bool]] = {1: [], 2: []}
    for k in range(10):
        image, mask, _ = _render(domain, k)
        for label in (1, 2):
            inside = mask == label
            if inside.sum() < 10:
                continue
            ring = ndimage.binary_dilation(inside, iterations=3) & ~ndimage.binary_dilation(mask > 0, iterations=1)
            darker[label].append(image[inside].mean() < image[ring].mean())
    assert len(darker[1]) >= 5 and len(darker[2]) >= 5
    assert np.mean(darker[1] + darker[2]) >= 0.8


def test_tip_segment_names_a_vessel_segment_of_the_tree():
    known = {"descending_aorta", "aortic_arch", "ascending_aorta", "brachiocephalic", "right_common_carotid",
             "right_subclavian", "left_common_carotid", "left_subclavian", "bicarotid_trunk", "right_iliac",
             "abdominal_aorta", "left_common_iliac", "right_renal", "left_renal", "superior_mesenteric", "coeliac",
             "hepatic", "splenic"}
    for domain in DOMAINS:
        for k in range(3):
            info = _render(domain, k, 64)[2]
            assert info["tip_segment"] in known
            assert isinstance(info["looped"], bool)


def test_domains_differ_in_dose_as_the_paper_domains_do():
    doses = {d: np.median([_render(d, k, 48)[2]["dose"] for k in range(5)]) for d in DOMAINS}
    assert doses["clinical"] < doses["phantom"] < doses["simulation"]


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_writes_byte_identical_datasets(tmp_path):
    write_seg_dataset(tmp_path / "a", "clinical", 3, size=64, seed=5)
    write_seg_dataset(tmp_path / "b", "clinical", 3, size=64, seed=5)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_different_seeds_give_different_images(tmp_path):
    write_seg_dataset(tmp_path / "a", "animal", 1, size=64, seed=1)
    write_seg_dataset(tmp_path / "b", "animal", 1, size=64, seed=2)
    name = "images/img_00000.png"
    assert _files(tmp_path / "a")[name] != _files(tmp_path / "b")[name]


def test_an_image_does_not_depend_on_how_many_images_are_written(tmp_path):
    write_seg_dataset(tmp_path / "one", "phantom", 1, size=64, seed=9)
    write_seg_dataset(tmp_path / "three", "phantom", 3, size=64, seed=9)
    for name in ("images/img_00000.png", "masks/img_00000.png"):
        assert _files(tmp_path / "one")[name] == _files(tmp_path / "three")[name]


def test_pretrain_images_are_not_copies_of_the_segmentation_images(tmp_path):
    write_seg_dataset(tmp_path / "seg", "clinical", 1, size=48, seed=0)
    write_pretrain_corpus(tmp_path / "pre", 1, size=48, seed=0, classes=["clinical"])
    seg_image = (tmp_path / "seg/images/img_00000.png").read_bytes()
    assert seg_image != (tmp_path / "pre/clinical/img_00000.png").read_bytes()


# --------------------------------------------------------------------------- dataset folders


def test_manifest_label_counts_equal_the_mask_files(tmp_path):
    manifest = write_seg_dataset(tmp_path / "out", "simulation", 3, size=64, seed=0)
    on_disk = json.loads((tmp_path / "out/manifest.json").read_text())
    assert on_disk == manifest
    assert on_disk["generator_version"] == GENERATOR_VERSION
    assert (on_disk["kind"], on_disk["domain"], on_disk["n"], on_disk["size"], on_disk["seed"]) == (
        "seg", "simulation", 3, 64, 0)
    for entry in on_disk["images"]:
        mask = np.asarray(Image.open(tmp_path / "out/masks" / entry["name"]))
        image = np.asarray(Image.open(tmp_path / "out/images" / entry["name"]))
        assert image.shape == mask.shape == (64, 64)
        counts = np.bincount(mask.ravel(), minlength=3)
        assert entry["label_counts"] == {"background": counts[0], "catheter": counts[1], "guidewire": counts[2]}


def test_existing_non_empty_output_folder_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="taken.*choose another folder or delete it"):
        write_seg_dataset(out, "clinical", 1, size=32)
    with pytest.raises(ConfigError, match="taken"):
        write_pretrain_corpus(out, 1, size=32)
    assert _files(out) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_existing_empty_output_folder_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    write_seg_dataset(tmp_path / "empty", "phantom", 1, size=32)
    assert (tmp_path / "empty/masks/img_00000.png").is_file()


def test_a_failure_midway_leaves_no_folder_behind(tmp_path, monkeypatch):
    calls = []

    def failing(domain, size, rng, wire_label="lead"):
        calls.append(domain)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8), {}

    monkeypatch.setattr(synth.corpora, "render_fluoro", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_seg_dataset(tmp_path / "out", "clinical", 3, size=32)
    assert list(tmp_path.iterdir()) == []


def test_pretrain_corpus_has_a_folder_of_per_class_images_for_each_class(tmp_path):
    manifest = write_pretrain_corpus(tmp_path / "corpus", 2, size=40, seed=1)
    folders = sorted(p.name for p in (tmp_path / "corpus").iterdir() if p.is_dir())
    assert len(PRETRAIN_CLASSES) >= 6
    assert set(DOMAINS) | {"fundus", "ct_slice"} <= set(PRETRAIN_CLASSES)
    assert folders == sorted(PRETRAIN_CLASSES)
    for cls in PRETRAIN_CLASSES:
        images = sorted((tmp_path / "corpus" / cls).glob("*.png"))
        assert [p.name for p in images] == ["img_00000.png", "img_00001.png"]
        assert np.asarray(Image.open(images[0])).shape == (40, 40)
    assert manifest["kind"] == "pretrain"
    assert manifest["counts"] == {cls: 2 for cls in PRETRAIN_CLASSES}


def test_pretrain_masks_follow_the_layout_and_the_label_table(tmp_path):
    manifest = write_pretrain_corpus(tmp_path / "corpus", 3, size=48, seed=2)
    root = tmp_path / "corpus"
    table = json.loads((root / "labels.json").read_text())
    assert table == manifest["label_table"]
    assert table["labels"] == ["background", "catheter", "guidewire", "vessel"] == list(PRETRAIN_LABELS)
    assert table["annotated"] == {"clinical": ["catheter", "guidewire"], "animal": ["catheter", "guidewire"],
                                  "phantom": ["vessel"], "simulation": ["catheter", "guidewire", "vessel"],
                                  "ct_slice": ["vessel"]}
    assert not (root / "fundus" / "masks").exists()
    for cls, labels in table["annotated"].items():
        masks = sorted((root / cls / "masks").iterdir())
        assert [p.name for p in masks] == [p.name for p in sorted((root / cls).glob("*.png"))]
        allowed = {0} | {table["labels"].index(name) for name in labels}
        values = set(np.unique(np.concatenate([np.asarray(Image.open(p)).ravel() for p in masks])).tolist())
        assert values <= allowed and values - {0}, (cls, values)
    assert manifest["masked"] == {cls: 3 for cls in table["annotated"]}


def test_pretrain_images_are_the_same_with_and_without_masks(tmp_path):
    write_pretrain_corpus(tmp_path / "dense", 2, size=40, seed=4)
    write_pretrain_corpus(tmp_path / "plain", 2, size=40, seed=4, masks=False)
    dense, plain = _files(tmp_path / "dense"), _files(tmp_path / "plain")
    assert not any("masks/" in name for name in plain) and "labels.json" not in plain
    images = {name: data for name, data in dense.items() if name.endswith(".png") and "masks/" not in name}
    assert images == {name: data for name, data in plain.items() if name.endswith(".png")}
    assert len(images) == 2 * len(PRETRAIN_CLASSES)


@pytest.mark.parametrize("cls, sign", [("phantom", 0), ("simulation", -1), ("ct_slice", 1)])
def test_vessel_masks_lie_on_the_contrast_filled_lumen(cls, sign):
    # Iodine darkens fluoroscopy and brightens CT; a phantom's channels hold contrast or (lighter) water.
    vessel = PRETRAIN_LABELS.index("vessel")
    for k in range(6):
        image, mask = render_pretrain_masked(cls, 96, np.random.default_rng([21, k]))
        ring = ndimage.binary_dilation(mask == vessel, iterations=3) & (mask == 0)
        difference = image[mask == vessel].mean() - image[ring].mean()
        # A water-filled phantom channel differs from its block by about one grey level (generator 2.0.0's beams).
        assert abs(difference) > (0.5 if cls == "phantom" else 2) and (sign == 0 or np.sign(difference) == sign), (
            k, difference)


def test_devices_win_over_the_vessel_they_lie_in():
    for k in range(4):
        devices = render_fluoro("simulation", 64, np.random.default_rng([9, k]))[1]
        image, mask = render_pretrain_masked("simulation", 64, np.random.default_rng([9, k]))
        assert np.array_equal(image, render_pretrain("simulation", 64, np.random.default_rng([9, k])))
        assert (mask[devices == 1] == PRETRAIN_LABELS.index("catheter")).all()
        assert (mask[devices == 2] == PRETRAIN_LABELS.index("guidewire")).all()
        assert (mask == PRETRAIN_LABELS.index("vessel")).any() and (devices > 0).any()


def test_fundus_has_no_mask_and_clinical_masks_only_devices():
    assert render_pretrain_masked("fundus", 48, np.random.default_rng(0))[1] is None
    assert PRETRAIN_ANNOTATED["fundus"] == ()
    mask = render_pretrain_masked("clinical", 64, np.random.default_rng(1))[1]
    devices = render_fluoro("clinical", 64, np.random.default_rng(1))[1]
    assert np.array_equal(mask, devices)


def test_mean_brightness_alone_does_not_tell_the_pretrain_classes_apart():
    # Nearest-class-mean on each image's mean grey level, classes fitted on even draws, scored on odd ones.
    means = {cls: np.array([render_pretrain(cls, 40, np.random.default_rng([11, i, k])).mean() for k in range(12)])
             for i, cls in enumerate(PRETRAIN_CLASSES)}
    centres = np.array([m[::2].mean() for m in means.values()])
    hits = [np.argmin(np.abs(centres - value)) == label for label, m in enumerate(means.values()) for value in m[1::2]]
    assert np.mean(hits) < 0.5


# --------------------------------------------------------------------------- catheter position task


@pytest.mark.parametrize("cls", POSITION_CLASSES)
def test_position_frames_put_the_catheter_tip_where_their_class_says(cls):
    for k in range(3):
        image, mask, info = render_position(cls, 64, np.random.default_rng([5, k]))
        assert info["position"] == cls == catheter_position(info)
        assert info["anatomy"] == "thorax" and not info["guidewire"]["present"]
        row, col = np.round(info["catheter"]["tip"]).astype(int)
        # The tip is drawn and labelled: the catheter mask reaches it (not hidden behind a collimator blade).
        assert mask[max(row - 2, 0) : row + 3, max(col - 2, 0) : col + 3].max() == 1
        assert image.dtype == np.uint8 and image.shape == (64, 64)


def test_catheter_position_follows_the_tip_segment_and_a_loop_overrides_it():
    def info(segment, looped=False, present=True):
        return {"catheter": {"present": present}, "tip_segment": segment, "looped": looped}

    assert catheter_position(info("aortic_arch")) == "aortic_arch"
    assert catheter_position(info("descending_aorta")) == "descending_aorta"
    assert catheter_position(info("left_common_carotid")) == "supra_aortic"
    assert catheter_position(info("descending_aorta", looped=True)) == "looped"
    assert catheter_position(info("ascending_aorta")) is None
    assert catheter_position(info("aortic_arch", present=False)) is None


def test_position_dataset_is_balanced_over_class_folders_and_reproducible(tmp_path):
    manifest = write_position_dataset(tmp_path / "a", 9, size=32, seed=4)
    write_position_dataset(tmp_path / "b", 9, size=32, seed=4)
    assert manifest["counts"] == {"aortic_arch": 3, "descending_aorta": 2, "looped": 2, "supra_aortic": 2}
    for cls, count in manifest["counts"].items():
        assert len(list((tmp_path / "a" / cls).glob("*.png"))) == count
    assert all(image["info"]["position"] == image["class"] for image in manifest["images"])
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_mean_brightness_alone_does_not_tell_the_position_classes_apart():
    # Nearest-class-mean on each image's mean grey level, classes fitted on even draws, scored on odd ones.
    means = {cls: np.array([render_position(cls, 48, np.random.default_rng([13, i, k]))[0].mean()
                            for k in range(12)])
             for i, cls in enumerate(POSITION_CLASSES)}
    centres = np.array([m[::2].mean() for m in means.values()])
    hits = [np.argmin(np.abs(centres - value)) == label for label, m in enumerate(means.values()) for value in m[1::2]]
    assert np.mean(hits) < 0.45


def test_position_dataset_needs_an_image_per_class(tmp_path):
    with pytest.raises(ConfigError, match="--n 3: the position task has 4 classes"):
        write_position_dataset(tmp_path / "p", 3, size=32)
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: render_fluoro("clinicl", 64, np.random.default_rng(0)), "did you mean 'clinical'"),
        (lambda: render_pretrain("fundas", 64, np.random.default_rng(0)), "did you mean 'fundus'"),
        (lambda: render_fluoro("xyz", 64, np.random.default_rng(0)), "Known: clinical, animal, phantom, simulation"),
        (lambda: render_fluoro("animal", 31, np.random.default_rng(0)), "--size 31"),
    ],
)
def test_unknown_names_and_small_sizes_raise_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"domain": "phantm", "n": 1}, "did you mean 'phantom'"),
        ({"domain": "phantom", "n": 0}, "--n 0"),
        ({"domain": "phantom", "n": 1, "size": 16}, "--size 16"),
        ({"domain": "phantom", "n": 1, "seed": -1}, "--seed -1"),
        ({"domain": "phantom", "n": 1, "workers": 0}, "--workers 0"),
    ],
)
def test_bad_dataset_options_raise_config_error_and_write_nothing(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        write_seg_dataset(tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "classes, match",
    [(["fundus", "fundus"], "listed twice"), ([], "none given"), (["ct"], "did you mean 'ct_slice'")],
)
def test_bad_pretrain_classes_raise_config_error(tmp_path, classes, match):
    with pytest.raises(ConfigError, match=match):
        write_pretrain_corpus(tmp_path / "out", 1, size=32, classes=classes)
