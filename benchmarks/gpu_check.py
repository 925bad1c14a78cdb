"""The Python parts of ``benchmarks/gpu_check.sh``: environment, loss benchmark, trainer step.

Each subcommand prints a markdown fragment on stdout (line by line, flushed, so a part killed by its
timeout still leaves what it measured) and exits non-zero on failure:

    python3 benchmarks/gpu_check.py env                      # machine, GPU, versions, backends
    python3 benchmarks/gpu_check.py bench  [--budget-s 110]  # loss fwd+bwd: triton, cuda, eager, compile
    python3 benchmarks/gpu_check.py trainer [--budget-s 55]  # ResNet-18 <- DeiT-T step, bf16, channels-last

``--fake`` runs the same code on CPU tensors with tiny shapes (a rehearsal where there is no GPU).
Loss benchmark: ``_common`` (inputs, variants, floor) at 256x1000x5 and 256x21841x5, fp32 and bf16,
forward+backward, each call timed with CUDA events; achieved bandwidth = the compulsory bytes
((2K + 1) B C itemsize) / median time, as a fraction of the H200's 4.8 TB/s.
"""
import argparse
import os
import platform
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
PEAK_BW = 4.8e12  # H200 HBM3e, bytes/s
SHAPES = ((256, 1000, 5), (256, 21841, 5))
FAKE_SHAPES = ((8, 100, 5), (4, 2203, 5))


def say(line: str = "") -> None:
    print(line, flush=True)


def _device(fake: bool) -> str:
    import torch

    if fake:
        return "cpu"
    if not torch.cuda.is_available():
        say(f"**no CUDA device** (torch {torch.__version__}, torch.cuda.is_available() is False)")
        sys.exit(2)
    return "cuda"


