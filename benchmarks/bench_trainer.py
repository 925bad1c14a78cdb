"""Images per second of one OFA distillation step, fused loss against the reference loss.

ResNet-18 student, DeiT-Tiny teacher (timm, ``pretrained=False``), 224 px, batch 32, synthetic
images and labels, ``build_distiller('ofa', student, teacher, eps=1.2)``, SGD. A step is: teacher
forward (no grad), student + projectors forward, the fused OFA loss over the 5 branches, the
ground-truth loss, backward, optimizer step.

The loss backend is the distiller's ``backend`` attribute ('reference', or 'auto' for the fused
one); a distiller without that option falls back to the environment variable ``OFAKD_BACKEND``,
which ``backend='auto'`` honours.

Configurations: contiguous or channels-last, float32 or bfloat16 autocast. bfloat16 autocast
configurations only run with ``--trainer-bf16``: on a CPU without AVX-512 (as here) PyTorch has no
oneDNN bf16 convolution, autocast sends every convolution to ``aten::_slow_conv2d`` and one step
takes minutes.

The loss's share of the step: the ``ofa_loss_multi`` call of a step is intercepted, its inputs are
kept, and the loss forward+backward is timed alone on those exact tensors (same backend, same
autocast), then divided by the step time.
"""
import time

import pytest
import torch

import _common as C

FORMATS = ("contiguous", "channels_last")
PRECISIONS = ("fp32", "bf16")
LOSSES = ("fused", "reference")


def pytest_generate_tests(metafunc):
    if "trainer_config" not in metafunc.fixturenames:
        return
    include_bf16 = metafunc.config.getoption("--trainer-bf16", default=False)
    params = []
    for device in ("cpu", "cuda"):
        reason = C.no_cuda_reason() if device == "cuda" else None
        if reason:
            params.append(pytest.param(None, id="cuda-all", marks=[pytest.mark.skip(reason=reason)]))
            continue
        for precision in PRECISIONS:
            for fmt in FORMATS:
                for loss in LOSSES:
                    marks = []
                    if precision == "bf16" and device == "cpu" and not include_bf16:
                        marks.append(pytest.mark.skip(reason="bf16 autocast steps take minutes on this CPU "
                                                             "(no oneDNN bf16 without AVX-512); pass --trainer-bf16"))
                    if precision == "fp32" and fmt == "contiguous":
                        marks.append(pytest.mark.quick)
                    params.append(pytest.param((device, fmt, precision, loss), marks=marks,
                                               id=f"{device}-{fmt}-{precision}-{loss}"))
    metafunc.parametrize("trainer_config", params)


_BUILT = {}
_WARM = set()


def _distiller(device):
    if device not in _BUILT:
        import timm

        from ofakd_fast import build_distiller

        torch.manual_seed(0)
        cfg = C.TRAINER
        student = timm.create_model(cfg["student"], pretrained=False, num_classes=cfg["num_classes"])
        teacher = timm.create_model(cfg["teacher"], pretrained=False, num_classes=cfg["num_classes"])
        distiller = build_distiller("ofa", student, teacher, eps=cfg["eps"]).to(device).train()
        optimizer = torch.optim.SGD(distiller.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(cfg["batch"], 3, cfg["image_size"], cfg["image_size"], generator=gen).to(device)
        labels = torch.randint(0, cfg["num_classes"], (cfg["batch"],), generator=gen).to(device)
        _BUILT.clear()
        _BUILT[device] = (distiller, optimizer, images, labels)
    return _BUILT[device]


def _time_loss_alone(captured, device, autocast, repeats=7):
    """Median seconds of the captured loss call's forward+backward, run alone on the same tensors."""
    from ofakd_fast import ofa_loss_multi

    branches, teacher, target, args, kwargs = captured
    branches = [b.detach().clone().requires_grad_(True) for b in branches]

    weights = kwargs.get("grad_weights")  # the upstream the distiller's total loss gives each branch

    def once():
        with autocast():
            losses = ofa_loss_multi(branches, teacher, target, *args, **kwargs)
        upstream = None if weights is None else torch.tensor(weights, dtype=losses.dtype, device=losses.device)
        torch.autograd.grad(losses if upstream is not None else losses.sum(), branches, grad_outputs=upstream)

    once()
    times = []
    for _ in range(repeats):
        C.synchronize(device)
        start = time.perf_counter()
        once()
        C.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@pytest.mark.trainer
def bench_trainer(benchmark, pytestconfig, monkeypatch, trainer_config):
    import ofakd_fast.distill.ofa as distiller_module
    from ofakd_fast import total_loss

    device, fmt, precision, loss = trainer_config
    steps = pytestconfig.getoption("--trainer-steps")
    backend = "reference" if loss == "reference" else "auto"
    monkeypatch.delenv("OFAKD_BACKEND", raising=False)
    distiller, optimizer, images, labels = _distiller(device)
    if hasattr(distiller, "backend"):
        monkeypatch.setattr(distiller, "backend", backend)
    elif loss == "reference":  # a distiller without a backend option: 'auto' honours OFAKD_BACKEND
        monkeypatch.setenv("OFAKD_BACKEND", "reference")
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    distiller.to(memory_format=memory_format)
    images = images.contiguous(memory_format=memory_format)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    captured = []
    real_loss = distiller_module.ofa_loss_multi

    def capturing_loss(branches, teacher, target, *args, **kwargs):
        if not captured:
            captured.append(([b.detach() for b in branches], teacher.detach(), target, args, kwargs))
        return real_loss(branches, teacher, target, *args, **kwargs)

    monkeypatch.setattr(distiller_module, "ofa_loss_multi", capturing_loss)

    def step():
        with autocast():
            _, losses = distiller(images, labels)
            total = total_loss(losses)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        C.synchronize(device)

    warm_key = (device, fmt, precision)
    warmup = 0 if warm_key in _WARM else 1  # the other loss already warmed this format up
    _WARM.add(warm_key)
    benchmark.group = f"trainer {device} {fmt} {precision}"
    benchmark.pedantic(step, rounds=steps, iterations=1, warmup_rounds=warmup)
    step_seconds = benchmark.stats.stats.median
    loss_seconds = _time_loss_alone(captured[0], device, autocast)
    batch = C.TRAINER["batch"]
    benchmark.extra_info.update(
        kind="trainer", device=device, format=fmt, precision=precision, loss=loss,
        backend=backend, steps=steps,
        images_per_s=batch / step_seconds, images_per_s_best=batch / benchmark.stats.stats.min,
        loss_seconds=loss_seconds, loss_share=loss_seconds / step_seconds,
        branch_shape=list(captured[0][0][0].shape), branches=len(captured[0][0]),
        branch_dtype=str(captured[0][0][0].dtype).replace("torch.", ""), **C.TRAINER)
