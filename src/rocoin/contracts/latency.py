"""The latency model of SPEC.md §3: ``t(d, s, k) = c_s / f_d + 32·|P_k| / r_d (+ input_bits / b_d)``.

A student that sends a feature map (detection: ``|P_k| × h × w`` at the split point) sends
``bits_per_filter = h·w·(32 or 16)`` bits per filter instead of 32 (issue 15)."""

from __future__ import annotations

import numpy as np

#: A device sends back its partition's pooled outputs as float32 values.
BITS_PER_VALUE = 32


def device_latency_s(
    flops: np.ndarray | float,
    rate_bps: np.ndarray | float,
    input_s: np.ndarray | float,
    student_flops: np.ndarray | float,
    partition_size: np.ndarray | int,
    bits_per_filter: np.ndarray | int = BITS_PER_VALUE,
) -> np.ndarray:
    """Time for a device to receive the input, run the student and send its partition back:
    ``bits_per_filter`` bits for each of the ``|P_k|`` filters (32: one pooled float32).

    All arguments broadcast against each other (numpy rules).
    """
    return (
        np.asarray(student_flops, dtype=float) / np.asarray(flops, dtype=float)
        + np.asarray(bits_per_filter, dtype=float) * np.asarray(partition_size, dtype=float) / np.asarray(rate_bps, dtype=float)
        + np.asarray(input_s, dtype=float)
    )
