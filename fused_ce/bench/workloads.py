"""What is benchmarked: the workload descriptions and their input tensors.

A :class:`Workload` is a plain, picklable description (logits shape, dtype and
loss options); :func:`make_inputs` turns it into tensors. Suites are lists of
workloads chosen per device: the CPU sizes keep a full run tractable on a
small machine, the CUDA sizes are the real ones (a 16k x 128k bf16 LM head).

LM-head workloads (family "linear", ``hidden > 0``) benchmark the head and the
loss together: their inputs are hidden states ``(N, hidden)`` and one
``(C, hidden)`` linear weight instead of logits; ``shape`` is still the shape
of the logits, which the implementations may or may not materialise.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence

import torch

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
}
SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass(frozen=True)
class Workload:
    """One cross-entropy problem: logits of ``shape`` (class axis 1) and loss options."""

    name: str
    family: str  # "lm", "classifier", "segmentation", "linear" or "custom"
    shape: tuple
    dtype: str  # short name, a key of DTYPES
    label_smoothing: float = 0.0
    ignore_index: int = -100
    ignore_fraction: float = 0.0  # fraction of targets replaced by ignore_index
    weighted: bool = False  # random per-class weights in the input's dtype
    reduction: str = "mean"
    z_loss: float = 0.0  # the large-vocabulary options of fused_ce.cross_entropy
    softcap: Optional[float] = None
    inplace_backward: bool = False
    hidden: int = 0  # > 0: an LM-head ("linear") workload, hidden states (N, hidden) @ weight (C, hidden)^T
    # Logits stored class axis last, (N, d1, ..., C), and passed as their (N, C, d1, ...) view:
    # F.cross_entropy(logits.transpose(1, 2), target) of a sequence model's (B, T, V) logits.
    class_last: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def classes(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def logits_bytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize

    @property
    def target_shape(self) -> tuple:
        return (self.shape[0],) + tuple(self.shape[2:])

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def options_str(self) -> str:
        """The non-default loss options, e.g. ``label_smoothing=0.1``; "-" when none."""
        parts = [f"LM head, hidden {self.hidden}"] if self.hidden else []
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing:g}")
        if self.ignore_fraction:
            parts.append(f"ignore_index={self.ignore_index} ({self.ignore_fraction:.0%} ignored)")
        if self.weighted:
            parts.append("weight")
        if self.reduction != "mean":
            parts.append(f"reduction={self.reduction}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss:g}")
        if self.softcap:
            parts.append(f"softcap={self.softcap:g}")
        if self.inplace_backward:
            parts.append("inplace_backward")
        return ", ".join(parts) or "-"

    @property
    def has_llm_options(self) -> bool:
        """Whether the workload uses options that F.cross_entropy does not have."""
        return bool(self.z_loss or self.softcap or self.inplace_backward)

    def llm_kwargs(self) -> dict:
        """The keyword-only options of fused_ce.cross_entropy for this workload."""
        return dict(z_loss=self.z_loss, softcap=self.softcap, inplace_backward=self.inplace_backward)

    def loss_kwargs(self, weight: Optional[torch.Tensor]) -> dict:
        """Keyword arguments of F.cross_entropy for this workload."""
        return dict(weight=weight, ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing)


@dataclass
class Inputs:
    """The tensors of one workload: rotating (logits, target) buffers and a shared weight.

    For LM-head workloads ``logits`` holds the hidden states and ``linear_weight`` the head.
    """

    logits: List[torch.Tensor]
    targets: List[torch.Tensor]
    weight: Optional[torch.Tensor]
    out: torch.Tensor = field(default=None)  # preallocated destination of the copy roofline
    linear_weight: Optional[torch.Tensor] = None  # LM-head workloads: (C, hidden), requires grad

    def __len__(self) -> int:
        return len(self.logits)


def buffer_count(workload: Workload, device: str) -> int:
    """How many input buffers to rotate through so that the data never sits in cache.

    The buffers together cover at least 256 MB, 4x the largest last-level
    cache we expect (32 MiB L3 on the CPU machines we use, 50-60 MiB L2 on
    H100/H200), with at least 2 buffers on the CPU and 3 on CUDA, and at most
    32 on the CPU (tiny CPU workloads are bound by fixed costs anyway) and
    256 on CUDA.
    """
    minimum, maximum = (3, 256) if device == "cuda" else (2, 32)
    needed = math.ceil(256e6 / max(1, workload.logits_bytes))
    return max(minimum, min(maximum, needed))


def make_inputs(workload: Workload, device: str, buffers: int, seed: int = 0) -> Inputs:
    """Random logits (standard normal, times 2), uniform targets, optional ignored targets and weights.

    Generated directly on ``device`` (a 16k x 128k logits tensor is slow to make on a host CPU).
    """
    if workload.hidden:
        return _make_linear_inputs(workload, device, buffers, seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = workload.torch_dtype
    logits, targets = [], []
    for _ in range(buffers):
        if workload.class_last:
            stored = workload.shape[:1] + workload.shape[2:] + workload.shape[1:2]
            x = torch.randn(stored, generator=gen, dtype=dtype, device=device).mul_(2).movedim(-1, 1)
        else:
            x = torch.randn(workload.shape, generator=gen, dtype=dtype, device=device).mul_(2)
        t = torch.randint(0, workload.classes, workload.target_shape, generator=gen, device=device)
        if workload.ignore_fraction:
            mask = torch.rand(workload.target_shape, generator=gen, device=device) < workload.ignore_fraction
            t[mask] = workload.ignore_index
        logits.append(x)
        targets.append(t)
    weight = None
    if workload.weighted:
        weight = (torch.rand(workload.classes, generator=gen, device=device) + 0.5).to(dtype)
    out = torch.empty_like(logits[0])
    return Inputs(logits, targets, weight, out)


def _make_linear_inputs(workload: Workload, device: str, buffers: int, seed: int) -> Inputs:
    """LM-head workloads: rotating hidden states (standard normal) and targets, one linear
    weight that requires grad (a trained head), scaled so that the logits are about standard
    normal times 2 like the other workloads'."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = workload.torch_dtype
    (n, classes), hidden = workload.shape, workload.hidden
    xs, targets = [], []
    for _ in range(buffers):
        xs.append(torch.randn((n, hidden), generator=gen, dtype=dtype, device=device))
        t = torch.randint(0, classes, (n,), generator=gen, device=device)
        if workload.ignore_fraction:
            t[torch.rand((n,), generator=gen, device=device) < workload.ignore_fraction] = workload.ignore_index
        targets.append(t)
    head = torch.randn((classes, hidden), generator=gen, dtype=dtype, device=device)
    head = head.mul_(2 / math.sqrt(hidden)).requires_grad_()
    weight = None
    if workload.weighted:
        weight = (torch.rand(classes, generator=gen, device=device) + 0.5).to(dtype)
    return Inputs(xs, targets, weight, torch.empty_like(xs[0]), linear_weight=head)


