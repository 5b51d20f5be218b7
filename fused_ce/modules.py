"""``CrossEntropyLoss``: the nn.Module form of :func:`fused_ce.cross_entropy`."""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in replacement for :class:`torch.nn.CrossEntropyLoss`.

    It subclasses PyTorch's module, so the constructor, the ``weight``
    buffer, ``state_dict`` keys and ``repr`` are exactly PyTorch's, and
    ``isinstance(loss, torch.nn.CrossEntropyLoss)`` still holds; only the
    computation is replaced by the fused kernel.

    The keyword-only options ``z_loss``, ``softcap``, ``return_lse``,
    ``inplace_backward`` and ``validate`` are those of
    :func:`fused_ce.cross_entropy`; they
    are plain attributes (not part of the ``state_dict``).

    A model that holds the module can be scripted with ``torch.jit.script``;
    the scripted module computes PyTorch's ``F.cross_entropy`` (TorchScript
    cannot run the fused path's Python) and refuses ``z_loss``, ``softcap``
    and ``return_lse``.
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average=None,
                 ignore_index: int = -100, reduce=None, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, return_lse: bool = False,
                 inplace_backward: bool = False, validate: bool = False) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.validate = validate

    def forward(self, input: Tensor, target: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if torch.jit.is_scripting():
            # TorchScript cannot compile the fused path's Python (a model that
            # holds this module stays scriptable, as with PyTorch's module):
            # a scripted module computes PyTorch's own cross_entropy.
            if self.z_loss != 0.0 or self.softcap is not None or self.return_lse:
                raise RuntimeError("fused_ce.CrossEntropyLoss: z_loss, softcap and return_lse are not "
                                   "supported in TorchScript")
            return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                   reduction=self.reduction, label_smoothing=self.label_smoothing)
        return self._fused(input, target)

    @torch.jit.unused
    def _fused(self, input: Tensor, target: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap,
                             return_lse=self.return_lse, inplace_backward=self.inplace_backward,
                             validate=self.validate)

    def extra_repr(self) -> str:
        options = {"z_loss": 0.0, "softcap": None, "return_lse": False, "inplace_backward": False,
                   "validate": False}
        return ", ".join(f"{name}={getattr(self, name)!r}" for name, default in options.items()
                         if getattr(self, name) != default)
