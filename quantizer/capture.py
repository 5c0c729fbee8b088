"""What each decoder layer is fed: the tensors outside the layers streamed into the
checkpoint, layer 0's calibration inputs and every layer's other inputs (position embeddings,
masks) caught from one pass of the model, a layer materialised from the shards, and the
Hessian H = Σ x xᵀ of a sublayer's inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import Tensor, nn

from .activations import Activations
from .errors import UserError
from .gptq import Hessian
from .job import Run
from .model_walk import StopForward, beside_text_decoder
from .source import SourceModel


class LayerInputs:
    """Catches what the model feeds each decoder layer: layer 0's hidden states (handed to
    ``on_hidden`` batch by batch), every layer's kwargs (from the first batch)."""

    def __init__(self, layers: nn.ModuleList, on_hidden: Callable[[Tensor], None]) -> None:
        self.layers = layers
        self.on_hidden = on_hidden
        self.kwargs: list[dict] = [{} for _ in layers]
        self.first_batch = True

    def capture(self, model: nn.Module, batches: list[Tensor], device: torch.device) -> None:
        originals = list(self.layers)
        catchers = [_Catcher(layer, i, self) for i, layer in enumerate(originals)]
        for i, c in enumerate(catchers):
            self.layers[i] = c
        try:
            with torch.no_grad():
                for b, ids in enumerate(batches):
                    self.first_batch = b == 0  # kwargs are read from the first batch only
                    try:
                        model(input_ids=ids.to(device), use_cache=False)
                    except StopForward:
                        pass
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module, index: int, sink: LayerInputs) -> None:
        super().__init__()
        self.layer, self.index, self.sink = layer, index, sink

    def __getattr__(self, name: str):
        """The model may read attributes of its layers (e.g. attention_type)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if args:
            raise UserError("decoder layers called with positional arguments beyond hidden_states")
        if self.index == 0:
            self.sink.on_hidden(hidden_states)
        if self.sink.first_batch:
            kwargs.pop("past_key_values", None)
            self.sink.kwargs[self.index] = kwargs
        if self.index == len(self.sink.layers) - 1 or not self.sink.first_batch:
            raise StopForward
        return hidden_states


def layer_forward(layer: nn.Module, x: Tensor, kwargs: dict) -> Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def load_layer(
    src: SourceModel,
    layer: nn.Module,
    prefix: str,
    device,
    dtype,
    keep: set[str],
    blocks: dict[str, list[tuple[str, int, int, int]]] | None = None,
) -> dict[str, Tensor]:
    """Materialise the layer from the shards, one tensor at a time; returns the tensors named
    in ``keep`` as stored (the others are dropped as soon as the module holds them).

    ``blocks``: fused experts parameters (names relative to the layer) -> their stored linears
    as (checkpoint key, expert, first row, end row). A parameter whose checkpoint tensors are
    exactly those keys (the hub layout: one tensor per expert linear) is filled block by block
    in ``dtype``, so the layer never holds more than it plus one expert linear; transformers'
    conversion would first stack and concatenate every expert's tensor in the checkpoint's
    dtype (at 128 experts, ~2 GB beside the layer). Either way the same values."""
    kept = {}
    for p, param in layer.named_parameters():
        name = f"{prefix}.{p}"
        parts = (blocks or {}).get(p)
        if parts and src.keys_of(name) == {key for key, *_ in parts}:
            t = torch.empty(param.shape, dtype=dtype, device=device)
            for key, e, a, b in parts:
                t[e, a:b].copy_(fits_dtype(key, src.get_finite_key(key), dtype))
            set_module_tensor_to_device(layer, p, device, value=t, dtype=dtype)
            del t
            continue
        t = fits_dtype(name, src.get_finite(name), dtype)
        set_module_tensor_to_device(layer, p, device, value=t, dtype=dtype)
        if name in keep:
            kept[name] = t
    return kept


def fits_dtype(name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t``, refused if the compute dtype cannot hold its values (|w| ≥ 65520 would become
    Inf in float16, and the layer's outputs NaN)."""
    if t.is_floating_point() and torch.finfo(dtype).max < torch.finfo(t.dtype).max:
        if bool(torch.isinf(t.to(dtype)).any()):
            raise UserError(
                f"tensor {name}: values up to |w| = {float(t.abs().max()):.3g} exceed what "
                f"--dtype {str(dtype).removeprefix('torch.')} can represent (at most "
                f"{torch.finfo(dtype).max:.0f}); use --dtype float32 or bfloat16"
            )
    return t


def outer_tensors(run: Run, start: int, acts: Activations | None) -> list[dict]:
    """Stream the tensors outside the decoder layers into the checkpoint (a fresh run), one at
    a time, and capture the calibration inputs of layer 0 into ``acts`` and every layer's
    kwargs; a resumed run reads only the embeddings and captures only the kwargs."""
    job, model, src = run.job, run.model, run.src
    # What runs before layer 0 (embeddings, rotary): outside the layer stack and the head, and
    # outside a multimodal wrapper's towers and projectors (text calibration never runs them).
    needed = set()
    if acts is not None and start < len(run.layers):
        unused = [run.layers_name, *beside_text_decoder(model, run.layers_name)]
        unused += [run.head_name] if run.head_name else []
        needed = {
            name
            for name, _ in model.named_parameters()
            if not any(name.startswith(u + ".") for u in unused)
        }
    missing = sorted(needed - set(run.outer_names))
    if missing:
        raise UserError(f"tensor {missing[0]} is missing from {job.model}")
    for name in run.outer_names:
        if start == 0 or name in needed:
            t = src.get_finite(name)
            if name in needed:
                fits_dtype(name, t, run.dtype)
            if start == 0:  # under the checkpoint's names (SourceModel.as_stored)
                run.writer.add(src.as_stored(run.model, {name: t}))
            if name in needed:
                set_module_tensor_to_device(model, name, run.device, value=t, dtype=run.dtype)
            del t
    if not needed:
        return [{} for _ in run.layers]
    batches = list(run.windows.split(job.batch_size))
    if start > 0:  # resumed: the inputs come from the saved state, the kwargs from one batch
        sink = LayerInputs(run.layers, on_hidden=lambda x: None)
        batches = batches[:1]
    else:
        sink = LayerInputs(run.layers, on_hidden=acts.append)
    sink.capture(model, batches, run.device)
    for name in needed:  # the embeddings are not needed again: free them
        set_module_tensor_to_device(model, name, "meta")
    return sink.kwargs


def hessian(
    layer: nn.Module, first: nn.Linear, acts: Activations, kwargs: dict, device
) -> Hessian:
    """H of the group's shared input, on ``device``: run the layer up to that sublayer for
    every batch."""
    h = Hessian(first.in_features, device)

    def hook(_m, args):
        h.add_batch(args[0])
        raise StopForward

    handle = first.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for x in acts:
                try:
                    layer_forward(layer, x, kwargs)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return h

