"""Input checks of the public loss functions: shapes, dtypes, devices, eps, temperature, targets.

Each error names the argument, what was wrong and what was expected. :func:`check_inputs`
returns the inputs in the form the kernels take (class indices, rows with a dense class dim).
"""
import torch
from torch import Tensor

from .sparse import SparseTeacher


# The kernels shift scaled logits by their row max with a fused multiply-add, x * (1/T) - max;
# its single rounding can leave the largest term slightly above 0, harmless unless x / T is huge
# (e.g. T = 1e-9: exp overflows). Below this temperature the logits are divided by T first (one
# copy of each branch, exact), and the kernels run at T = 1.
PRESCALE_BELOW_TEMPERATURE = 1e-2


def _on_host_eagerly(t: Tensor) -> bool:
    """Values are checked on the host for CPU tensors only (no GPU sync), and not under torch.compile."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and t.numel() > 0


def branch_count(entry: Tensor) -> int:
    """Branches in one entry of ``branch_logits``: K for a [K, B, C] tensor, 1 for a [B, C] one."""
    return entry.shape[0] if entry.dim() == 3 else 1


def as_branches(branch_logits) -> list:
    if isinstance(branch_logits, Tensor):
        if branch_logits.dim() != 3:
            raise ValueError("branch_logits: expected one [K, B, C] tensor or a sequence of [B, C] tensors, "
                             f"got a tensor of shape {tuple(branch_logits.shape)}")
        return [branch_logits]
    branches = list(branch_logits)
    if not branches:
        raise ValueError("branch_logits: expected at least one branch, got an empty sequence")
    for k, entry in enumerate(branches):
        if not isinstance(entry, Tensor):
            raise TypeError(f"branch_logits[{k}]: expected a Tensor, got {type(entry).__name__}")
        if entry.dim() != 2:
            raise ValueError(f"branch_logits[{k}]: expected shape [B, C], got {tuple(entry.shape)}")
    return branches


def eps_values(eps, num_branches: int) -> list:
    if isinstance(eps, Tensor):
        eps = eps.tolist()
    values = [eps] * num_branches if isinstance(eps, (int, float)) else list(eps)
    if len(values) != num_branches:
        raise ValueError(f"eps: expected one value or {num_branches} values (one per branch), got {len(values)}")
    values = [float(v) for v in values]
    for k, value in enumerate(values):
        if not value > 0 or value == float("inf"):
            raise ValueError(f"eps: every value must be a finite number > 0, got eps[{k}] = {value}")
    return values


def target_indices(target: Tensor, batch: int, classes: int, device: torch.device) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"target: expected a Tensor of class indices [B] or labels [B, C], got {type(target).__name__}")
    if target.device != device:
        raise ValueError(f"target: expected a tensor on {device} like the logits, got one on {target.device}")
    if target.dim() == 2:
        if tuple(target.shape) != (batch, classes):
            raise ValueError(f"target: a label tensor must be [B, C] = [{batch}, {classes}], got {tuple(target.shape)}")
        return (target.to(torch.uint8) if target.dtype == torch.bool else target).argmax(dim=1)
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"target: expected class indices of shape [{batch}] or labels [{batch}, {classes}], "
                         f"got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target: class indices must be an integer tensor, got {target.dtype}")
    target = target.long()
    # Checked on the host for CPU tensors only (no GPU sync); under torch.compile the kernel checks.
    if _on_host_eagerly(target):
        lowest, highest = torch.aminmax(target)
        if int(lowest) < 0 or int(highest) >= classes:
            bad = target[(target < 0) | (target >= classes)][0].item()
            raise ValueError(f"target: class indices must lie in [0, {classes}), got {bad}")
    return target


def is_one_hot(mask: Tensor) -> bool:
    """True if every row of a [B, C] mask is one 1 among 0s (one host sync on a GPU)."""
    if mask.dtype == torch.bool:
        return bool((mask.sum(dim=1) == 1).all())
    return bool((((mask == 0) | (mask == 1)).all(dim=1) & (mask.sum(dim=1) == 1)).all())


def check_soft_mask(mask: Tensor) -> None:
    """A soft mask must hold finite values >= 0 (``(p + m) ** eps`` is NaN below -p); checked on CPU only."""
    if _on_host_eagerly(mask):
        bad = ~torch.isfinite(mask) | (mask < 0) if mask.dtype.is_floating_point else mask < 0
        if bool(bad.any()):
            raise ValueError(f"target_mask: expected finite values >= 0, got {mask[bad][0].item()}")


def rows_contiguous(t: Tensor) -> Tensor:
    """Keeps any row stride (slices of larger tensors are read in place); only the class dim must be dense."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def check_sparse_teacher(teacher: SparseTeacher, classes: int, device: torch.device, dtype: torch.dtype):
    """A SparseTeacher in the kernels' form: int64 indices, logits and lse in the loss's float dtype."""
    indices, logits, lse = teacher
    for name, t in zip(SparseTeacher._fields, teacher):
        if not isinstance(t, Tensor) or t.device != device:
            got = t.device if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"logits_teacher.{name}: expected a tensor on {device} like the student logits, got {got}")
    if indices.dim() != 2 or tuple(logits.shape) != tuple(indices.shape) or tuple(lse.shape) != indices.shape[:1]:
        raise ValueError(f"logits_teacher: a SparseTeacher needs indices and logits [B, k] and lse [B], got "
                         f"{tuple(indices.shape)}, {tuple(logits.shape)}, {tuple(lse.shape)}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"logits_teacher.indices: expected an integer tensor, got {indices.dtype}")
    if not (logits.dtype.is_floating_point and lse.dtype.is_floating_point):
        raise TypeError(f"logits_teacher: logits and lse must be floating point, got {logits.dtype}, {lse.dtype}")
    if not 1 <= indices.shape[1] <= classes:
        raise ValueError(f"logits_teacher: k = {indices.shape[1]} stored classes, expected 1 <= k <= C = {classes}")
    indices = indices.long()
    if _on_host_eagerly(indices):
        ordered = indices.sort(dim=1).values
        if int(ordered[:, 0].min()) < 0 or int(ordered[:, -1].max()) >= classes:
            raise ValueError(f"logits_teacher.indices: class indices must lie in [0, {classes})")
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("logits_teacher.indices: the stored classes of a row must be distinct")
    math = torch.float64 if dtype == torch.float64 else torch.float32
    return SparseTeacher(indices.contiguous(), logits.to(math).contiguous(), lse.to(math).contiguous())


def _check_dense_teacher(logits_teacher) -> None:
    if not isinstance(logits_teacher, Tensor) or logits_teacher.dim() != 2:
        got = tuple(logits_teacher.shape) if isinstance(logits_teacher, Tensor) else type(logits_teacher).__name__
        raise ValueError(f"logits_teacher: expected a [B, C] tensor or a SparseTeacher, got {got}")
    if not logits_teacher.dtype.is_floating_point:
        raise TypeError(f"logits_teacher: expected floating-point logits, got {logits_teacher.dtype}")


def _check_branches(branches: list, batch: int, classes, device: torch.device) -> int:
    """Checks every branch against the teacher's batch (and class count when dense); returns C."""
    dtype = branches[0].dtype
    classes = branches[0].shape[-1] if classes is None else classes
    for k, entry in enumerate(branches):
        if entry.device != device:
            raise ValueError(f"branch_logits[{k}] is on {entry.device} but the teacher is on {device}: "
                             "all logits must be on one device")
        if tuple(entry.shape[-2:]) != (batch, classes):
            what = "class count" if entry.shape[-2] == batch else "shape"
            raise ValueError(f"branch_logits[{k}]: {what} mismatch, expected [B, C] = [{batch}, {classes}] like "
                             f"the teacher and branch 0, got {tuple(entry.shape[-2:])}")
        if entry.dtype != dtype or not entry.dtype.is_floating_point:
            raise TypeError(f"branch_logits[{k}]: expected floating-point logits of one dtype ({dtype}), got {entry.dtype}")
    return classes


def check_temperature(temperature) -> float:
    temperature = float(temperature)
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature}")
    return temperature


