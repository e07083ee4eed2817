"""onnxruntime sessions: execution-provider choice and session options, shared by every network the engine runs
(R-Net, C-Net, the face detectors and the face mesh). Imports onnxruntime only: no onnx, no torch.

Providers: CUDA when onnxruntime offers it (the ``onnxruntime-gpu`` wheel) and ``device`` allows it, else CPU.
Threads: ``intra_op_threads`` (0 = onnxruntime's default, one per physical core) and one inter-op thread; spinning
is off by default so idle worker threads do not burn the cores other requests need.
"""

from __future__ import annotations

from typing import Literal

import onnxruntime as ort

from facerecon.errors import FaceReconError

__all__ = ["CPU", "CUDA", "Device", "make_session", "select_providers"]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

Device = Literal["auto", "cpu", "cuda"]


def select_providers(device: Device = "auto") -> list[str]:
    """Execution providers to ask for: ``[CUDA, CPU]`` when CUDA is available and allowed, else ``[CPU]``.

    ``device="cuda"`` without a CUDA-capable onnxruntime raises :class:`FaceReconError` (a configuration error).
    """
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise FaceReconError(
            f"device 'cuda' requested but onnxruntime offers only {available} (install the gpu extra: onnxruntime-gpu)"
        )
    if device != "cpu" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def make_session(
    model: bytes | str,
    *,
    device: Device = "auto",
    intra_op_threads: int = 0,
    allow_spinning: bool = False,
) -> ort.InferenceSession:
    """One sequential onnxruntime session with full graph optimisation on the providers :func:`select_providers`
    picks (``model``: the ONNX bytes or a path). onnxruntime's own exceptions propagate."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(0, int(intra_op_threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=select_providers(device))
