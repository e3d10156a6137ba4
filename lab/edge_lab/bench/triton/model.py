"""Triton python-backend model: one onnxruntime session per Triton model instance.

This file is copied into a Triton model repository as ``<model>/1/model.py`` by
:func:`edge_lab.bench.triton.server.write_model_repository` and runs inside Triton's
``triton_python_backend_stub`` process, not inside edge-agent: it imports only numpy, onnxruntime
and ``triton_python_backend_utils`` (which the stub provides), never ``agent``.

Everything it needs comes from its ``config.pbtxt``: the ONNX file from the ``onnx_path``
parameter, input and output names from the ``input`` / ``output`` sections.

The session is set up exactly as edge-agent's own onnxruntime backend sets up its sessions, so the
comparison measures the serving systems, not two differently tuned runtimes: one intra-op and one
inter-op thread with spinning off (onnxruntime's default pool spins waiting for work and, on two
shared cores, steals the cores the other instances need), sequential execution, all graph
optimisations, CPU execution provider. Concurrency comes from Triton's ``instance_group`` count:
each instance is its own stub process with its own session.
"""

import json

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Runs a whole dynamic batch (several requests) as one onnxruntime call."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        onnx_path = params.get("onnx_path")
        if not onnx_path:
            raise pb_utils.TritonModelException(
                f"model {args['model_name']!r}: config.pbtxt has no 'onnx_path' parameter"
            )
        self.input_names = [entry["name"] for entry in config["input"]]
        self.output_names = [entry["name"] for entry in config["output"]]

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(onnx_path, sess_options=options, providers=["CPUExecutionProvider"])

        session_inputs = {i.name for i in self.session.get_inputs()}
        session_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self.input_names if n not in session_inputs]
        missing += [n for n in self.output_names if n not in session_outputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"model {args['model_name']!r}: {onnx_path} has no tensor(s) {missing}; "
                f"its inputs are {sorted(session_inputs)}, outputs {sorted(session_outputs)}"
            )

    def execute(self, requests):
        """One response per request, in order. A failure answers every request of this batch with a
        TritonError instead of raising, so the instance keeps serving."""
        try:
            counts = []
            feeds = {}
            for name in self.input_names:
                arrays = [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for request in requests]
                if not counts:
                    counts = [a.shape[0] for a in arrays]
                # One request (the common unloaded case): hand the array over without a copy.
                feeds[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            results = self.session.run(self.output_names, feeds)
        except Exception as exc:  # noqa: BLE001 - any failure becomes an error response
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]

        bounds = np.cumsum(counts)[:-1]
        per_output = [np.split(result, bounds, axis=0) for result in results]
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(parts[index]))
                    for name, parts in zip(self.output_names, per_output)
                ]
            )
            for index in range(len(requests))
        ]

    def finalize(self):
        self.session = None
