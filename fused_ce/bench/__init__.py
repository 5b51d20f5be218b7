"""Benchmark harness of fused_ce: ``python -m fused_ce.bench --help``.

Compares, on every workload and in every mode, fused_ce with eager
``F.cross_entropy``, ``torch.compile(F.cross_entropy)``, the copy of the
logits (the roofline) and the GPU peers that are installed. See
benchmarks/README.md for what is measured and how to read it.

Modules, one role each: ``workloads`` (what), ``impls`` (who), ``steps``
(the measured modes), ``timing`` (how long), ``memory`` (how much),
``parity`` (same result?), ``runner`` (the loop), ``report`` and ``plot``
(the outputs), ``environment`` (metadata), ``cli`` (the command line).
"""