def check_inputs(branch_logits, logits_teacher, target, eps, temperature):
    branches = as_branches(branch_logits)
    sparse = isinstance(logits_teacher, SparseTeacher)
    if not sparse:
        _check_dense_teacher(logits_teacher)
    reference = logits_teacher.logits if sparse else logits_teacher
    batch, device = reference.shape[0], reference.device
    classes = _check_branches(branches, batch, None if sparse else reference.shape[1], device)
    temperature = check_temperature(temperature)
    if temperature < PRESCALE_BELOW_TEMPERATURE:
        branches = [entry / temperature for entry in branches]
        logits_teacher = logits_teacher._replace(logits=logits_teacher.logits / temperature) if sparse \
            else logits_teacher / temperature
        temperature = 1.0
    eps_list = eps_values(eps, sum(branch_count(entry) for entry in branches))
    target = target_indices(target, batch, classes, device)
    if sparse:
        teacher = check_sparse_teacher(logits_teacher, classes, device, branches[0].dtype)
        return [rows_contiguous(entry) for entry in branches], teacher, target, eps_list, temperature
    # One kernel instantiation per dtype reads students and teacher alike: a teacher wider than the
    # students (a float32 teacher, float16 students) lifts them to its dtype rather than being
    # narrowed (a teacher logit of 1e5 is inf in float16); autograd casts their gradients back.
    common = torch.promote_types(branches[0].dtype, logits_teacher.dtype)
    branches = [entry.to(common) for entry in branches]
    teacher = rows_contiguous(logits_teacher.to(common))
    return [rows_contiguous(entry) for entry in branches], teacher, target, eps_list, temperature
