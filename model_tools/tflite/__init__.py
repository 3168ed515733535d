"""TFLite artifacts: ONNX -> SavedModel (onnx2tf) -> ``.tflite`` (TFLiteConverter), validated here.

TensorFlow and onnx2tf pin versions of numpy, protobuf and onnx that fight the main stack, so
they never enter this process. They live in an isolated *converter environment* (a venv this
package creates and manages, :mod:`model_tools.tflite.env`) and run as a subprocess
(:mod:`model_tools.tflite.worker`, a standalone script that the environment's python executes;
:mod:`model_tools.tflite.build` is the main-process side that prepares its input and reads its
result). Before that, :mod:`model_tools.tflite.graph` cuts what TFLite cannot hold out of the
ONNX graph (scikit-learn's ``ai.onnx.ml`` label, ZipMap). Everything else happens in this
process, exactly as for ONNX artifacts: each ``.tflite`` runs with ai-edge-litert, the agent's
own TFLite runtime (:mod:`model_tools.tflite.run`), against the source model in onnxruntime, and
the same pure policy decides.

Importing this package or any of its modules but the worker imports neither TensorFlow nor
onnx2tf (tests/model_tools/test_tflite_convert.py refuses them with an import hook while it
converts), and ai-edge-litert only when a ``.tflite`` is first read.
"""
