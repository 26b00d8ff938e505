"""The federated algorithms' two halves, local_update and mix, against numbers written by hand."""

import numpy as np
import pytest
import torch
from torch import nn

from fedefm.errors import ConfigError
from fedefm.federated.algorithms import ALGORITHMS, fedavg, fedefm, fedprox, get_algorithm
from fedefm.federated.algorithms.base import NonFiniteLoss, SiloState, average_weights, mix_weights, sgd_steps
from fedefm.models.heads import Classifier
from fedefm.models.presets import get_preset

SIZE = 32


def state(value: float, num_examples: int = 1) -> SiloState:
    return SiloState(weights={"w": torch.tensor([value]), "count": torch.tensor([7])}, num_examples=num_examples)


def batches(label: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.rand(4, 1, SIZE, SIZE, generator=generator), torch.full((4,), label)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Classifier(get_preset("tiny"), n_classes=3)


def test_fedavg_mix_weights_silos_by_example_count():
    # Prepare: silo 0 holds 1 example with w = 1, silo 1 holds 3 examples with w = 3
    from fedefm.federated.topology import fedavg_matrix

    states = [state(1.0, 1), state(3.0, 3)]
    # Execute
    mixed = fedavg.mix(states, fedavg_matrix([1, 3]), fedavg.Config())
    # Assert: (1 * 1 + 3 * 3) / 4 = 2.5 at both silos; integer buffers are not averaged
    assert [s.weights["w"].item() for s in mixed] == [2.5, 2.5]
    assert mixed[0].weights["count"].item() == 7


def test_gossip_mix_follows_the_mixing_matrix_row_by_row():
    W = np.array([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.0, 0.5, 0.5]])
    mixed = mix_weights([state(0.0), state(4.0), state(8.0)], W)
    assert [s.weights["w"].item() for s in mixed] == [2.0, 4.0, 6.0]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_identical_states_are_unchanged_by_mix(name):
    algorithm = get_algorithm(name)
    states = [state(2.0), state(2.0)]
    mixed = algorithm.mix(states, np.full((2, 2), 0.5), algorithm.Config())
    assert all(s.weights["w"].item() == 2.0 for s in mixed)


def test_mix_refuses_a_matrix_whose_rows_do_not_sum_to_one():
    with pytest.raises(ValueError, match="sum to 1"):
        mix_weights([state(0.0), state(1.0)], np.array([[0.5, 0.2], [0.5, 0.5]]))


def test_average_weights_refuses_models_with_different_tensors():
    with pytest.raises(ValueError, match="different tensor names"):
        average_weights([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [0.5, 0.5])


def test_unknown_algorithm_suggests_the_closest_name():
    with pytest.raises(ConfigError, match="--algorithm fedavgg: did you mean 'fedavg'"):
        get_algorithm("fedavgg")


def test_local_update_lowers_the_loss_on_a_single_class_silo(model):
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = fedavg.Config(lr=0.05, local_steps=6)
    updated = fedavg.local_update(model, SiloState(weights=start), batches(label=1), cfg)
    images, labels = next(batches(label=1, seed=5))
    losses = []
    for weights in (start, updated.weights):
        model.load_state_dict(weights)
        model.eval()
        losses.append(nn.functional.cross_entropy(model(images), labels).item())
    assert losses[1] < losses[0]
    assert updated.grad_steps == 6


def test_fedprox_with_mu_zero_takes_the_same_steps_as_fedavg(model):
    start = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    plain = fedavg.local_update(model, SiloState(weights=start), batches(0), fedavg.Config())
    torch.manual_seed(1)
    prox = fedprox.local_update(model, SiloState(weights=start), batches(0), fedprox.Config(mu=0.0))
    assert all(torch.allclose(plain.weights[k], prox.weights[k]) for k in start)


def test_overseas_expert_trains_a_copy_at_the_host_and_leaves_the_visitor_untouched(model):
    start = {k: v.clone() for k, v in model.state_dict().items()}
    visitor = SiloState(weights=start)
    expert = fedefm.overseas_expert(model, visitor, batches(label=2), fedefm.Config(expert_steps=3))
    assert expert.grad_steps == 3
    assert any(not torch.equal(expert.weights[k], start[k]) for k in start)
    assert all(torch.equal(visitor.weights[k], start[k]) for k in start)


def test_sgd_steps_stop_at_a_non_finite_loss(model):
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss(model, batch):
        return model(batch.images).sum() * float("nan")

    with pytest.raises(NonFiniteLoss, match="local loss is nan"):
        sgd_steps(model, start, batches(0), fedavg.Config(), nan_loss)


def test_fedefm_config_rejects_a_bad_return_weight():
    with pytest.raises(ConfigError, match="return_weight 1.5: must be in"):
        fedefm.Config(return_weight=1.5)
