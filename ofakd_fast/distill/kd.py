"""Hinton KD (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015)."""
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BaseDistiller, HyperParameter


class KDDistiller(BaseDistiller):
    """Hinton KD: KL(teacher || student) at temperature T, times T**2, plus the ground-truth loss."""

    reads_teacher_logits_only = True

    default_loss_weights = {"gt": 1.0, "kd": 1.0}
    loss_names = ("loss_gt", "loss_kd")
    hyper_parameters = (HyperParameter("temperature", "--kd-temperature", 1.0, "KD temperature", low_open=True),)

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float = 1.0, **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.temperature = self.hyper_parameters[0].check(temperature, type(self).__name__)

    def forward(self, images: Tensor, labels: Tensor):
        logits_teacher = self.teacher_logits(images)
        logits = self.student(images)
        t = self.temperature
        loss_kd = F.kl_div(F.log_softmax(logits / t, dim=-1), F.log_softmax(logits_teacher / t, dim=-1),
                           reduction="batchmean", log_target=True) * t * t
        return logits, {"loss_gt": self.loss_weights["gt"] * self.gt_loss(logits, labels),
                        "loss_kd": self.loss_weights["kd"] * loss_kd}
