"""Move checkpoint pieces from mmap'd (pageable) host memory to the GPU through pinned staging buffers.

A host-to-GPU copy from pageable memory runs at a fraction of the bus's speed (the driver stages it through a
pinned bounce buffer of its own, synchronously); from pinned memory it runs at full speed and asynchronously.
So each chunk's pieces are packed into one of two pinned buffers on the CPU, copied to the GPU on a side stream,
and the lerp on the main stream waits only for that copy. While the GPU copies and folds chunk k, the CPU packs
chunk k+1 into the other buffer: reading, copying and folding overlap.
"""

from __future__ import annotations

import torch

# Pieces start at this byte alignment inside a staging buffer, so that every dtype's view of them is aligned.
ALIGN = 64


class PinnedStager:
    """Callable: ``stager(sources, dtype)`` -> the same pieces on the GPU, in ``dtype``, ready on the current stream."""

    def __init__(self, device: torch.device, slots: int = 2) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.done: list[torch.cuda.Event | None] = [None] * slots
        self.turn = 0

    def __call__(self, sources: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        spans, total = [], 0
        for s in sources:
            nbytes = s.numel() * s.element_size()
            spans.append((total, nbytes))
            total += nbytes + (-nbytes % ALIGN)
        slot = self.turn % len(self.buffers)
        self.turn += 1
        done = self.done[slot]
        if done is not None:
            done.synchronize()  # the GPU has finished copying out of this buffer: safe to refill
        buf = self.buffers[slot]
        if buf is None or buf.numel() < total:
            buf = self.buffers[slot] = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=True)
        for s, (start, nbytes) in zip(sources, spans):
            buf[start : start + nbytes].view(s.dtype).copy_(s.reshape(-1))
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            on_gpu = buf[:total].to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.done[slot] = event
        compute.wait_event(event)
        on_gpu.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return [
            on_gpu[start : start + nbytes].view(s.dtype).to(dtype)
            for s, (start, nbytes) in zip(sources, spans)
        ]
