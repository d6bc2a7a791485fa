"""The group model of a device: opened with onnxruntime on the CPU, after checking it against the
bundle's manifest, and run on checked batches.

The model file's size and SHA-256 must match the manifest (a tampered or truncated file stops the
worker before it listens), and the model's input and output must have the names and shapes the
manifest promises: a bundle whose files do not match it is refused at start, never at the first
query.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.manifest import GroupModel, verify_file

#: Model runs at start that warm onnxruntime up and time one image.
WARMUP_RUNS = 5
#: The only execution provider a device uses.
EXECUTION_PROVIDER = "CPUExecutionProvider"


class ModelRunner:
    """The onnxruntime session of ``model`` (a group of the bundle at ``bundle``)."""

    def __init__(self, bundle: Path, model: GroupModel, intra_op_threads: int) -> None:
        self.model = model
        self._session = open_session(verify_file(bundle, model), model, intra_op_threads)
        self._input_name = model.input.name
        self._output_name = model.output.name

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The group's features of a checked ``(B, C, H, W)`` float32 batch (blocking)."""
        return self._session.run([self._output_name], {self._input_name: batch})[0]

    def time_one_image(self, runs: int = WARMUP_RUNS) -> float:
        """The median time of a batch-1 run (the first runs also warm onnxruntime up)."""
        x = np.zeros((1, *self.model.input.shape), dtype=np.float32)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            self.run(x)
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]


def open_session(path: Path, model: GroupModel, intra_op_threads: int) -> ort.InferenceSession:
    """An onnxruntime session of the model file at ``path``, or :class:`RocoinError` when it cannot
    be loaded or its input/output does not match ``model`` (the manifest's entry)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=[EXECUTION_PROVIDER])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        detail = " ".join(str(exc).split())[:300]
        raise RocoinError(f"{path}: onnxruntime cannot load the model ({detail}); refusing to serve it") from None
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    for kind, spec, found in (("input", model.input, inputs), ("output", model.output, outputs)):
        if spec.name not in found:
            raise RocoinError(
                f"{path}: the model has no {kind} named {spec.name!r} (it has {sorted(found)}); the manifest does not match it"
            )
        dims = list(found[spec.name].shape)[1:]
        if len(dims) != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(dims, spec.shape)):
            raise RocoinError(
                f"{path}: {kind} {spec.name!r} has shape {found[spec.name].shape}, the manifest says (B, {', '.join(map(str, spec.shape))})"
            )
    return session
