"""distclip's benchmarks, as a package of scripts over shared modules.

Scripts (each runs as a file, ``torchrun --standalone --nproc_per_node=2 benchmarks/<script>.py``,
or as a module, ``torchrun ... -m benchmarks.<script>``; see benchmarks/README.md):

- ``bench_clip``: clipping under distributed layouts, distclip beside the alternatives.
- ``bench_grad_norms``: ``distclip.grad_norms`` beside ``get_total_norm``.
- ``agreement_overhead``: what the ranks' agreement check costs per call.
- ``allreduce_size``: one gloo all-reduce by length (the bound on distclip's reduction).
- ``report``: markdown summary and plots from ``bench_clip``'s JSON (no torch needed).

Shared modules:

- ``workloads``: the registry of named workloads (layouts), one builder each.
- ``methods``: the clipping methods timed side by side (distclip, torch, baselines).
- ``measure``: timing (barrier, slowest rank, interleaved rounds, statistics), collectives,
  extra peak memory, host syncs.
- ``phases``: distclip's per-phase breakdown from its ``torch.profiler`` ranges.
- ``env``: process group start-up, threads and the hardware/software record.

Every script has a smoke mode that ``tests/smoke/test_benchmark_smoke.py`` runs in CI.
"""
