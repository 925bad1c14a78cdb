"""Benchmark options and machine description. See ``benchmarks/README.md``."""
import os
import sys

import pytest

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # for _common and _memory_probe

import _common  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("ofakd_fast benchmarks")
    group.addoption("--quick", action="store_true", default=False,
                    help="run only the benchmarks marked 'quick' (a few minutes on 2 cores)")
    group.addoption("--bench-budget", type=float, default=None,
                    help="seconds of timed rounds per benchmark (default 1.5, 0.75 with --quick); "
                         "every variant runs at least 3 rounds")
    group.addoption("--threads", type=int, default=None,
                    help="torch intra-op threads for every benchmark (default: torch's default, one per core)")
    group.addoption("--trainer-steps", type=int, default=2,
                    help="timed distillation steps per trainer configuration (default 2)")
    group.addoption("--trainer-bf16", action="store_true", default=False,
                    help="also run the bfloat16-autocast trainer configurations (minutes per step on "
                         "CPUs without AVX-512)")


MARKERS = {
    "quick": "the subset run by --quick (ImageNet shapes in fp32, the bf16 21k case, the trainer's default format)",
    "loss": "timing of the OFA loss (forward, forward+backward) and of its memcpy floor",
    "memory": "peak extra memory of one forward+backward",
    "trainer": "images per second of a whole distillation step",
}


def pytest_configure(config):
    threads = config.getoption("--threads", default=None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def _is_bench_item(item) -> bool:
    return os.path.basename(str(item.fspath)).startswith("bench_")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--quick", default=False):
        return
    keep, drop = [], []
    for item in items:
        (keep if not _is_bench_item(item) or item.get_closest_marker("quick") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["ofakd_fast"] = _common.machine_description()


@pytest.fixture(scope="session")
def bench_budget(pytestconfig) -> float:
    budget = pytestconfig.getoption("--bench-budget", default=None)
    if budget is not None:
        return budget
    return 0.75 if pytestconfig.getoption("--quick", default=False) else 1.5