def cmd_env(args) -> int:
    import torch

    say(f"* host: {platform.node()}, {platform.platform()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs")
    say(f"* torch {torch.__version__} (CUDA {torch.version.cuda}), cudnn {torch.backends.cudnn.version()}")
    try:
        import triton

        say(f"* triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001
        say(f"* triton: not importable ({exc})")
    try:
        import timm

        say(f"* timm {timm.__version__}")
    except Exception as exc:  # noqa: BLE001
        say(f"* timm: not importable ({exc})")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        say(f"* GPU: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
            f"{p.multi_processor_count} SMs, {torch.cuda.device_count()} device(s)")
    else:
        say("* GPU: none visible to torch")
    try:
        from ofakd_fast import available_backends
        from ofakd_fast.loss.backends import BACKENDS, backend_error

        dev = torch.device("cuda" if torch.cuda.is_available() and not args.fake else "cpu")
        say(f"* ofakd_fast backends on {dev}: " + ", ".join(
            f"{b}: {'ok' if backend_error(b, dev) is None else backend_error(b, dev)}" for b in BACKENDS))
        say(f"* available_backends(): {available_backends()}")
    except Exception as exc:  # noqa: BLE001
        say(f"* ofakd_fast: import failed: {type(exc).__name__}: {exc}")
        return 1
    return 0


def _time_calls(step, device: str, calls: int):
    import torch

    ms = []
    for _ in range(calls):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            ms.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            ms.append((time.perf_counter() - t) * 1e3)
    return ms


def cmd_bench(args) -> int:
    import torch

    import _common as C

    device = _device(args.fake)
    deadline = time.monotonic() + args.budget_s
    shapes = FAKE_SHAPES if args.fake else SHAPES
    variants = ["floor", "fused:triton", "fused:cuda", "eager", "compile"]
    if args.fake:
        variants = ["floor", "fused:cpu", "eager"] + (["compile"] if args.fake_compile else [])
    say("| shape | dtype | variant | median ms | min ms | x floor | GB/s | of 4.8 TB/s |")
    say("|---|---|---|---|---|---|---|---|")
    failures = 0
    for B, Cc, K in shapes:
        for dtype in ("fp32", "bf16"):
            case = C.Case(device, B, Cc, K, dtype)
            branches, teacher, target = C.make_inputs(case)
            floor_ms = None
            for variant in variants:
                row = f"| {B}x{Cc}x{K} | {dtype} | {variant} |"
                if time.monotonic() > deadline:
                    say(row + " skipped: time budget spent | | | | |")
                    continue
                try:
                    if variant == "floor":
                        step = C.floor_step(case)
                    else:
                        backend = variant.split(":", 1)[1] if variant.startswith("fused:") else None
                        if backend is not None:
                            from ofakd_fast.loss.backends import backend_error

                            err = backend_error(backend, torch.device(device))
                            if err is not None:
                                say(row + f" unavailable: {err} | | | | |")
                                continue
                        step = C.loss_step(variant, "fwdbwd", branches, teacher, target)
                    for _ in range(2):  # compilation, first touch
                        step()
                    C.synchronize(device)
                    per_call = C.seconds_per_call(step, device)
                    calls = int(max(5, min(args.calls, 0.05 * args.budget_s / max(per_call, 1e-6))))
                    ms = _time_calls(step, device, calls)
                    med, lo = statistics.median(ms), min(ms)
                    if variant == "floor":
                        floor_ms = med
                    gbs = case.floor_bytes_moved / (med * 1e-3) / 1e9
                    ratio = f"{med / floor_ms:.2f}" if floor_ms else "-"
                    say(row + f" {med:.4f} | {lo:.4f} | {ratio} | {gbs:.0f} | {gbs * 1e9 / PEAK_BW:.1%} |")
                except Exception as exc:  # noqa: BLE001
                    failures += 1
                    say(row + f" FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''} "
                              "| | | | |")
                    traceback.print_exc(file=sys.stderr)
            del branches, teacher, target
    say("")
    say("x floor: median time / median time of the floor copy (`dst.copy_(src)` moving the same bytes); "
        "GB/s: the compulsory (2K + 1)·B·C·itemsize bytes of a forward+backward / median time.")
    return 1 if failures else 0


def cmd_trainer(args) -> int:
    import timm
    import torch

    from ofakd_fast import build_distiller, total_loss

    device = _device(args.fake)
    deadline = time.monotonic() + args.budget_s
    batch, size = (4, 64) if args.fake else (args.batch, 224)
    torch.manual_seed(0)
    student = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    teacher = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=1000,
                                **({"img_size": size} if args.fake else {}))
    distiller = build_distiller("ofa", student, teacher, eps=1.2).to(device).train()
    distiller.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            _, losses = distiller(images, labels)
            total = total_loss(losses)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    say(f"batch {batch}, {size} px, bf16 autocast, channels-last, SGD, synthetic data, pretrained=False")
    say("")
    say("| loss backend | median step ms | min step ms | images/s | steps |")
    say("|---|---|---|---|---|")
    failures = 0
    for backend in ("auto", "reference"):
        if time.monotonic() > deadline:
            say(f"| {backend} | skipped: time budget spent | | | |")
            continue
        try:
            distiller.backend = backend
            for _ in range(2):
                step()
            ms = _time_calls(step, device, args.steps)
            med = statistics.median(ms)
            say(f"| {backend} | {med:.2f} | {min(ms):.2f} | {batch / (med * 1e-3):.0f} | {len(ms)} |")
        except Exception as exc:  # noqa: BLE001
            failures += 1
            say(f"| {backend} | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''} | | | |")
            traceback.print_exc(file=sys.stderr)
    if device == "cuda":
        say("")
        say(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("env", "bench", "trainer"):
        p = sub.add_parser(name)
        p.add_argument("--fake", action="store_true", help="CPU tensors, tiny shapes (a rehearsal)")
        p.add_argument("--budget-s", type=float, default=100.0, help="stop starting new measurements after this")
        if name == "bench":
            p.add_argument("--calls", type=int, default=50, help="timed calls per variant (at most)")
            p.add_argument("--fake-compile", action="store_true", help="with --fake: also time torch.compile")
        if name == "trainer":
            p.add_argument("--batch", type=int, default=128)
            p.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    return {"env": cmd_env, "bench": cmd_bench, "trainer": cmd_trainer}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
