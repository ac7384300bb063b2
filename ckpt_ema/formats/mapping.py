"""Map an open checkpoint file privately: the bytes the readers checked are the bytes the tensors view.

The map is made through the open file's descriptor (``/proc/self/fd/N``), not its name: it is the very file whose
header or directory was just read and checked, even if the name now points elsewhere, and a name that is not
valid UTF-8 (which torch cannot pass on) maps like any other. It is private (copy-on-write): tensors view it as
writable memory and the file is never modified. torch's map closes its own descriptor once mapped, so a run of a
thousand checkpoints (or shards) holds no descriptor per file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import torch

from ckpt_ema.errors import CkptEmaError


def map_privately(f: BinaryIO, path: Path, size: int) -> torch.UntypedStorage:
    """The first ``size`` bytes of the open file ``f`` (named ``path`` in messages) as a private map."""
    by_descriptor = f"/proc/self/fd/{f.fileno()}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{f.fileno()}"
    name = by_descriptor if os.path.exists(by_descriptor) else os.fsdecode(path)
    try:
        # (torch annotates from_file on the storage base class, as returning any storage)
        return torch.UntypedStorage.from_file(name, shared=False, nbytes=size)  # type: ignore[return-value]
    except (RuntimeError, UnicodeEncodeError) as exc:  # the file shrank since it was checked; an unmappable name
        raise CkptEmaError(f"cannot map: {str(exc).strip().splitlines()[0]}", path) from None
