"""CRD, contrastive representation distillation (Tian et al., "Contrastive Representation
Distillation", ICLR 2020), as OFA-KD's distillers/crd.py: a memory bank of student and teacher
embeddings keyed by dataset index, and NCE on K sampled negatives."""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .base import HyperParameter
from .features import FeatureDistiller, full_precision

NCE_EPS = 1e-7  # distillers/crd.py ContrastLoss


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_rows(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """The rows of each tensor from every rank, concatenated in rank order (the same on every rank);
    ranks may hold different numbers of rows. Without torch.distributed: the tensors themselves."""
    if not distributed():
        return tensors
    world = dist.get_world_size()
    count = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:c] for part, c in zip(parts, counts)]))
    return tuple(gathered)


def contrast_scores(bank: Tensor, embedding: Tensor, candidates: Tensor, temperature: float) -> Tensor:
    """[B, K+1] unnormalised scores exp(<bank[candidates[i, j]], embedding[i]> / T)."""
    rows = bank[candidates]  # [B, K+1, D]
    return torch.exp(torch.bmm(rows, embedding[:, :, None]).squeeze(2) / temperature)


def nce_loss(scores: Tensor, num_data: int) -> Tensor:
    """CRD's NCE loss of normalised scores [B, 1+K] (column 0 the positive, noise distribution uniform
    over `num_data`): -(sum_i log P(D=1|pos_i) + sum_ij log P(D=0|neg_ij)) / B, with
    P(D=1|x) = x / (x + K/N) and P(D=0|x) = (K/N) / (x + K/N) (distillers/crd.py ContrastLoss)."""
    noise = (scores.shape[1] - 1) / num_data
    positive, negative = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + NCE_EPS))
    log_d0 = torch.log(noise / (negative + noise + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


@torch.no_grad()
def momentum_update(bank: Tensor, rows: Tensor, index: Tensor, momentum: float) -> None:
    """bank[index] <- normalise(momentum * bank[index] + (1 - momentum) * rows). Of repeated indices the
    last row counts, so the update is deterministic."""
    unique, inverse = torch.unique(index, return_inverse=True)
    if len(unique) < len(index):
        order = torch.arange(len(index), device=index.device)
        last = torch.zeros_like(unique).scatter_reduce_(0, inverse, order, "amax", include_self=False)
        rows, index = rows[last], unique
    updated = bank.index_select(0, index) * momentum + rows.to(bank.dtype) * (1 - momentum)
    bank.index_copy_(0, index, F.normalize(updated, p=2, dim=1))


class ContrastMemory(nn.Module):
    """The two memory banks [num_data, feat_dim] (student embeddings, teacher embeddings; uniform in
    +-1/sqrt(feat_dim/3) at first, as distillers/crd.py) and the normalisers Z of the two score sets,
    set from the first training batch (Z = mean score * num_data); all registered buffers."""

    def __init__(self, feat_dim: int, num_data: int, k: int, temperature: float, momentum: float):
        super().__init__()
        self.num_data, self.k, self.temperature, self.momentum = num_data, k, temperature, momentum
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(num_data, feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("memory_teacher", torch.rand(num_data, feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("normalizer", torch.full((2,), -1.0))  # (student scores, teacher scores); < 0: unset

    def sample(self, index: Tensor) -> Tensor:
        """[B, 1+K] bank rows: column 0 the positive `index`, then K drawn uniformly (the original's
        AliasMethod over uniform unigrams) from the global torch RNG of the bank's device, which the
        trainer checkpoints: a resumed run draws the same negatives."""
        candidates = torch.randint(0, self.num_data, (index.shape[0], self.k + 1), device=index.device)
        candidates[:, 0] = index
        return candidates

    def _normalizers(self, scores_student: Tensor, scores_teacher: Tensor) -> Tensor:
        """The stored Z, or (unset) Z from this batch, averaged over all ranks' samples under DDP;
        stored when training. No host sync: the choice is a torch.where."""
        with torch.no_grad():
            stats = torch.stack([scores_student.sum(), scores_teacher.sum(),
                                 scores_student.new_tensor(float(scores_student.numel()))])
            if distributed():
                dist.all_reduce(stats)
            batch = stats[:2] / stats[2] * self.num_data
            normalizer = torch.where(self.normalizer < 0, batch.to(self.normalizer.dtype), self.normalizer)
            if self.training:
                self.normalizer.copy_(normalizer)
        return normalizer

    def forward(self, student: Tensor, teacher: Tensor, index: Tensor) -> Tuple[Tensor, Tensor]:
        """Normalised scores [B, 1+K] of the student embeddings against the teacher bank and of the teacher
        embeddings against the student bank; then (training only) the banks take this step's embeddings,
        every rank's under DDP."""
        with full_precision(student):
            student, teacher = student.float(), teacher.float()
            candidates = self.sample(index)
            scores_student = contrast_scores(self.memory_teacher.detach(), student, candidates, self.temperature)
            scores_teacher = contrast_scores(self.memory_student.detach(), teacher, candidates, self.temperature)
            normalizer = self._normalizers(scores_student, scores_teacher)
            if self.training:
                rows_student, rows_teacher, rows_index = all_gather_rows(student.detach(), teacher.detach(), index)
                momentum_update(self.memory_student, rows_student, rows_index, self.momentum)
                momentum_update(self.memory_teacher, rows_teacher, rows_index, self.momentum)
        return scores_student / normalizer[0], scores_teacher / normalizer[1]


class CRD(FeatureDistiller):
    """Contrastive representation distillation (Tian et al., ICLR 2020), as OFA-KD's distillers/crd.py:
    the pooled embeddings of the final features of each side go through a linear layer to ``feat_dim``
    and an L2 normalisation; each is scored against the other side's memory bank at its own dataset
    index (the positive) and K uniformly drawn indices (negatives), and the NCE loss of both score sets
    is the distillation loss; plus the ground-truth loss.

    ``forward(images, labels, sample_index)`` takes the dataset index of each image
    (``needs_sample_index``). The banks and normalisers are buffers, so :meth:`extra_state` holds them
    and a resumed run continues from the same bank; negatives come from the global torch RNG (see
    :meth:`ContrastMemory.sample`). Under DDP every rank's (embedding, index) updates are all-gathered,
    so the banks stay the same on every rank. The banks change only in training mode.

    Args:
        num_data: the size of the training set (one bank row per sample), required.
        feat_dim ``--crd-feat-dim`` (128), k ``--crd-k`` (16384), momentum ``--crd-momentum`` (0.5),
            temperature ``--crd-temperature`` (0.07): defaults of OFA-KD train.py.
        loss_weights: 'gt' and 'kd' (``--kd-loss-weight``).
        input_size, and the rest: see :class:`~ofakd_fast.distill.features.FeatureDistiller`.
    """

    needs_sample_index = True
    hyper_parameters = (  # defaults: OFA-KD train.py
        HyperParameter("feat_dim", "--crd-feat-dim", 128, "CRD: width of the contrasted embeddings", low=1, kind=int),
        HyperParameter("k", "--crd-k", 16384, "CRD: negatives per sample", low=1, kind=int),
        HyperParameter("momentum", "--crd-momentum", 0.5, "CRD: momentum of the memory-bank update (<= 1)"),
        HyperParameter("temperature", "--crd-temperature", 0.07, "CRD: temperature of the scores", low_open=True),
    )

    def __init__(self, student: nn.Module, teacher: nn.Module, num_data: Optional[int] = None,
                 input_size: Optional[Sequence[int]] = None, **kwargs):
        super().__init__(student, teacher, input_size=input_size, **kwargs)
        if num_data is None or int(num_data) != num_data or num_data < 1:
            raise ValueError(f"CRD: num_data must be the size of the training set (a positive integer: one "
                             f"memory-bank row per sample), got {num_data!r}")
        if self.momentum > 1:
            raise ValueError(f"CRD: momentum (--crd-momentum) must be <= 1, got {self.momentum}")
        self.num_data = int(num_data)
        self.embed_s = nn.Linear(self.student_shapes[0], self.feat_dim)  # nn.Linear's init, as crd.py's Embed
        self.embed_t = nn.Linear(self.teacher_shapes[0], self.feat_dim)
        self.contrast = ContrastMemory(self.feat_dim, self.num_data, self.k, self.temperature, self.momentum)

    def forward(self, images: Tensor, labels: Tensor, sample_index: Tensor):
        embedding_teacher, _ = self.teacher_features(images)
        logits, embedding, _ = self.student_features(images)
        student = F.normalize(self.embed_s(embedding).float(), p=2, dim=1)
        teacher = F.normalize(self.embed_t(embedding_teacher).float(), p=2, dim=1)
        index = sample_index.to(device=student.device, dtype=torch.long)
        scores_student, scores_teacher = self.contrast(student, teacher, index)
        loss = nce_loss(scores_student, self.num_data) + nce_loss(scores_teacher, self.num_data)
        return logits, self.weighted(logits, labels, "kd", loss)
