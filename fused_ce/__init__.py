"""fused_ce: a fused log-softmax + NLL cross-entropy for PyTorch.

Drop-in replacements for ``torch.nn.functional.cross_entropy`` and
``torch.nn.CrossEntropyLoss`` backed by C++ (CPU) and CUDA kernels
registered as ``torch.ops.fused_ce.*``.
"""

import torch

# torch 2.4's compiler traced the loss's autograd Function wrongly when logits and probability
# targets both require grad (a wrong gradient of the logits under torch.compile): 2.5 is the
# oldest torch fused_ce runs with (README, "Torch versions").
if torch.torch_version.TorchVersion(torch.__version__) < (2, 5):
    raise ImportError(f"fused_ce needs torch 2.5 or newer, found torch {torch.__version__}")

from . import _vmap, distributed  # noqa: F401,E402  (_vmap registers the batching rules)
from ._ops import built_with_cuda, cpu_capability, supported_cpu_capabilities
from .autograd import CrossEntropyFunction
from .cache import empty_cache, gradient_cache_bytes, set_gradient_cache
from .functional import cross_entropy
from .linear import linear_cross_entropy
from .modules import CrossEntropyLoss
from .patching import patch_torch

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyFunction",
    "CrossEntropyLoss",
    "built_with_cuda",
    "cpu_capability",
    "cross_entropy",
    "distributed",
    "empty_cache",
    "gradient_cache_bytes",
    "linear_cross_entropy",
    "patch_torch",
    "set_gradient_cache",
    "supported_cpu_capabilities",
]
