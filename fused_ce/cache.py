"""The CPU gradient cache.

On the CPU every step's gradient is as large as the logits, and PyTorch's
allocator hands it out as freshly mapped memory: the operating system zeroes
every page on its first write, which costs about 0.7x the time of copying
the logits on top of the kernel itself. fused_ce therefore keeps the most
recently freed gradient buffer and gives it to the next gradient of the same
byte size, as PyTorch's CUDA caching allocator does on GPUs. Peak memory is
unchanged (the buffer is in use during every step); between steps one
gradient-sized buffer stays allocated. Buffers under 1 MiB are never kept.

``empty_cache()`` frees it; ``set_gradient_cache(False)`` or the environment
variable ``FUSED_CE_GRADIENT_CACHE=0`` turns the cache off. CUDA gradients are
unaffected: they come from PyTorch's own caching allocator.
"""

from . import _C

__all__ = ["empty_cache", "gradient_cache_bytes", "set_gradient_cache"]


def empty_cache() -> None:
    """Frees the cached CPU gradient buffer, if any (like ``torch.cuda.empty_cache()``)."""
    _C.empty_gradient_cache()


def set_gradient_cache(enabled: bool) -> bool:
    """Turns the CPU gradient cache on or off and returns the previous setting.

    Turning it off also frees the cached buffer.
    """
    return _C.set_gradient_cache_enabled(bool(enabled))


def gradient_cache_bytes() -> int:
    """Bytes the CPU gradient cache holds right now (0 or one gradient's size)."""
    return _C.gradient_cache_bytes()