def _linear(vocab_label: str, n: int, v: int, hidden: int, dtype: str) -> Workload:
    return Workload(f"linear-{vocab_label}-{dtype}", "linear", (n, v), dtype, hidden=hidden)


# --------------------------------------------------------------------------- suites


def _lm(vocab_label: str, n: int, v: int, dtype: str) -> Workload:
    return Workload(f"lm-{vocab_label}-{dtype}", "lm", (n, v), dtype)


def _variants(base_n: int, v: int, dtype: str) -> List[Workload]:
    """The option variants, on a 32k vocabulary: label smoothing, ignored targets, class
    weights, and the large-vocabulary options (z-loss with softcap, the in-place gradient)."""
    return [
        Workload(f"lm-32k-{dtype}-smooth", "lm", (base_n, v), dtype, label_smoothing=0.1),
        Workload(f"lm-32k-{dtype}-ignore", "lm", (base_n, v), dtype, ignore_fraction=0.25),
        Workload(f"lm-32k-{dtype}-weight", "lm", (base_n, v), dtype, weighted=True),
        Workload(f"lm-32k-{dtype}-zloss-softcap", "lm", (base_n, v), dtype, z_loss=1e-4, softcap=30.0),
        Workload(f"lm-32k-{dtype}-inplace", "lm", (base_n, v), dtype, inplace_backward=True),
    ]


