"""A model folder as output (``-o DIR/``): what ``from_pretrained`` or PEFT's loader expects, written atomically.

The folder gets the averaged weights as ``model.safetensors`` (``adapter_model.safetensors`` when the inputs are
PEFT adapters), sharded with a ``.index.json`` above ``--max-shard-size``, plus the files that describe the model,
copied from the newest checkpoint's folder: :data:`MODEL_FILES` (config, generation config, tokenizer,
``adapter_config.json``). Never the trainer's state (optimizer, scheduler, RNG, ``trainer_state.json``): those
belong to the training run, not to the averaged model.

Every file is written under a temporary name in the folder and renamed when all are complete (the weights, then
the model files, then the index): a failure leaves an earlier output as it was, and a folder this run created is
removed again if the run fails before anything is in it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.output.atomic import copy_on_disk
from ckpt_ema.output.sinks import SafetensorsOutput

# The files that describe a model beside its weights, as transformers, tokenizers and PEFT save them.
MODEL_FILES = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "adapter_config.json",
)
MODEL_WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def is_folder_output(output: str | Path) -> bool:
    """``-o DIR/`` (a path ending in a separator) or an existing folder asks for a model folder."""
    text = str(output)
    return text.endswith(("/", os.sep)) or Path(text).expanduser().is_dir()


def check_folder_output(output: str | Path) -> Path:
    """Fail before any work is done when the folder cannot be written where the user asked."""
    folder = Path(output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CkptEmaError("the output is a file, not a folder", folder)
    if not folder.is_dir() and not folder.parent.is_dir():
        raise CkptEmaError("the output folder's parent does not exist", folder)
    if not os.access(folder if folder.is_dir() else folder.parent, os.W_OK):
        raise CkptEmaError("the output folder is not writable", folder)
    return folder


def model_files_of(checkpoint: Path) -> list[Path]:
    """The model files (:data:`MODEL_FILES`) in the folder of the checkpoint at ``checkpoint``: the checkpoint
    itself when it is a folder, else the folder that holds the file."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return [folder / name for name in MODEL_FILES if (folder / name).is_file()]


def weights_name(model_files: Sequence[Path]) -> str:
    """``adapter_model.safetensors`` for PEFT adapters (their folder has an ``adapter_config.json``), else
    ``model.safetensors``: the names the loaders look for."""
    return ADAPTER_WEIGHTS if any(f.name == ADAPTER_CONFIG for f in model_files) else MODEL_WEIGHTS


class FolderOutput(SafetensorsOutput):
    """A :class:`SafetensorsOutput` of ``folder/<weights name>`` that also copies ``model_files`` into the folder,
    committed with the weights."""

    def __init__(self, folder: Path, model_files: Sequence[Path], metadata: Mapping[str, str],
                 max_shard_bytes: int | None = None) -> None:
        super().__init__(folder / weights_name(model_files), metadata, max_shard_bytes)
        self.folder = folder
        self.model_files = list(model_files)
        self._created_folder = False
        self._copies: list[tuple[Path, Path]] = []  # (temporary, final)

    def open(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype], **kwargs: object) -> None:
        if not self.folder.is_dir():
            try:
                self.folder.mkdir(exist_ok=True)  # under torchrun every rank may get here first
            except OSError as exc:
                raise CkptEmaError(f"cannot create the output folder: {exc.strerror or exc}", self.folder) from None
            self._created_folder = True
        super().open(shapes, dtypes, **kwargs)  # type: ignore[arg-type]

    def prepare(self) -> None:
        """The weights' files, and (in the process that writes the index) copies of the model files, complete on
        disk under temporary names."""
        super().prepare()
        if not self._writes_index:
            return
        try:
            for source in self.model_files:
                f, tmp = self._temporary(self.folder / source.name)
                copy_on_disk(source, f, tmp)
                self._copies.append((tmp, self.folder / source.name))
        except OSError as exc:
            raise CkptEmaError(f"cannot copy the model files: {exc.strerror or exc}", self.folder) from None

    def publish_index(self) -> None:
        """The model files, then the index (the commit point of a sharded output)."""
        try:
            for tmp, final in self._copies:
                os.replace(tmp, final)
                self._temporaries.remove(tmp)
        except OSError as exc:
            raise CkptEmaError(f"cannot write the output: {exc.strerror or exc}", self.folder) from None
        self._copies = []
        super().publish_index()

    @property
    def written(self) -> list[Path]:
        return [self.folder / f.name for f in self.model_files] + super().written

    def abort(self) -> None:
        super().abort()
        if self._created_folder and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()
