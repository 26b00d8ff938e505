"""Pre-training objectives: the partial-label loss, dense distillation and MIM against hand-computed cases."""

import math

import pytest
import torch

from fedefm.errors import ConfigError
from fedefm.federated.distill import DistillConfig, multishot_distillation_loss
from fedefm.federated.objectives import Batch, get_objective, is_dense, needs_masks
from fedefm.federated.objectives.base import local_loss
from fedefm.federated.objectives.mim import corrupt, reconstruction_loss
from fedefm.federated.objectives.segment import Segment, marginal_prediction, partial_label_loss
from fedefm.models.foundation import DenseFoundation
from fedefm.models.presets import get_preset

# labels of these cases: 0 background, 1 catheter, 2 vessel
CATHETER_ONLY = torch.tensor([[False, True, False]])


def test_partial_label_loss_merges_an_unannotated_label_into_background_by_hand():
    # Prepare: one 2x2 image annotating catheter only; pixel (0, 0) is catheter; all logits 0, so p = 1/3 each
    # shape: logits (1, 3, 2, 2), masks (1, 2, 2)
    logits = torch.zeros(1, 3, 2, 2)
    masks = torch.tensor([[[1, 0], [0, 0]]])
    # Execute
    loss = partial_label_loss(logits, masks, CATHETER_ONLY, foreground_weight=1.0, dice_weight=0.0)
    # Assert: "not catheter" pixels score p(background) + p(vessel) = 2/3; the catheter pixel 1/3
    expected = (3 * -math.log(2 / 3) - math.log(1 / 3)) / 4
    assert loss.item() == pytest.approx(expected)
    assert expected < math.log(3)  # plain cross-entropy, which calls the vessel channel wrong, would be log 3


def test_partial_label_loss_does_not_teach_background_for_an_unannotated_label():
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    masks = torch.tensor([[[1, 0], [0, 0]]])
    partial_label_loss(logits, masks, CATHETER_ONLY, dice_weight=0.0).backward()
    # A descent step raises the vessel logit at "not catheter" pixels as much as background's: no push against it.
    vessel, background = -logits.grad[0, 2, 1, 1], -logits.grad[0, 0, 1, 1]
    assert vessel.item() == pytest.approx(background.item()) and vessel.item() > 0


def test_an_image_annotating_nothing_adds_nothing_but_keeps_the_graph():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = partial_label_loss(logits, torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_marginal_prediction_reads_an_unannotated_label_as_background():
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 2, 0, 0] = 5.0  # vessel wins at pixel 0, catheter at pixel 1
    logits[0, 1, 0, 1] = 5.0
    assert marginal_prediction(logits, CATHETER_ONLY).tolist() == [[[0, 1]]]


class MaskedSource:
    """The part of ImageSource a score reads, over fixed tensors."""

    def __init__(self, images, masks, annotated):
        self.images_, self.masks, self.annotated = images, masks, annotated

    def __len__(self):
        return self.images_.shape[0]

    def images(self, index):
        return self.images_[index]

    def batch(self, index):
        return Batch(self.images_[index], torch.zeros(len(index), dtype=torch.long), self.masks[index],
                     self.annotated[index])


@pytest.fixture(scope="module")
def dense_model():
    torch.manual_seed(0)
    return DenseFoundation(get_preset("tiny"), n_classes=3)


def test_segment_score_is_one_when_the_prediction_is_the_mask(dense_model, monkeypatch):
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[0, 4:10, 4:10] = 1
    masks[1, 20:30, 2:5] = 2
    annotated = torch.tensor([[False, True, False], [False, True, True]])
    perfect = lambda images: torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float()  # noqa: E731
    monkeypatch.setattr(dense_model, "forward", perfect)
    assert Segment().score(dense_model, MaskedSource(torch.zeros(2, 1, 32, 32), masks, annotated)) == 1.0


def dense_batch(seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 1, 32, 32, generator=generator)
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[0, 10:14, :] = 1
    masks[1, :, 8:11] = 2
    return Batch(images, torch.zeros(2, dtype=torch.long), masks, torch.tensor([[False, True, False], [False, False, True]]))


@pytest.mark.parametrize("spec", ["segment", "mim", "segment+mim"])
def test_dense_distillation_at_beta_zero_is_the_supervised_loss(dense_model, spec):
    objective = get_objective(spec)
    torch.manual_seed(3)
    batch = objective.prepare(dense_batch())
    student = objective.outputs(dense_model, batch)
    teacher = {k: v.detach() + 1.0 for k, v in student.items()}
    loss = multishot_distillation_loss(student, [teacher], batch, torch.tensor([1.0]), DistillConfig(beta=0.0),
                                       objective)
    torch.testing.assert_close(loss, objective.loss(student, batch))


@pytest.mark.parametrize("spec", ["segment", "mim"])
def test_dense_distillation_moves_the_student_toward_the_teacher(spec):
    objective = get_objective(spec)
    torch.manual_seed(0)
    student_model, teacher_model = DenseFoundation(get_preset("tiny"), 3), DenseFoundation(get_preset("tiny"), 3)
    student_model.eval(), teacher_model.eval()
    torch.manual_seed(4)
    batch = objective.prepare(dense_batch())
    with torch.no_grad():
        teacher = objective.outputs(teacher_model, batch)

    def gap() -> float:
        with torch.no_grad():
            return objective.soft(objective.outputs(student_model, batch), teacher, 4.0)[0].item()

    before = gap()
    optimizer = torch.optim.SGD(student_model.parameters(), lr=0.05)
    for _ in range(5):
        loss = multishot_distillation_loss(objective.outputs(student_model, batch), [teacher], batch,
                                           torch.tensor([1.0]), DistillConfig(beta=1.0), objective)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert gap() < before


def test_a_batch_without_masks_trains_mim_but_not_segment(dense_model):
    unlabelled = dense_batch()._replace(annotated=torch.zeros(2, 3, dtype=torch.bool))
    torch.manual_seed(0)
    assert local_loss(get_objective("segment"), dense_model, unlabelled).item() == 0.0
    assert local_loss(get_objective("mim"), dense_model, unlabelled).item() > 0.0
    assert local_loss(get_objective("segment+mim"), dense_model, unlabelled).item() > 0.0


def test_corrupt_hides_whole_patches_and_reconstruction_loss_is_zero_for_the_clean_image():
    images = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    inputs, hidden = corrupt(images, mask_ratio=0.4, patch=8, noise_std=0.0, generator=torch.Generator().manual_seed(1))
    blocks = hidden.unfold(2, 8, 8).unfold(3, 8, 8)  # (4, 1, 8, 8, 8, 8): each patch all hidden or all visible
    assert torch.all(blocks.amin(dim=(-1, -2)) == blocks.amax(dim=(-1, -2)))
    assert 0.2 < hidden.mean().item() < 0.6
    assert torch.all(inputs[hidden.bool()] == 0.5)
    assert reconstruction_loss(images, images, hidden, 0.25).item() == 0.0


def test_objective_names_parse_with_weights_and_bad_ones_are_refused():
    combined = get_objective("segment+mim*0.5")
    assert combined.name == "segment+mim*0.5" and combined.metric == "dice"
    assert combined.untrained_parts == ()
    assert is_dense("mim") and not is_dense("classify") and needs_masks("segment+mim") and not needs_masks("mim")
    with pytest.raises(ConfigError, match="did you mean 'segment'"):
        get_objective("segmnt")
    with pytest.raises(ConfigError, match="combine the dense objectives only"):
        get_objective("classify+mim")
    with pytest.raises(ConfigError, match="listed twice"):
        get_objective("mim+mim")
