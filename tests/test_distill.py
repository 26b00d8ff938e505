import math

import pytest
import torch
import torch.nn.functional as F

from fedefm.errors import ConfigError
from fedefm.federated.distill import (
    DistillConfig,
    distillation_terms,
    multishot_distillation_loss,
    neighbour_weights,
)
from fedefm.federated.objectives import Batch
from fedefm.federated.objectives.classify import Classify

CLASSIFY = Classify()


def _logits(seed: int, b: int = 4, c: int = 3) -> torch.Tensor:
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed))


LABELS = torch.tensor([0, 1, 2, 0])


def classify_terms(student, teacher, labels, beta, temperature):
    """One expert's term of eq. 11 for the classification objective, through the generic pieces."""
    soft, scale = CLASSIFY.soft({"logits": student}, {"logits": teacher}, temperature)
    return distillation_terms(soft, scale, F.cross_entropy(student, labels), beta)


def classify_multishot(student, teachers, labels, scores, cfg):
    """multishot_distillation_loss of classifier logits."""
    return multishot_distillation_loss({"logits": student}, [{"logits": t} for t in teachers],
                                       Batch(torch.empty(0), labels), scores, cfg, CLASSIFY)


def test_loss_is_plain_cross_entropy_when_beta_is_zero():
    student, teacher = _logits(0), _logits(1)
    loss = classify_terms(student, teacher, LABELS, beta=0.0, temperature=4.0)
    torch.testing.assert_close(loss, F.cross_entropy(student, LABELS))


def test_soft_term_is_t_squared_kl_of_hand_computed_distributions():
    # one image, two classes, T = 2: expert softmax(0, 0) = (1/2, 1/2); student softmax(0, 2)/2 = softmax(0, 1)
    student, teacher = torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    q = torch.softmax(torch.tensor([0.0, 1.0]), dim=0)
    kl = 0.5 * math.log(0.5 / q[0].item()) + 0.5 * math.log(0.5 / q[1].item())
    loss = classify_terms(student, teacher, torch.tensor([1]), beta=1.0, temperature=2.0)
    assert loss.item() == pytest.approx(4 * kl)


def test_teacher_receives_no_gradient():
    student, teacher = _logits(2).requires_grad_(), _logits(3).requires_grad_()
    classify_terms(student, teacher, LABELS, beta=0.5, temperature=4.0).backward()
    assert teacher.grad is None
    assert student.grad is not None


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_gradient_steps_move_student_softened_distribution_toward_teacher(beta):
    teacher = _logits(4)
    labels = teacher.argmax(dim=1)  # hard labels that agree with the expert, so both terms pull one way
    student = _logits(5).requires_grad_()

    def softened_kl() -> float:
        return F.kl_div(
            F.log_softmax(student.detach() / 4.0, dim=1),
            F.log_softmax(teacher / 4.0, dim=1),
            reduction="batchmean",
            log_target=True,
        ).item()

    before = softened_kl()
    optimizer = torch.optim.SGD([student], lr=0.5)
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        classify_terms(student, teacher, labels, beta=beta, temperature=4.0).backward()
        optimizer.step()
    assert softened_kl() < before


@pytest.mark.parametrize("weighting", ["sum", "softmax"])
def test_normalised_weights_sum_to_one_and_follow_the_score(weighting):
    weights = neighbour_weights(torch.tensor([0.2, 0.8, 0.5]), weighting)
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights[1] > weights[2] > weights[0]


def test_sum_weighting_clips_negative_scores_to_zero():
    torch.testing.assert_close(
        neighbour_weights(torch.tensor([-0.5, 0.25, 0.75]), "sum"), torch.tensor([0.0, 0.25, 0.75])
    )


def test_sum_weighting_is_uniform_when_no_score_is_positive():
    torch.testing.assert_close(neighbour_weights(torch.tensor([0.0, -0.3]), "sum"), torch.tensor([0.5, 0.5]))


def test_softmax_weighting_matches_hand_computed_ratio():
    # scores 0.1 apart with tau 0.1: weight ratio e
    weights = neighbour_weights(torch.tensor([0.6, 0.5]), "softmax", softmax_temperature=0.1)
    assert (weights[0] / weights[1]).item() == pytest.approx(math.e, rel=1e-5)


def test_none_weighting_returns_scores_detached():
    scores = torch.tensor([0.3, -0.1], requires_grad=True)
    weights = neighbour_weights(scores, "none")
    torch.testing.assert_close(weights, scores.detach())
    assert not weights.requires_grad


def test_unknown_weighting_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'softmax'"):
        neighbour_weights(torch.tensor([0.5]), "softmx")


def test_nan_score_is_rejected():
    with pytest.raises(ValueError, match="scores"):
        neighbour_weights(torch.tensor([0.5, float("nan")]), "sum")


def test_multishot_loss_is_score_weighted_sum_of_per_expert_terms():
    # Prepare: two experts with scores 0.25 and 0.75 -> "sum" weights 0.25, 0.75
    student, teachers = _logits(6), [_logits(7), _logits(8)]
    cfg = DistillConfig(beta=0.5, temperature=2.0, weighting="sum")
    # Execute
    loss = classify_multishot(student, teachers, LABELS, torch.tensor([0.25, 0.75]), cfg)
    # Assert
    terms = [classify_terms(student, t, LABELS, 0.5, 2.0) for t in teachers]
    torch.testing.assert_close(loss, 0.25 * terms[0] + 0.75 * terms[1])


def test_multishot_loss_sends_no_gradient_into_scores():
    scores = torch.tensor([0.4, 0.6], requires_grad=True)
    student = _logits(9).requires_grad_()
    loss = classify_multishot(student, [_logits(10), _logits(11)], LABELS, scores, DistillConfig())
    loss.backward()
    assert scores.grad is None
    assert student.grad is not None


def test_multishot_loss_rejects_score_count_different_from_experts():
    with pytest.raises(ValueError, match="scores"):
        classify_multishot(_logits(0), [_logits(1)], LABELS, torch.tensor([0.5, 0.5]), DistillConfig())


def test_multishot_loss_rejects_empty_expert_list():
    with pytest.raises(ValueError, match="no overseas experts"):
        classify_multishot(_logits(0), [], LABELS, torch.tensor([]), DistillConfig())


def test_teacher_with_other_class_count_is_rejected():
    with pytest.raises(ValueError, match="teacher logits"):
        classify_terms(_logits(0), _logits(1, c=4), LABELS, beta=0.5, temperature=4.0)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"beta": 1.5}, "beta 1.5"),
        ({"beta": -0.1}, "beta -0.1"),
        ({"temperature": 0.0}, "temperature 0.0"),
        ({"weighting": "sums"}, "did you mean 'sum'"),
        ({"softmax_temperature": -1.0}, "softmax_temperature -1.0"),
    ],
)
def test_config_rejects_out_of_range_options(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DistillConfig(**kwargs)


def test_config_defaults_are_hinton_values():
    cfg = DistillConfig()
    assert (cfg.beta, cfg.temperature, cfg.weighting, cfg.softmax_temperature) == (0.5, 4.0, "sum", 0.1)
