"""A real Triton Inference Server beside edge-agent, for the side-by-side benchmark.

``server`` writes a model repository (python backend running onnxruntime, ``model.py``) and runs
the ``tritonserver`` binary that ships in ``nvidia-pytriton``. That wheel pins numpy < 2, so it
is installed in its own virtualenv (the ``triton`` extra); nothing here is imported by the agent.
"""
from edge_lab.bench.triton.server import (
    TritonError,
    TritonServer,
    TritonSetting,
    find_tritonserver,
    write_model_repository,
)

__all__ = ["TritonError", "TritonServer", "TritonSetting", "find_tritonserver", "write_model_repository"]
