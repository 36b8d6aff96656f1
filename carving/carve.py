"""``carve``: run a callable on the reference under the tracer and publish the store."""

from __future__ import annotations

import datetime
import gc
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tapml.core import __version__, tensors_in

from .store import StoreError, StoreWriter
from .tracer import CarveError, CarveOptions, Tracer

__all__ = ["carve", "CarveResult", "ModelRaised"]


class ModelRaised(Exception):
    """The user's model (or workload) raised while being carved; nothing was written."""


@dataclass
class CarveResult:
    path: Path
    ops: int
    layers: int
    steps: int
    bytes_stored: int
    truncated: str | None
    output: Any


def carve(
    model: torch.nn.Module,
    run: Callable[[], Any],
    out: str | os.PathLike,
    *,
    force: bool = False,
    options: CarveOptions | None = None,
    model_info: dict | None = None,
    on_op: Callable[[int], None] | None = None,
    shard_bytes: int = 64 << 20,
    reference: dict | None = None,
) -> CarveResult:
    """Carve ``run()`` (which calls ``model``) into a fixture store at ``out``.

    The store appears at ``out`` only if the run finished; otherwise nothing is left. ``reference``
    names the platform and device the run happened on (default: PyTorch on the CPU).
    """
    options = options or CarveOptions()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a carve allocates many small records: cyclic GC passes over them (while they live) only cost time
    try:
        path, tracer, writer, output = _carve(model, run, out, force, options, model_info, on_op, shard_bytes,
                                              reference)
        result = CarveResult(path, len(tracer.ops), len(tracer.layers), len(tracer.steps),
                             writer.bytes_stored, tracer.truncated, output)
        del tracer, writer  # freed by reference counting before the collector is back
        return result
    finally:
        if gc_was_enabled:
            gc.enable()


def _carve(model, run, out, force, options, model_info, on_op, shard_bytes,
                                              reference):
    with StoreWriter(out, force=force, shard_bytes=shard_bytes) as writer:
        tracer = Tracer(writer, model, options, on_op=on_op)
        rng_state = torch.random.get_rng_state()  # live runs start from here: random ops repeat exactly
        try:
            with torch.no_grad(), tracer:
                output = run()
        except (StoreError, CarveError):
            raise  # the store could not be written (a full disk), or tapml could not record: not the model's fault
        except (Exception, SystemExit) as e:  # a model calling sys.exit() must not end tapml silently
            raise ModelRaised(f"{type(e).__name__}: {e}") from e
        manifest = {
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": {"tapml": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "model": model_info or {"class": type(model).__name__},
            "reference": reference or {"name": "torch-cpu (eager)", "device": "cpu"},
            "options": options.to_json(),
            "truncated": tracer.truncated,
            "rng_state": tracer.objects.add_use(writer.add(rng_state)),
            "stats": {
                "bytes_stored": writer.bytes_stored,
                "bytes_referenced": writer.bytes_referenced,
                "threads": torch.get_num_threads(),
            },
            "steps": tracer.steps,
            "edges": tracer.dataflow.edges,
            "flow": tracer.dataflow.flow,
            "outputs": tracer.producers(tensors_in(output)),
            "returns": tracer.makers(tensors_in(output)),
            "layers": tracer.layers,
            "strings": tracer.strings.items,
            "uses": tracer.objects.uses,
            "ops": tracer.ops,
        }
        # the tracer records schema 2's form as it goes
        path = writer.commit(manifest, compacted=True, floats_exact=tracer.floats_exact)
    return path, tracer, writer, output
