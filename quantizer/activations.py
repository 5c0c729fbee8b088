"""Where the calibration activations live between uses: on the compute device, in host
memory or spilled to disk, one tensor per calibration batch.

They are the inputs of the decoder layer being quantized: every Hessian is accumulated
from them and the quantized layer maps them to the next layer's inputs. At 405B they are
nsamples × seqlen × hidden = 128 × 2048 × 16384 values: 8.6 GB in bf16, 17 GB in fp32, so
the choice decides whether a run fits a GPU (``device``), host RAM (``cpu``) or neither
(``disk``: one batch in memory at a time).

Each batch is a tensor in the partial checkpoint folder's ``state-act-<layer>-<batch>``
files when the run records a step (see :class:`~quantizer.journal.JournaledWriter`);
``disk`` keeps them there all along, so resuming costs it no extra write.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .journal import JournaledWriter

PLACES = ("device", "cpu", "disk")


def state_file(layer: int, batch: int) -> str:
    """Name of the state file holding batch ``batch`` of the inputs of layer ``layer``."""
    return f"state-act-{layer:05d}-{batch:05d}.safetensors"


class Activations:
    """The inputs of decoder layer :attr:`layer`, one tensor per calibration batch.

    Batches are stored in ``store_dtype`` at ``place`` and handed out one at a time on
    ``device`` in ``compute_dtype``. ``disk`` writes them durably into ``writer``'s partial
    folder."""

    def __init__(
        self,
        place: str,
        device: torch.device,
        compute_dtype: torch.dtype,
        store_dtype: torch.dtype,
        writer: JournaledWriter | None = None,
    ) -> None:
        if place not in PLACES:
            raise ValueError(f"place must be one of {', '.join(PLACES)}, got {place!r}")
        if place == "disk" and writer is None:
            raise ValueError("disk activations need the checkpoint writer's partial folder")
        self.place, self.device = place, device
        self.compute_dtype, self.store_dtype = compute_dtype, store_dtype
        self.writer = writer
        self.layer = 0
        self._batches: list[Tensor | str] = []  # tensors, or state file names (disk)
        self.nbytes = 0  # of one layer's inputs as stored

    def _store(self, x: Tensor, layer: int, b: int) -> Tensor | str:
        x = x.detach().to(self.store_dtype)
        if self.place == "device":
            return x.to(self.device)
        if self.place == "cpu":
            return x.to("cpu")
        name = state_file(layer, b)
        self.writer.write_state_file(name, {"x": x})
        return name

    def _load(self, item: Tensor | str) -> Tensor:
        if isinstance(item, str):
            item = self.writer.read_state_file(item)["x"]
        return item.to(self.device, self.compute_dtype)

    def append(self, x: Tensor) -> None:
        """Add the next batch of the current layer's inputs (the capture of layer 0)."""
        item = self._store(x, self.layer, len(self._batches))
        self.nbytes += x.numel() * self.store_dtype.itemsize
        self._batches.append(item)

    def __iter__(self) -> Iterator[Tensor]:
        """The batches, each on the compute device in the compute dtype."""
        for item in self._batches:
            yield self._load(item)

    def first(self) -> Tensor:
        return self._load(self._batches[0])

    def advance(self, f: Callable[[Tensor], Tensor], keep: bool = True) -> bool:
        """Replace every batch x by f(x) (the next layer's inputs); False if any is not
        finite. ``keep=False`` (after the last layer) only checks them."""
        finite = True
        for b, item in enumerate(self._batches):
            y = f(self._load(item))
            finite &= bool(torch.isfinite(y).all())
            self._batches[b] = self._store(y, self.layer + 1, b) if keep else item
            del y
        self.layer += 1
        return finite

    # -- resume --------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
        """What a step records: (state files to write, state files already written)."""
        if self.place == "disk":
            return {}, [str(item) for item in self._batches]
        files = {state_file(self.layer, b): {"x": x} for b, x in enumerate(self._batches)}
        return files, []

    def restore(self, layer: int, names: list[str]) -> None:
        """Take the inputs of ``layer`` from the resumed run's state files ``names``."""
        self.layer, self._batches, self.nbytes = layer, [], 0
        for name in names:
            if self.place == "disk":  # stays in its file: only its header is read
                shape = self.writer.state_file_shapes(name)["x"]
                self.nbytes += math.prod(shape) * self.store_dtype.itemsize
                self._batches.append(name)
            else:
                x = self.writer.load_state_file(name)["x"]
                self.nbytes += x.nbytes
                self._batches.append(self._store(x, layer, 0))
