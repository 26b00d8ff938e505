import math

import numpy as np
import ot
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from fedefm.errors import ConfigError
from fedefm.federated.emd import (
    cosine_cost,
    emd_distance,
    emd_flow,
    emd_score,
    emd_score_batch,
    node_weights,
    pool_nodes,
)


def _nodes(n: int, d: int, seed: int, positive: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    return x if positive else 2 * x - 1


def _numpy_oracle(u: np.ndarray, v: np.ndarray, mode: str) -> float:
    """EMD computed independently in numpy: cosine cost, masses, POT's network simplex."""
    un = u / np.linalg.norm(u, axis=1, keepdims=True)
    vn = v / np.linalg.norm(v, axis=1, keepdims=True)
    cost = 1 - un @ vn.T
    if mode == "uniform":
        a, b = np.full(len(u), 1 / len(u)), np.full(len(v), 1 / len(v))
    else:
        a = np.maximum(u @ v.mean(0), 0) + 1e-3
        b = np.maximum(v @ u.mean(0), 0) + 1e-3
        a, b = a / a.sum(), b / b.sum()
    return float(ot.emd2(a, b, cost))


def test_pool_nodes_averages_blocks_in_row_major_order():
    # Prepare: one 4x4 map holding 0..15, one channel
    fmap = torch.arange(16.0).reshape(1, 1, 4, 4)
    # Execute
    nodes = pool_nodes(fmap, grid=2)
    # Assert: (B, N, D) = (1, 4, 1); block means of [0,1,4,5], [2,3,6,7], [8,9,12,13], [10,11,14,15]
    assert nodes.shape == (1, 4, 1)
    assert nodes[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


@pytest.mark.parametrize("grid", [0, 5])
def test_pool_nodes_rejects_grid_outside_feature_map(grid):
    with pytest.raises(ConfigError, match=f"grid {grid}"):
        pool_nodes(torch.zeros(1, 3, 4, 6), grid)


def test_cosine_cost_matches_hand_computed_angles():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    expected = torch.tensor([[0.0, 2.0, 1 - 1 / math.sqrt(2)], [1.0, 1.0, 1 - 1 / math.sqrt(2)]])
    torch.testing.assert_close(cosine_cost(u, v), expected)


def test_cross_reference_weights_follow_agreement_with_other_mean():
    # mean(v) = (1, 0): u_1 agrees (dot 1), u_2 is orthogonal (dot 0, floor 1e-3); same for v vs mean(u)
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    a, b = node_weights(u, v, "cross_reference")
    expected = torch.tensor([1.001, 0.001]) / 1.002
    torch.testing.assert_close(a, expected)
    torch.testing.assert_close(b, expected)


def test_uniform_weights_are_one_over_node_count():
    a, b = node_weights(torch.ones(4, 3), torch.ones(5, 3), "uniform")
    torch.testing.assert_close(a, torch.full((4,), 0.25))
    torch.testing.assert_close(b, torch.full((5,), 0.2))


def test_unknown_weight_mode_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'cross_reference'"):
        node_weights(torch.ones(2, 2), torch.ones(2, 2), "cross-reference")


def test_unknown_solver_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'sinkhorn'"):
        emd_distance(torch.ones(2, 2), torch.ones(2, 2), solver="sinkorn")


def test_hand_computed_two_node_emd():
    # cost [[0, 2], [1, 1]], masses 1/2: e1->e1 (0) and e2->-e1 (1) beat the swap (2 + 1)
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert emd_distance(u, v).item() == pytest.approx(0.5)
    assert emd_score(u, v).item() == pytest.approx(0.5)
    plan = emd_flow(cosine_cost(u, v), *node_weights(u, v))
    torch.testing.assert_close(plan, torch.tensor([[0.5, 0.0], [0.0, 0.5]]))


@pytest.mark.parametrize("mode", ["uniform", "cross_reference"])
@pytest.mark.parametrize(("n", "m"), [(6, 9), (9, 4)])
def test_emd_distance_agrees_with_pot_on_independent_numpy_pipeline(mode, n, m):
    positive = mode == "cross_reference"
    u, v = _nodes(n, 8, seed=n, positive=positive), _nodes(m, 8, seed=100 + m, positive=positive)
    expected = _numpy_oracle(u.numpy(), v.numpy(), mode)
    assert emd_distance(u, v, weights=mode).item() == pytest.approx(expected, abs=1e-12)


def test_uniform_emd_with_equal_node_counts_is_assignment_cost_over_n():
    u, v = _nodes(7, 5, seed=1), _nodes(7, 5, seed=2)
    cost = cosine_cost(u, v).numpy()
    rows, cols = linear_sum_assignment(cost)
    assert emd_distance(u, v).item() == pytest.approx(cost[rows, cols].sum() / 7, abs=1e-12)


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
@pytest.mark.parametrize("mode", ["uniform", "cross_reference"])
def test_score_plus_distance_is_total_flow_of_one(solver, mode):
    u, v = _nodes(5, 6, seed=3, positive=True), _nodes(8, 6, seed=4, positive=True)
    total = emd_score(u, v, mode, solver) + emd_distance(u, v, mode, solver)
    assert total.item() == pytest.approx(1.0, abs=1e-9)


def test_score_is_flow_weighted_cosine_similarity_of_eq_3():
    u, v = _nodes(5, 6, seed=5), _nodes(7, 6, seed=6)
    cost = cosine_cost(u, v)
    plan = emd_flow(cost, *node_weights(u, v))
    assert emd_score(u, v).item() == pytest.approx(((1 - cost) * plan).sum().item(), abs=1e-12)


@pytest.mark.parametrize("mode", ["uniform", "cross_reference"])
def test_identical_feature_sets_score_one_and_distance_zero(mode):
    u = _nodes(6, 4, seed=7, positive=True)
    assert emd_distance(u, u.clone(), mode).item() == pytest.approx(0.0, abs=1e-12)
    assert emd_score(u, u.clone(), mode).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
@pytest.mark.parametrize("mode", ["uniform", "cross_reference"])
def test_emd_distance_passes_gradcheck_on_non_degenerate_case(solver, mode):
    # 4 vs 5 nodes: no partial sum of the masses coincides, so the plan and the duals are unique
    u = _nodes(4, 3, seed=8, positive=True).requires_grad_()
    v = _nodes(5, 3, seed=9, positive=True).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: emd_distance(x, y, mode, solver), (u, v))


def test_exact_gradient_is_cost_gradient_with_plan_held_constant():
    # envelope theorem: d/du sum c(u, v) x* = sum (dc/du) x* with the optimal plan x* fixed
    u, v = _nodes(4, 3, seed=10), _nodes(5, 3, seed=11)
    plan = emd_flow(cosine_cost(u, v), *node_weights(u, v))
    u_emd, u_fixed = u.clone().requires_grad_(), u.clone().requires_grad_()
    emd_distance(u_emd, v).backward()
    (cosine_cost(u_fixed, v) * plan).sum().backward()
    torch.testing.assert_close(u_emd.grad, u_fixed.grad)


def test_sinkhorn_approaches_exact_as_regularisation_shrinks():
    u, v = _nodes(8, 16, seed=12), _nodes(8, 16, seed=13)
    exact = emd_distance(u, v).item()
    errors = [abs(emd_distance(u, v, solver="sinkhorn", reg=reg, iters=500).item() - exact) for reg in (0.1, 0.01)]
    assert errors[1] < errors[0]
    assert errors[1] < 5e-3


def test_float32_features_give_float32_score_with_gradients():
    u = _nodes(4, 3, seed=14).float().requires_grad_()
    v = _nodes(4, 3, seed=15).float()
    score = emd_score(u, v)
    score.backward()
    assert score.dtype == torch.float32
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_batch_score_is_mean_of_per_image_scores_on_pooled_nodes():
    g = torch.Generator().manual_seed(16)
    student = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    s_nodes, t_nodes = pool_nodes(student, 2), pool_nodes(teacher, 2)
    expected = (emd_score(s_nodes[0], t_nodes[0]) + emd_score(s_nodes[1], t_nodes[1])) / 2
    assert emd_score_batch(student, teacher, grid=2).item() == pytest.approx(expected.item(), abs=1e-12)
    assert emd_score_batch(student, student, grid=2).item() == pytest.approx(1.0, abs=1e-12)


def test_batch_score_rejects_maps_of_different_shapes():
    with pytest.raises(ValueError, match="teacher_map"):
        emd_score_batch(torch.zeros(2, 5, 4, 4), torch.zeros(2, 6, 4, 4), grid=2)


def test_flow_rejects_masses_with_different_totals():
    with pytest.raises(ValueError, match="equal totals"):
        emd_flow(torch.zeros(2, 2), torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.4]))


def test_sinkhorn_rejects_non_positive_regularisation():
    with pytest.raises(ConfigError, match="reg 0"):
        emd_distance(torch.ones(2, 2), torch.ones(2, 2), solver="sinkhorn", reg=0)