def cpu_suite() -> List[Workload]:
    """Full CPU run: each logits tensor is 64-512 MB so that eager stays around a second a step."""
    return [
        _lm("32k", 4096, 32000, "fp32"),
        _lm("32k", 2048, 32000, "bf16"),
        _lm("128k", 512, 128256, "fp32"),
        _lm("128k", 1024, 128256, "bf16"),
        _lm("256k", 256, 256000, "fp32"),
        _lm("256k", 512, 256000, "bf16"),
        *_variants(2048, 32000, "fp32"),
        Workload("cls-10-fp32", "classifier", (262144, 10), "fp32"),
        Workload("cls-10-bf16", "classifier", (262144, 10), "bf16"),
        # A training-sized batch, where fixed per-call costs (Python, autograd) dominate.
        Workload("cls-10-fp32-batch256", "classifier", (256, 10), "fp32"),
        Workload("cls-1000-fp32", "classifier", (16384, 1000), "fp32"),
        Workload("cls-1000-bf16", "classifier", (16384, 1000), "bf16"),
        Workload("seg-21-fp32", "segmentation", (8, 21, 128, 128), "fp32"),
        Workload("seg-21-bf16", "segmentation", (8, 21, 128, 128), "bf16"),
        Workload("seg-21-fp32-ignore", "segmentation", (8, 21, 128, 128), "fp32",
                 ignore_index=255, ignore_fraction=0.1),
        _linear("32k", 8192, 32000, 256, "fp32"),  # the LM head of the issue: logits 1 GB
    ]


def cpu_quick_suite() -> List[Workload]:
    """A couple of minutes on a 2-core CPU: one of each family, smaller sizes."""
    return [
        _lm("32k", 1024, 32000, "fp32"),
        _lm("32k", 1024, 32000, "bf16"),
        Workload("lm-32k-fp32-smooth", "lm", (512, 32000), "fp32", label_smoothing=0.1),
        Workload("cls-10-fp32", "classifier", (65536, 10), "fp32"),
        Workload("cls-1000-fp32", "classifier", (4096, 1000), "fp32"),
        Workload("seg-21-fp32", "segmentation", (4, 21, 64, 64), "fp32"),
    ]


def cuda_suite() -> List[Workload]:
    """Full CUDA run at the sizes people train with."""
    return [
        _lm("32k", 8192, 32000, "fp32"),
        _lm("32k", 16384, 32000, "bf16"),
        _lm("32k", 16384, 32000, "fp16"),
        _lm("128k", 16384, 128256, "bf16"),
        _lm("128k", 4096, 128256, "fp32"),
        _lm("256k", 8192, 256000, "bf16"),
        *_variants(16384, 32000, "bf16"),
        Workload("cls-10-fp32", "classifier", (65536, 10), "fp32"),
        Workload("cls-10-bf16", "classifier", (65536, 10), "bf16"),
        Workload("cls-1000-fp32", "classifier", (65536, 1000), "fp32"),
        Workload("cls-1000-bf16", "classifier", (65536, 1000), "bf16"),
        Workload("seg-21-fp32", "segmentation", (8, 21, 512, 512), "fp32"),
        Workload("seg-21-fp16", "segmentation", (8, 21, 512, 512), "fp16"),
        Workload("seg-21-fp32-ignore", "segmentation", (8, 21, 512, 512), "fp32",
                 ignore_index=255, ignore_fraction=0.1),
        _linear("32k", 8192, 32000, 256, "fp32"),
        _linear("128k", 8192, 128256, 4096, "bf16"),  # a Llama-3-8B head: logits 2.1 GB
        # A Gemma-2-2B head with its final-logit softcap: logits 2.1 GB
        Workload("linear-256k-bf16-softcap", "linear", (4096, 256000), "bf16", hidden=2304, softcap=30.0),
    ]


