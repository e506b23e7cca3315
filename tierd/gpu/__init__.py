"""The GPU tier's device layer: one small interface (:mod:`tierd.gpu.device`) and its backends.

- :mod:`tierd.gpu.simulated`: memfd slabs, a copy worker that completes LATE, events in a shared
  table. A test and demo tool (CI runs every GPU-tier test on it); ``auto`` never picks it.
- :mod:`tierd.gpu.cuda`: CUDA virtual memory (cuMemCreate with POSIX-fd export), copies on the
  daemon's copy streams, inter-process events. The only daemon module that imports ``cuda``.

Nothing here is imported unless ``gpu_bytes`` > 0 (DESIGN invariant 8).
"""
