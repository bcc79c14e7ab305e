"""Triton Python-backend model: runs a version's ``model.onnx`` through ONNX Runtime.

``ctrstream.models.publish`` copies this file as ``model.py`` into every version directory of a
model's local flavour (``<name>_py``), next to the same ``model.onnx`` the production
flavour (Triton's ONNX Runtime backend) serves. It is not imported by ctrstream itself.

* The Python backend stub starts Python in isolated mode and ignores PYTHONPATH; the site
  directory with numpy 1.26 + onnxruntime comes from ``CTRSTREAM_TRITON_SITE`` (set by
  the local stack for ``tritonserver``).
* Execution provider: CUDA when ONNX Runtime can create a CUDA session (a GPU is present),
  otherwise CPU. Config parameters (``parameters { key: ... }``): ``device`` = ``auto`` |
  ``cpu`` | ``cuda``; ``intra_op_threads`` (0 = ONNX Runtime's default).
* ``execute`` concatenates every request of the call into one ONNX Runtime run and splits
  the output back per request (dynamic batching hands it several requests at once).
"""

import os
import site

for p in filter(None, os.environ.get("CTRSTREAM_TRITON_SITE", "").split(os.pathsep)):
    site.addsitedir(p)

# imported after the site directories above are added: they hold numpy and onnxruntime
import json  # noqa: E402 - see above

import numpy as np  # noqa: E402 - see above
import triton_python_backend_utils as pb_utils  # noqa: E402 - see above


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        self.input_names = [i["name"] for i in cfg["input"]]
        self.output_name = cfg["output"][0]["name"]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(params.get("intra_op_threads", "0") or 0)
        so.log_severity_level = 3
        device = params.get("device", "auto").lower()
        device_id = int(args.get("model_instance_device_id", "0") or 0)
        session = None
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            try:
                sess = ort.InferenceSession(
                    path,
                    sess_options=so,
                    providers=[
                        ("CUDAExecutionProvider", {"device_id": device_id}),
                        "CPUExecutionProvider",
                    ],
                )
                if sess.get_providers()[0] == "CUDAExecutionProvider":
                    session = sess
            except Exception as e:  # no GPU / CUDA libraries: fall back to CPU
                if device == "cuda":
                    raise pb_utils.TritonModelException(
                        f"CUDA requested but unavailable: {e}"
                    ) from e
        if session is None:
            if device == "cuda":
                raise pb_utils.TritonModelException("CUDA requested but unavailable")
            session = ort.InferenceSession(
                path, sess_options=so, providers=["CPUExecutionProvider"]
            )
        self.session = session
        pb_utils.Logger.log_info(
            f"{args['model_name']} v{args['model_version']}: {path} on "
            f"{self.session.get_providers()[0]}"
        )

    def execute(self, requests):
        try:
            cols = [
                [pb_utils.get_input_tensor_by_name(r, n).as_numpy() for r in requests]
                for n in self.input_names
            ]
            sizes = [len(a) for a in cols[0]]
            if len(requests) == 1:
                feed = {n: c[0] for n, c in zip(self.input_names, cols)}
            else:
                feed = {n: np.concatenate(c, axis=0) for n, c in zip(self.input_names, cols)}
            out = self.session.run([self.output_name], feed)[0]
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the error, none is dropped
            err = pb_utils.TritonError(f"inference failed: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        responses = []
        start = 0
        for n in sizes:
            t = pb_utils.Tensor(self.output_name, np.ascontiguousarray(out[start : start + n]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[t]))
            start += n
        return responses

    def finalize(self):
        self.session = None
