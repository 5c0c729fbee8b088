"""Where a ``leanquant`` run's resident memory peaks: the command runs in this process with
its RSS sampled every 10 ms (psutil; torch's CPU tensors are malloc'd memory, which
tracemalloc does not see) and each sample attributed to the quantizer step running then.

    PYTHONPATH=<checkout> python benchmarks/rss_phases.py OUT.json quantize MODEL CKPT ...

The quantizer imported is whatever ``PYTHONPATH`` (or the working directory) gives, so one
script measures an older checkout too (benchmarks/moe.py ``--repo``). Steps are found by name
in ``quantizer.layer_step`` (those an older checkout lacks are left out):

    load layer        load_layer: the decoder layer read from the shards
    Hessian           hessian (dense groups), ExpertFeeds.input_hessian / .hessians (experts)
    factor H          prepare: U = chol(H^-1)^T
    column loop RxC   quantize_weight on an R x C weight (or rows of it)
    pack and check    store_sublayer: packing, the reference dequantizer's check
    writer            CheckpointWriter.add: tensors copied into the writer's buffer
    next inputs       Activations.advance: the calibration inputs through the quantized layer
    other             anything else (model skeleton, embeddings, the head, finalize)

OUT.json: ``peak_rss_bytes`` (the largest sample), ``peak_phase`` (the step it fell in),
``first_layer_rss_bytes`` (RSS as the first decoder layer begins loading: the interpreter,
torch, the model skeleton, the calibration inputs and the writer's buffer of the tensors
outside the layers; the peak above it is what the layers add),
``phases`` (step -> its largest sample), ``ru_maxrss_bytes`` (the kernel's peak of this
process, which samples can miss by up to 10 ms), ``rc`` (the command's exit status).
"""

from __future__ import annotations

import functools
import json
import resource
import sys
import threading
import time
from pathlib import Path

import psutil


def main(argv: list[str]) -> int:
    out, command = Path(argv[0]), argv[1:]
    from leanquant.cli import main as leanquant
    from leanquant_serve.format import checkpoint
    from quantizer import layer_step
    from quantizer.activations import Activations

    stack = ["other"]
    peaks: dict[str, int] = {}
    proc = psutil.Process()
    done = threading.Event()

    def sample() -> None:
        rss, phase = proc.memory_info().rss, stack[-1]
        if rss > peaks.get(phase, 0):
            peaks[phase] = rss

    def sampler() -> None:
        while not done.is_set():
            sample()
            time.sleep(0.01)

    first_layer: list[int] = []  # RSS when the first decoder layer begins loading

    def wrap(owner, name: str, label) -> None:
        f = getattr(owner, name, None)
        if f is None:
            return

        @functools.wraps(f)
        def phased(*args, **kwargs):
            if name == "load_layer" and not first_layer:
                first_layer.append(proc.memory_info().rss)
            stack.append(label(*args, **kwargs) if callable(label) else label)
            sample()
            try:
                return f(*args, **kwargs)
            finally:
                sample()
                stack.pop()

        setattr(owner, name, phased)

    wrap(layer_step, "load_layer", "load layer")
    wrap(layer_step, "hessian", "Hessian")
    wrap(layer_step.ExpertFeeds, "input_hessian", "Hessian")
    wrap(layer_step.ExpertFeeds, "hessians", "Hessian")
    wrap(layer_step, "prepare", "factor H")
    wrap(layer_step, "quantize_weight", lambda W, *a, **k: "column loop {}x{}".format(*W.shape))
    wrap(layer_step, "store_sublayer", "pack and check")
    wrap(checkpoint.CheckpointWriter, "add", "writer")
    wrap(Activations, "advance", "next inputs")
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    try:
        rc = leanquant(command)
    finally:
        done.set()
        thread.join()
    phase = max(peaks, key=peaks.get)
    out.write_text(
        json.dumps(
            {
                "peak_rss_bytes": peaks[phase],
                "peak_phase": phase,
                "first_layer_rss_bytes": first_layer[0] if first_layer else None,
                "phases": dict(sorted(peaks.items(), key=lambda kv: -kv[1])),
                "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "rc": rc,
            },
            indent=1,
        )
    )
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
