"""CC, correlation congruence (Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019),
in the form OFA-KD's baseline uses (distillers/correlation.py)."""
from typing import Optional, Sequence

from torch import Tensor, nn

from .base import HyperParameter
from .features import FeatureDistiller, require_pairs


def correlation_loss(embedding_student: Tensor, embedding_teacher: Tensor) -> Tensor:
    """With d_i = |s_i - t_i| (elementwise, sample i of the batch): the mean over consecutive samples
    of <d_i, d_{i+1}>, i.e. mean_i sum_c |s_ic - t_ic| |s_(i+1)c - t_(i+1)c| (OFA-KD's
    distillers/correlation.py, from RepDistiller's CC)."""
    delta = (embedding_student.float() - embedding_teacher.float()).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


class CC(FeatureDistiller):
    """Correlation congruence (Peng et al., ICCV 2019), as OFA-KD's baseline: the pooled embeddings of
    the student's and the teacher's final features are each mapped by a linear layer to ``feat_dim``
    and compared with :func:`correlation_loss`, times ``scale``; plus the ground-truth loss.

    Args:
        scale: ``--correlation-scale`` (0.02); feat_dim: ``--correlation-feat-dim`` (128), OFA-KD train.py.
        loss_weights: 'gt' and 'kd' (``--kd-loss-weight``), as distillers/correlation.py.
        input_size, and the rest: see :class:`~ofakd_fast.distill.features.FeatureDistiller`.
    """

    hyper_parameters = (  # defaults: OFA-KD train.py
        HyperParameter("scale", "--correlation-scale", 0.02, "CC: scale of the correlation loss"),
        HyperParameter("feat_dim", "--correlation-feat-dim", 128, "CC: width of the embeddings compared", low=1,
                       kind=int),
    )

    def __init__(self, student: nn.Module, teacher: nn.Module, input_size: Optional[Sequence[int]] = None, **kwargs):
        super().__init__(student, teacher, input_size=input_size, **kwargs)
        # nn.Linear's own init, as distillers/correlation.py's LinearEmbed
        self.embed_s = nn.Linear(self.student_shapes[0], self.feat_dim)
        self.embed_t = nn.Linear(self.teacher_shapes[0], self.feat_dim)

    def forward(self, images: Tensor, labels: Tensor):
        embedding_teacher, _ = self.teacher_features(images)
        logits, embedding, _ = self.student_features(images)
        require_pairs(embedding, type(self).__name__)
        loss = correlation_loss(self.embed_s(embedding), self.embed_t(embedding_teacher))
        return logits, self.weighted(logits, labels, "kd", self.scale * loss)
