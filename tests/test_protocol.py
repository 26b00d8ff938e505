"""The algorithm protocol: facts the config reads, round plans as data, every algorithm's local_update and mix
against numbers written by hand, and a toy objective registered in one line running under every algorithm."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedefm.errors import ConfigError
from fedefm.federated import objectives, topology
from fedefm.federated.algorithms import ALGORITHMS, centralized, dpsgd, fedavg, fedefm, fedprox, matcha, moon
from fedefm.federated.algorithms import fedefm_literal, fedefm_released
from fedefm.federated.algorithms.base import Links, SiloState, Task
from fedefm.federated.config import PretrainConfig
from fedefm.federated.simulator import run
from fedefm.models.weights import load_weights
from test_regression import corpus  # noqa: F401 - the seeded random corpus


class BrightnessModel(nn.Module):
    """The toy objective's model: an image's mean brightness as w0 + w1 x (mean of its top half); two weights."""

    arch = "brightness"

    def __init__(self, preset, n_classes: int) -> None:
        super().__init__()
        self.preset, self.n_classes = preset, n_classes
        self.w = nn.Parameter(torch.tensor([0.1, 0.5]))

    def features(self, images):
        """(B, 2, 2, 2): a token map for FedEFM's EMD."""
        pooled = F.adaptive_avg_pool2d(images, 2)
        return torch.cat([pooled * self.w[0] + 1, pooled * self.w[1] + 1], dim=1)

    def forward(self, images, parts=("prediction", "representation")):
        top = images[:, :, : images.shape[2] // 2].mean((1, 2, 3))
        prediction = self.w[0] + self.w[1] * top
        return {"prediction": prediction, "representation": torch.stack([prediction, top], dim=1)}


@dataclass(frozen=True)
class Brightness:
    """A toy objective: regress each image's mean brightness. ``scale`` 0 zeroes every gradient, so an update is
    only the algorithm's own arithmetic."""

    name: str = "brightness"
    metric: str = "neg_mse"
    untrained_parts: tuple[str, ...] = ()
    scale: float = 1.0

    def build_model(self, preset, n_classes):
        return BrightnessModel(preset, n_classes)

    def prepare(self, batch):
        return batch

    def outputs(self, call, batch):
        return call(batch.images, ("prediction", "representation"))

    def loss(self, outputs, batch):
        return self.scale * ((outputs["prediction"] - batch.images.mean((1, 2, 3))) ** 2).mean()

    def soft(self, student, teacher, temperature):
        return self.scale * ((student["prediction"] - teacher["prediction"].detach()) ** 2).mean(), 1.0

    @torch.no_grad()
    def score(self, model, source):
        images = source.images(torch.arange(len(source)))
        return -float(((model(images)["prediction"] - images.mean((1, 2, 3))) ** 2).mean())


STILL = Brightness(scale=0.0)


def state(*values: float, grad_steps: int = 0) -> SiloState:
    return SiloState(weights={"w": torch.tensor(values)}, num_examples=4, grad_steps=grad_steps)


def images():
    generator = torch.Generator().manual_seed(0)
    while True:
        yield torch.rand(4, 1, 16, 16, generator=generator), torch.zeros(4, dtype=torch.long)


@pytest.fixture
def still():
    return BrightnessModel(None, 1)


def w(s: SiloState) -> list[float]:
    return s.weights["w"].tolist()


@pytest.mark.parametrize("algorithm,cfg", [
    (fedavg, fedavg.Config(objective=STILL)), (dpsgd, dpsgd.Config(objective=STILL)),
    (matcha, matcha.Config(objective=STILL)), (centralized, centralized.Config(objective=STILL)),
    (fedprox, fedprox.Config(objective=STILL, mu=0.5)), (fedefm_literal, fedefm_literal.Config(objective=STILL)),
])
def test_a_local_update_without_gradient_keeps_the_weights_and_counts_its_steps(still, algorithm, cfg):
    # fedprox's proximal term has no gradient at its anchor; literal FedEFM only distils, and sends nothing back
    new = algorithm.local_update(still, state(3.0, 0.0), images(), cfg, [state(2.0, 4.0, grad_steps=1)]
                                 if algorithm is fedefm_literal else ())
    assert w(new) == [3.0, 0.0]
    assert new.grad_steps == cfg.local_steps + (1 if algorithm is fedefm_literal else 0)


def test_fedefm_returns_the_experts_beside_the_home_model_by_their_weights(still):
    # θ_i ← (1 − γ) θ_home + γ Σ_j w_ij θ̂_{i→j}, θ_home = θ_i (no gradient), w = ½ each, γ = ¼:
    # ¾ [3, 0] + ¼ (½ [2, 4] + ½ [6, 8]) = [2.25 + 1, 0 + 1.5]
    cfg = fedefm.Config(objective=STILL, return_weight=0.25, uniform_weights=True)
    new = fedefm.local_update(still, state(3.0, 0.0), images(), cfg,
                              [state(2.0, 4.0, grad_steps=1), state(6.0, 8.0, grad_steps=1)])
    assert w(new) == [3.25, 1.5]
    assert new.grad_steps == 2 + 2  # its own distillation steps and its experts'


def test_fedefm_without_experts_is_the_home_update_alone(still):
    new = fedefm.local_update(still, state(3.0, 0.0), images(), fedefm.Config(objective=STILL))
    assert w(new) == [3.0, 0.0] and new.grad_steps == 2


def test_released_fedefm_averages_half_its_own_model_and_half_the_visitors(still):
    # ½ [3, 0] + ¼ [2, 4] + ¼ [6, 8] = [1.5 + 0.5 + 1.5, 0 + 1 + 2]
    new = fedefm_released.local_update(still, state(3.0, 0.0), images(), fedefm_released.Config(objective=STILL),
                                       [state(2.0, 4.0, grad_steps=1), state(6.0, 8.0, grad_steps=1)])
    assert w(new) == [3.5, 3.0] and new.grad_steps == 2 + 2


def test_moon_remembers_its_update_as_next_rounds_previous_model(still):
    new = moon.local_update(still, state(3.0, 0.0), images(), moon.Config(objective=STILL, mu=0.0))
    assert w(new) == [3.0, 0.0] and new.memory["previous"]["w"].tolist() == [3.0, 0.0]


@pytest.mark.parametrize("algorithm", [fedavg, fedprox, moon, dpsgd, matcha, centralized, fedefm])
def test_mixing_algorithms_take_each_row_of_w(algorithm):
    # row 0: ¾ [0, 4] + ¼ [8, 0] = [2, 3]; row 1: ½ each = [4, 2]
    mixed = algorithm.mix([state(0.0, 4.0), state(8.0, 0.0)], np.array([[0.75, 0.25], [0.5, 0.5]]), algorithm.Config())
    assert [w(s) for s in mixed] == [[2.0, 3.0], [4.0, 2.0]]


@pytest.mark.parametrize("algorithm", [fedefm_literal, fedefm_released])
def test_the_paper_readings_without_gossip_keep_every_model_as_updated(algorithm):
    mixed = algorithm.mix([state(0.0, 4.0), state(8.0, 0.0)], np.full((2, 2), 0.5), algorithm.Config())
    assert [w(s) for s in mixed] == [[0.0, 4.0], [8.0, 0.0]]


def ring_links(n: int) -> Links:
    return Links("ring", topology.build_overlay("ring", topology.get_underlay("gaia"), n, 0.0, 1000), None, 2)


def test_fedefm_plan_runs_experts_before_each_home_update_and_counts_three_trips_a_link():
    plan = fedefm.round_plan(ring_links(3), [4, 4, 4], np.random.default_rng(0), fedefm.Config())
    assert plan.tasks[:3] == [Task(1, 0, "expert", 0), Task(2, 0, "expert", 0), Task(0, 0, "home", 0)]
    assert [t for t in plan.tasks if t.silo == 1] == [Task(1, 0, "expert", 0), Task(1, 1, "home", 1),
                                                      Task(1, 2, "expert", 2)]
    assert plan.neighbours == [[1, 2], [0, 2], [0, 1]] and plan.mix_at == "silos"
    assert plan.transfers == 3 * 6 and plan.transfers_per_link == 3


def test_released_plan_trains_the_neighbours_models_at_home_and_mixes_nowhere():
    plan = fedefm_released.round_plan(ring_links(2), [4, 4], np.random.default_rng(0), fedefm_released.Config())
    assert plan.tasks == [Task(0, 1, "expert", 0), Task(0, 0, "home", 0), Task(1, 0, "expert", 1),
                          Task(1, 1, "home", 1)]
    assert plan.mix_at == "nowhere" and plan.transfers == 2


def test_client_server_plan_averages_by_examples_at_the_server_with_an_upload_and_a_download_each():
    plan = fedavg.round_plan(ring_links(3), [1, 1, 2], np.random.default_rng(0), fedavg.Config())
    assert plan.tasks == [Task(i, i, "home", i) for i in range(3)] and plan.mix_at == "server"
    np.testing.assert_allclose(plan.W, [[0.25, 0.25, 0.5]] * 3)
    assert plan.transfers == 6


def test_fedefm_on_a_star_relays_each_model_to_shots_silos_through_the_server():
    links = Links("star", topology.build_overlay("star", topology.get_underlay("gaia"), 4, 0.0, 1000), None, 2)
    plan = fedefm.round_plan(links, [4] * 4, np.random.default_rng(0), fedefm.Config())
    assert all(len(n) == 2 and i not in n for i, n in enumerate(plan.neighbours))
    assert plan.mix_at == "server" and plan.transfers == 2 * 3 * 8 + 2 * 4  # two hops a trip, then the average


def test_the_config_takes_an_algorithms_topologies_and_default_from_its_facts(tmp_path):
    for name, algorithm in ALGORITHMS.items():
        cfg = PretrainConfig(data=tmp_path, out=tmp_path / "run", algorithm=name).validate()
        assert cfg.topology == algorithm.FACTS.topologies[0]
    with pytest.raises(ConfigError, match="--topology matcha: --algorithm fedefm runs on ring, star, mst, complete; "
                                          "on matcha run matcha"):
        PretrainConfig(data=tmp_path, out=tmp_path / "run", topology="matcha").validate()


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_new_objective_is_one_registry_line_and_runs_under_every_algorithm(corpus, tmp_path, monkeypatch, name):
    monkeypatch.setitem(objectives.OBJECTIVES, "brightness", Brightness)
    summary = run(PretrainConfig(data=corpus, out=tmp_path, algorithm=name, objective="brightness", silos=3,
                                 rounds=2, batch_size=4, image_size=32, eval_every=1), progress=False)
    assert np.isfinite(summary["test_neg_mse"]) and np.isfinite(summary["final_val_neg_mse"])
    weights, metadata = load_weights(tmp_path / "global.safetensors")
    assert metadata["objective"] == "brightness"
    assert weights["w"].tolist() != pytest.approx([0.1, 0.5])  # it trained
