"""Shared test settings: no downloads, few threads, quiet logs; fixtures the modules share."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Under pytest-xdist (make test) the workers share the machine's cores: one thread each, not two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

import fcntl  # noqa: E402
import runpy  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(script: str, *args: str) -> None:
    """Run benchmarks/SCRIPT as ``python benchmarks/SCRIPT ARGS`` would, in this process (imports are paid once)."""
    argv, path, threads = sys.argv, list(sys.path), torch.get_num_threads()
    sys.argv = [f"benchmarks/{script}", *args]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items) -> None:
    """Test files that hold slow tests first, each file's order kept: under pytest-xdist (make test) the long
    end-to-end files start at once and the many quick files fill the workers in at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort


@pytest.fixture(scope="session")
def quick_benchmarks(tmp_path_factory) -> Path:
    """ROOT/t1 ... ROOT/t8: every table script's --quick output (T3, T4 and T6 start from T1's weights).

    Made once per test session: under pytest-xdist the first worker to ask makes it in the folder the workers
    share while holding a lock, and the others wait for it and read the same folder (no test changes it).
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root, done = shared / "bench", shared / "bench.done"
    with open(shared / "bench.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)  # a worker that failed part way
            run_benchmark("t1_foundation.py", "--quick", "--threads", "1", "--out", str(root / "t1"))
            run_benchmark("t2_unseen.py", "--quick", "--threads", "1", "--out", str(root / "t2"))
            for script, table in (("t3_downstream.py", "t3"), ("t4_backbones.py", "t4"), ("t6_position.py", "t6")):
                run_benchmark(script, "--quick", "--threads", "1", "--out", str(root / table),
                              "--foundation", str(root / "t1"))
            run_benchmark("t5_fedefm_ablation.py", "--quick", "--threads", "1", "--out", str(root / "t5"))
            run_benchmark("t7_dense_foundation.py", "--quick", "--threads", "1", "--out", str(root / "t7"))
            run_benchmark("t8_guidewire.py", "--quick", "--threads", "1", "--out", str(root / "t8"))
            done.touch()
    return root


@pytest.fixture(scope="module")
def positions(tmp_path_factory) -> Path:
    """A 4-class catheter-position dataset at 32 px, the size test_classify and test_position train at."""
    from fedefm.data.synth import write_position_dataset

    root = tmp_path_factory.mktemp("data") / "position"
    write_position_dataset(root, 32, size=32, seed=2)
    return root


@pytest.fixture
def in_a_server_app(monkeypatch):
    """Flower Messages made in the test get a run context, as inside a ServerApp or ClientApp (tests of flower/)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
