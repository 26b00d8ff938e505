"""Accuracy and speed of fedefm's EMD: errors against POT and the assignment oracle, gradcheck, time per call.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_emd.py [--cases 20] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

from fedefm.federated.emd import cosine_cost, emd_distance, node_weights

NODE_COUNTS = (16, 64, 256)
FEATURE_SIZES = (96, 768)


def pot_emd(u: torch.Tensor, v: torch.Tensor, mode: str) -> float:
    """POT's network simplex in numpy float64 on our cosine cost and node masses (the test suite also
    checks those two against an independent numpy oracle)."""
    a, b = node_weights(u, v, mode)
    return float(ot.emd2(a.numpy(), b.numpy(), cosine_cost(u, v).numpy()))


def accuracy(cases: int) -> None:
    """Print max abs error against POT (N != M, both weightings) and against linear_sum_assignment."""
    rng = np.random.default_rng(0)
    errors = {"uniform": 0.0, "cross_reference": 0.0, "assignment": 0.0}
    for _ in range(cases):
        n, m, d = rng.integers(4, 40), rng.integers(4, 40), rng.integers(2, 64)
        u, v = rng.random((n, d)), rng.random((m, d))
        for mode in ("uniform", "cross_reference"):
            ut, vt = torch.from_numpy(u), torch.from_numpy(v)
            errors[mode] = max(errors[mode], abs(emd_distance(ut, vt, weights=mode).item() - pot_emd(ut, vt, mode)))
        u, v = rng.standard_normal((n, d)), rng.standard_normal((n, d))
        cost = cosine_cost(torch.from_numpy(u), torch.from_numpy(v)).numpy()
        rows, cols = linear_sum_assignment(cost)
        ours = emd_distance(torch.from_numpy(u), torch.from_numpy(v)).item()
        errors["assignment"] = max(errors["assignment"], abs(ours - cost[rows, cols].sum() / n))
    print(f"accuracy over {cases} random cases (max abs error of the EMD distance)")
    print(f"  vs ot.emd2, uniform weights, N != M:          {errors['uniform']:.2e}")
    print(f"  vs ot.emd2, cross-reference weights, N != M:  {errors['cross_reference']:.2e}")
    print(f"  vs linear_sum_assignment / N, N = M:          {errors['assignment']:.2e}")


def gradients() -> None:
    """Print torch.autograd.gradcheck results (float64, 5 vs 7 nodes, D = 4) for both solvers and weightings."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.rand(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    print("gradcheck (float64, 5 vs 7 nodes, D = 4)")
    for solver in ("exact", "sinkhorn"):
        for mode in ("uniform", "cross_reference"):
            ok = torch.autograd.gradcheck(lambda x, y: emd_distance(x, y, mode, solver), (u, v), raise_exception=False)
            print(f"  {solver:8s} {mode:15s} {'pass' if ok else 'FAIL'}")


def median_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def timing(repeats: int) -> None:
    """Print median ms per call, forward and forward+backward, float32 features, uniform weights."""
    print(f"time per call, ms (median of {repeats}; float32 features in, float64 solve; torch threads = "
          f"{torch.get_num_threads()})")
    print(f"  {'N':>4s} {'D':>4s} {'exact fwd':>10s} {'exact f+b':>10s} {'sinkhorn fwd':>13s} {'sinkhorn f+b':>13s}")
    g = torch.Generator().manual_seed(0)
    for n in NODE_COUNTS:
        for d in FEATURE_SIZES:
            u = torch.randn(n, d, generator=g, requires_grad=True)
            v = torch.randn(n, d, generator=g)
            row = []
            for solver in ("exact", "sinkhorn"):
                row.append(median_ms(lambda: emd_distance(u, v, solver=solver).item(), repeats))
                row.append(median_ms(lambda: emd_distance(u, v, solver=solver).backward(), repeats))
            print(f"  {n:4d} {d:4d} {row[0]:10.2f} {row[1]:10.2f} {row[2]:13.2f} {row[3]:13.2f}")


def main() -> None:
    """Run the three reports."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 keeps timings stable on a shared CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    accuracy(args.cases)
    gradients()
    timing(args.repeats)


if __name__ == "__main__":
    main()
