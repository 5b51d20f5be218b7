"""``CrossEntropyLoss``: the nn.Module form of :func:`fused_ce.cross_entropy`."""

import torch
from torch import Tensor

from .functional import cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in replacement for :class:`torch.nn.CrossEntropyLoss`.

    It subclasses PyTorch's module, so the constructor, the ``weight``
    buffer, ``state_dict`` keys and ``repr`` are exactly PyTorch's, and
    ``isinstance(loss, torch.nn.CrossEntropyLoss)`` still holds; only the
    computation is replaced by the fused kernel.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing)