def cuda_quick_suite() -> List[Workload]:
    return [
        _lm("32k", 8192, 32000, "fp32"),
        _lm("128k", 16384, 128256, "bf16"),
        Workload("lm-32k-bf16-smooth", "lm", (8192, 32000), "bf16", label_smoothing=0.1),
        Workload("cls-10-fp32", "classifier", (65536, 10), "fp32"),
        Workload("cls-1000-bf16", "classifier", (65536, 1000), "bf16"),
        Workload("seg-21-fp32", "segmentation", (8, 21, 128, 128), "fp32"),
    ]


def suite(device: str, quick: bool) -> List[Workload]:
    if device == "cuda":
        return cuda_quick_suite() if quick else cuda_suite()
    return cpu_quick_suite() if quick else cpu_suite()


# --------------------------------------------------------------------------- selection


def parse_shapes(spec: str, default_dtype: str = "fp32") -> List[Workload]:
    """Custom workloads from ``--shapes``: comma-separated ``NxC[xHxW...][:dtype]``.

    Example: ``4096x32000:bf16,8x21x128x128``. Option variants come from the
    loss-option flags of the command line and are applied afterwards.
    """
    workloads = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        dims, _, dtype = item.partition(":")
        dtype = dtype or default_dtype
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} in --shapes item {item!r}; "
                             f"use one of {sorted(set(SHORT_DTYPE.values()))}")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise ValueError(f"cannot parse --shapes item {item!r}; expected e.g. 4096x32000:bf16") from None
        if len(shape) < 2 or min(shape) <= 0:
            raise ValueError(f"--shapes item {item!r} needs at least (N, C), all positive")
        short = SHORT_DTYPE[DTYPES[dtype]]
        family = "classifier" if len(shape) == 2 else "segmentation"
        workloads.append(Workload(f"{'x'.join(map(str, shape))}-{short}", family, shape, short))
    return workloads


def with_options(workloads: Sequence[Workload], label_smoothing: Optional[float] = None,
                 ignore_fraction: Optional[float] = None, weighted: bool = False,
                 reduction: Optional[str] = None, class_last: bool = False) -> List[Workload]:
    """Apply command-line loss options to every workload (renaming them so results stay distinct)."""
    out = []
    for w in workloads:
        changes, tags = {}, []
        if class_last and len(w.shape) > 2 and not w.hidden:
            changes["class_last"] = True
            tags.append("class-last")
        if label_smoothing is not None:
            changes["label_smoothing"] = label_smoothing
            tags.append(f"ls{label_smoothing:g}")
        if ignore_fraction is not None:
            changes["ignore_fraction"] = ignore_fraction
            tags.append(f"ign{ignore_fraction:g}")
        if weighted:
            changes["weighted"] = True
            tags.append("w")
        if reduction is not None:
            changes["reduction"] = reduction
            if reduction != "mean":
                tags.append(reduction)
        name = w.name + "".join(f"-{t}" for t in tags)
        out.append(replace(w, name=name, **changes))
    return out


def select(workloads: Sequence[Workload], patterns: Sequence[str]) -> List[Workload]:
    """Workloads whose name matches any pattern: a glob (``lm-*-bf16``) or a plain substring."""
    if not patterns:
        return list(workloads)

    def matches(name: str, pattern: str) -> bool:
        if any(c in pattern for c in "*?["):
            return fnmatch.fnmatchcase(name, pattern)
        return pattern in name

    return [w for w in workloads if any(matches(w.name, p) for p in patterns)]
