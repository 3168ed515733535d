"""Cut an ONNX graph to what TFLite can represent, before onnx2tf sees it (pure, over ModelProto).

scikit-learn classifiers exported by skl2onnx answer twice: a ``label`` (``ArgMax`` then the
``ai.onnx.ml`` operator ``ArrayFeatureExtractor`` over the class list) and the probabilities,
often wrapped in a ``ZipMap`` (a sequence of maps). TFLite has neither ``ai.onnx.ml`` operators
nor maps, and onnx2tf fails on them. The probabilities are what the device needs (the label is
their argmax), so:

- an output produced by ``ZipMap`` keeps its name but becomes the probability tensor the ZipMap
  reads (through an ``Identity``), so clients still ask for ``output_probability``;
- an output that depends on any ``ai.onnx.ml`` node is dropped;
- the nodes, initializers and value infos no output needs any more are removed, and the
  ``ai.onnx.ml`` opset import too when nothing uses it.

A graph needing none of this is returned unchanged. When an ``ai.onnx.ml`` node would remain (a
tree ensemble, say), or no output is left, the model cannot become a ``.tflite`` and
:class:`ModelLoadError` says which node or output is the reason.
"""

from __future__ import annotations

import onnx
from onnx import ModelProto, NodeProto, ValueInfoProto

from model_tools.errors import ModelLoadError

__all__ = ["ML_DOMAIN", "cut_for_tflite"]

ML_DOMAIN = "ai.onnx.ml"


def _needed(graph: onnx.GraphProto, outputs: list[str]) -> list[NodeProto]:
    """The nodes the ``outputs`` depend on, in graph order."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    keep: set[int] = set()
    stack = [producer[o] for o in outputs if o in producer]
    while stack:
        i = stack.pop()
        if i in keep:
            continue
        keep.add(i)
        stack.extend(producer[x] for x in graph.node[i].input if x in producer)
    return [n for i, n in enumerate(graph.node) if i in keep]


def _value_info(model: ModelProto, name: str, label: str) -> ValueInfoProto:
    """The type and shape of tensor ``name``, from the graph or from shape inference."""
    known = [*model.graph.value_info, *model.graph.output, *model.graph.input]
    found = next((v for v in known if v.name == name and v.type.HasField("tensor_type")), None)
    if found is None:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ModelLoadError(f"{label}: cannot infer the type of tensor {name!r}: "
                                 f"{exc}") from exc
        found = next((v for v in inferred.graph.value_info if v.name == name), None)
    if found is None or not found.type.HasField("tensor_type"):
        raise ModelLoadError(f"{label}: the type of tensor {name!r} (read by a ZipMap) is "
                             "unknown; expected a float tensor [N, classes]")
    out = ValueInfoProto()
    out.CopyFrom(found)
    return out


def cut_for_tflite(model: ModelProto, label: str = "model") -> tuple[ModelProto, tuple[str, ...]]:
    """``model`` cut to the outputs TFLite can produce, and what was changed (one note each).

    Raises:
        ModelLoadError: no output would be left, or an ``ai.onnx.ml`` node is still needed.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    if not any(n.domain == ML_DOMAIN for n in _needed(graph, [o.name for o in graph.output])):
        return model, ()
    keep: list[ValueInfoProto] = []  # kept outputs as they are
    zipmaps: list[tuple[str, str]] = []  # (output name, the tensor its ZipMap reads)
    notes: list[str] = []
    for out in graph.output:
        node = producer.get(out.name)
        if node is not None and node.domain == ML_DOMAIN and node.op_type == "ZipMap":
            zipmaps.append((out.name, node.input[0]))
            notes.append(f"output {out.name!r} is now the float tensor its ZipMap read "
                         f"({node.input[0]!r}), not a sequence of maps: TFLite has no maps")
            continue
        used = sorted({n.op_type for n in _needed(graph, [out.name])
                       if n.domain == ML_DOMAIN})
        if used:
            notes.append(f"output {out.name!r} dropped: it is computed by {ML_DOMAIN} "
                         f"operators ({', '.join(used)}), which TFLite does not have")
            continue
        keep.append(out)
    if not keep and not zipmaps:
        ops = sorted({n.op_type for n in graph.node if n.domain == ML_DOMAIN})
        raise ModelLoadError(f"{label}: every output needs {ML_DOMAIN} operators "
                             f"({', '.join(ops)}), which TFLite does not have; nothing would be "
                             "left to convert: export the model with standard ONNX operators")
    nodes = _needed(graph, [v.name for v in keep] + [read for _, read in zipmaps])
    left = [n for n in nodes if n.domain == ML_DOMAIN]
    if left:
        raise ModelLoadError(
            f"{label}: node {left[0].name or left[0].output[0]!r} ({ML_DOMAIN} "
            f"{left[0].op_type}) is needed by the outputs TFLite can keep, and TFLite has no "
            f"{ML_DOMAIN} operators; export the model with standard ONNX operators")
    for name, read in zipmaps:
        tensor = _value_info(model, read, label)
        tensor.name = name
        keep.append(tensor)
        nodes.append(onnx.helper.make_node("Identity", [read], [name], name=f"{name}_unzipped"))
    order = {o.name: i for i, o in enumerate(graph.output)}
    keep.sort(key=lambda v: order[v.name])
    cut = ModelProto()
    cut.CopyFrom(model)
    used_names = {x for n in nodes for x in (*n.input, *n.output)} | {v.name for v in keep}
    del cut.graph.node[:]
    cut.graph.node.extend(nodes)
    del cut.graph.output[:]
    cut.graph.output.extend(keep)
    inits = [i for i in graph.initializer if i.name in used_names]
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(inits)
    infos = [v for v in graph.value_info if v.name in used_names]
    del cut.graph.value_info[:]
    cut.graph.value_info.extend(infos)
    opsets = [o for o in model.opset_import if o.domain != ML_DOMAIN]
    del cut.opset_import[:]
    cut.opset_import.extend(opsets)
    return cut, tuple(notes)
