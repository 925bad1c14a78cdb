"""RKD, relational knowledge distillation (Park et al., "Relational Knowledge Distillation", CVPR 2019)."""
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import HyperParameter
from .features import FeatureDistiller, full_precision, require_pairs


def pairwise_distances(embedding: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """[B, B] Euclidean distances (squared ones if `squared`), each clamped to at least `eps` before the
    square root; the diagonal is 0."""
    sq_norms = embedding.pow(2).sum(1)
    dist = (sq_norms[:, None] + sq_norms[None, :] - 2 * embedding @ embedding.t()).clamp(min=eps)
    if not squared:
        dist = dist.sqrt()
    return dist * (1 - torch.eye(len(embedding), dtype=dist.dtype, device=dist.device))


def rkd_distance_loss(student: Tensor, teacher: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """Smooth-L1 between the pairwise distances of each side, each divided by its mean positive distance."""
    with torch.no_grad():
        target = pairwise_distances(teacher, squared, eps)
        target = target / target[target > 0].mean()
    dist = pairwise_distances(student, squared, eps)
    return F.smooth_l1_loss(dist / dist[dist > 0].mean(), target)


def triplet_angles(embedding: Tensor) -> Tensor:
    """[B * B * B] cosines: entry (a, b, c) is the cosine of the angle at x_a between x_b - x_a and
    x_c - x_a (0 where b or c is a)."""
    unit = F.normalize(embedding[None, :, :] - embedding[:, None, :], p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2)).flatten()


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Smooth-L1 between the triplet angles (:func:`triplet_angles`) of the student and the teacher."""
    with torch.no_grad():
        target = triplet_angles(teacher)
    return F.smooth_l1_loss(triplet_angles(student), target)


class RKD(FeatureDistiller):
    """Relational KD (Park et al., CVPR 2019), as OFA-KD's distillers/rkd.py: the distance-wise and the
    angle-wise relations of the pooled embeddings of the final features (no projection: the relations
    do not depend on the widths), ``distance_weight * distance + angle_weight * angle``, plus the
    ground-truth loss. Computed in float32 (autocast off).

    Args (defaults: OFA-KD train.py): distance_weight ``--rkd-distance-weight`` (25), angle_weight
        ``--rkd-angle-weight`` (50), eps ``--rkd-eps`` (1e-12), squared ``--rkd-squared`` (off).
        loss_weights: 'gt' and 'kd' (``--kd-loss-weight``).
    """

    hyper_parameters = (  # defaults: OFA-KD train.py
        HyperParameter("distance_weight", "--rkd-distance-weight", 25.0, "RKD: weight of the distance loss"),
        HyperParameter("angle_weight", "--rkd-angle-weight", 50.0, "RKD: weight of the angle loss"),
        HyperParameter("eps", "--rkd-eps", 1e-12, "RKD: smallest squared distance", low_open=True),
        HyperParameter("squared", "--rkd-squared", False, "RKD: compare squared distances", kind=bool),
    )

    def forward(self, images: Tensor, labels: Tensor):
        embedding_teacher, _ = self.teacher_features(images)
        logits, embedding, _ = self.student_features(images)
        require_pairs(embedding, type(self).__name__)
        with full_precision(embedding):
            student, teacher = embedding.float(), embedding_teacher.float()
            loss = (self.distance_weight * rkd_distance_loss(student, teacher, self.squared, self.eps)
                    + self.angle_weight * rkd_angle_loss(student, teacher))
        return logits, self.weighted(logits, labels, "kd", loss)
