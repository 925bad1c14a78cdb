"""The CUDA extension is built wherever nvcc is (no GPU needed) and registers the CUDA kernel of the op.

A real build check on machines with nvcc: `pip install -e .` (scripts/setup.sh, hence CI) compiles
csrc/ofa_loss_cuda.cu, and these tests fail if the module or its registration is missing. Without nvcc
(or with a CPU-only PyTorch, or OFAKD_BUILD_CUDA=0) the extension is not built and this module is skipped.
The kernel's results are tested in test_cuda_kernel.py, on a GPU and, without one, by running its row
program on the host.
"""
import importlib
import os
from pathlib import Path

import pytest
import torch

from ofakd_fast.loss import build

_build_cuda, _why_not = build.cuda_build_decision()
if not _build_cuda:
    pytest.skip(f"the CUDA extension is not built on this machine: {_why_not} (nvcc, the CUDA compiler, and a "
                "CUDA build of PyTorch are needed)", allow_module_level=True)

import ofakd_fast  # noqa: E402
from conftest import make_case  # noqa: E402
from ofakd_fast import ofa_loss_multi
from ofakd_fast.loss import extension  # noqa: E402
from ofakd_fast.loss.backends import backend_error  # noqa: E402

OP = "ofakd_fast_C::fused_forward"
SCHEMA = ("ofakd_fast_C::fused_forward(Tensor[] branches, Tensor teacher, Tensor target, Tensor eps, "
          "float temperature, Tensor? grad_scale, bool teacher_grad) -> "
          "(Tensor loss_rows, Tensor grad_branches, Tensor grad_teacher)")


def test_extension_imports_and_registers_the_cuda_kernel():
    importlib.import_module(build.CPU_EXTENSION)  # defines the schema
    module = importlib.import_module(build.CUDA_EXTENSION)
    assert Path(module.__file__).parent == Path(ofakd_fast.__file__).parent, "expected the installed build"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU")
    assert str(torch.ops.ofakd_fast_C.fused_forward.default._schema) == SCHEMA
    assert extension.cuda_extension_error() is None


def test_extension_contains_device_code():
    so = Path(importlib.import_module(build.CUDA_EXTENSION).__file__).read_bytes()
    assert b"-arch sm_" in so, "no compiled GPU code (cubin) in the CUDA extension"


def test_cuda_backend_on_cpu_tensors_raises_a_clear_error():
    students, teacher, target = make_case(4, 10, 2)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run: backend='cuda' needs CUDA tensors, "
                                           "got cpu tensors"):
        ofa_loss_multi(students, teacher, target, 1.0, backend="cuda")


def test_op_on_cpu_tensors_dispatches_to_the_cpu_kernel():
    """The dispatcher picks the kernel by device: CPU tensors never reach the CUDA kernel."""
    students, teacher, target = make_case(3, 7, 2, requires_grad=False)
    eps = torch.tensor([1.0, 1.5], dtype=torch.float64)
    loss, _, _ = torch.ops.ofakd_fast_C.fused_forward(students, teacher, target, eps, 1.0, None, False)
    want = ofa_loss_multi(students, teacher, target, [1.0, 1.5], reduction="none", backend="reference")
    torch.testing.assert_close(loss, want)


def test_cuda_backend_is_ready_for_cuda_tensors():
    """Only the device is missing here: on CUDA tensors the 'cuda' backend would run."""
    assert backend_error("cuda", torch.device("cuda")) is None
    report = ofakd_fast.available_backends()
    if not torch.cuda.is_available():
        assert "needs CUDA tensors" in report["cuda"]
    else:
        assert report["cuda"] == "available"


def test_build_configuration_needs_no_hand_set_variables(monkeypatch):
    home = build.find_cuda_home()
    assert os.path.isfile(os.path.join(home, "bin", "nvcc"))
    assert os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")) or any(
        os.path.isfile(os.path.join(d, "cuda_runtime_api.h")) for d in build.nvidia_include_dirs())
    for d in build.nvidia_include_dirs():
        assert os.path.isdir(d) and Path(d).parent.parent.name == "nvidia"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    if not torch.cuda.is_available():
        assert build.cuda_arch_list() == build.DEFAULT_CUDA_ARCH_LIST == "8.0;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert build.cuda_arch_list() == "8.6"
    flags = build.nvcc_flags()
    assert "-O3" in flags and "--use_fast_math" not in flags and "--threads" in flags


def test_build_switch(monkeypatch):
    monkeypatch.setenv(build.BUILD_CUDA_ENV, "0")
    assert build.cuda_build_decision() == (False, "OFAKD_BUILD_CUDA=0")
    monkeypatch.setenv(build.BUILD_CUDA_ENV, "1")
    assert build.cuda_build_decision()[0]
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="OFAKD_BUILD_CUDA=1 but the CUDA extension cannot be built"):
        build.cuda_build_decision()
    monkeypatch.delenv(build.BUILD_CUDA_ENV)
    should_build, reason = build.cuda_build_decision()
    assert not should_build and "no CUDA support" in reason


def test_cuda_home_skips_an_nvcc_wrapper_without_headers(monkeypatch, tmp_path):
    """`which nvcc` may be a wrapper script (here /usr/local/bin/nvcc): its bin/.. is no toolkit."""
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text("#!/bin/sh\nexec nvcc \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    assert build.find_cuda_home() != str(tmp_path)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # an explicit CUDA_HOME with bin/nvcc is trusted
    assert build.find_cuda_home() == str(tmp_path)
