"""Exporting distilled students to an ONNX bundle (``rocoin export``). Needs torch, onnx and onnxruntime.

The bundle (one ONNX file per group, ``head.onnx`` and ``manifest.json``; see
:mod:`rocoin.contracts.manifest`) is what the runtime serves; the runtime itself needs neither torch
nor this package.
"""

from rocoin.export.onnx_bundle import PARITY_ATOL, PARITY_RTOL, export_bundle

__all__ = ["PARITY_ATOL", "PARITY_RTOL", "export_bundle"]
