"""Turns an int8 block-quantised ONNX file into a float32 one that onnxruntime runs.

OpenCV Zoo's YuNet and SFace "int8bq" files keep each weight as int8 values with a scale and
zero point per block (DequantizeLinear with `block_size` and `axis`, opset 21). onnxruntime
refuses them (1.32: "block_size must be 0 for per-tensor quantization" on YuNet's one-block
biases; SFace also lists weights as graph inputs that no initializer fills). So we do the
dequantisation once, in numpy: every DequantizeLinear whose inputs are constants becomes one
float32 initializer named like its output; everything else is kept byte for byte.

Why our own protobuf reader/writer and not the `onnx` package: `onnx` 1.23 requires
protobuf >= 6.31 and ml_dtypes >= 0.5.4, which would upgrade a ComfyUI environment's protobuf
(mediapipe-based nodes pin protobuf < 5). And the float file is checked against a sha256 in
models/manifest.toml, so its bytes must not depend on which protobuf runtime serialised them:
here they depend only on this file. An ONNX file is plain protobuf; we touch four messages.

Also done, because onnxruntime needs it and it changes no number:
- graph inputs that are initializers (SFace: BatchNorm parameters, the mean/scale scalars) are
  dropped from the input list, so onnxruntime treats them as constants and folds them;
- graph inputs that no node reads (SFace's original weights) are dropped;
- the image input's height and width become symbolic, since YuNet runs at any size that is a
  multiple of 32 (its Resize uses scales and its Reshapes -1, as OpenCV runs it).

And one change for speed that gives the same numbers: each PRelu(x, slope) is written as
Relu(x) + slope * Min(x, 0) (x > 0: x + slope * 0 = x; else 0 + slope * x, bit for bit but
for the sign of a zero, which nothing after it can tell apart).
onnxruntime's CPU PRelu broadcasts a per-channel slope on a slow generic path: it took 17.7 of
SFace's 34.9 ms a face on one thread here, and SFace runs a PRelu after each of its 27
convolutions. Written out, a face takes 22.4 ms, and the embeddings were equal on 30 random
faces (tests/test_face_runtime.py checks the rewrite; bench/face_runtime.py compares the
result with OpenCV).
"""
from __future__ import annotations

import struct
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

# ModelProto.graph; GraphProto.node/initializer/input; NodeProto.input/output/name/op_type/
# attribute;
# AttributeProto.name/i; TensorProto.dims/data_type/int32_data/name/raw_data/float_data;
# ValueInfoProto.name/type; TypeProto.tensor_type; Tensor.elem_type/shape; Shape.dim;
# Dimension.dim_value/dim_param.
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT = 1, 5, 11
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE, NODE_ATTRIBUTE = 1, 2, 3, 4, 5
ATTR_NAME, ATTR_I = 1, 3
T_DIMS, T_DATA_TYPE, T_FLOAT_DATA, T_INT32_DATA, T_NAME, T_RAW_DATA = 1, 2, 4, 5, 8, 9
FLOAT, UINT8, INT8, INT32 = 1, 2, 3, 6
_NUMPY = {FLOAT: np.float32, UINT8: np.uint8, INT8: np.int8, INT32: np.int32}


class DequantError(ValueError):
    """The file is not the kind of quantised ONNX this module can turn into float."""


# --- reading --------------------------------------------------------------------------------

def read_varint(buf, pos: int) -> Tuple[int, int]:
    """A protobuf varint at buf[pos] -> (value, next position); buf may be bytes or an mmap
    (faces/insightface.py reads ONNX files with it too)."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def fields(buf: bytes) -> Iterator[Tuple[int, int, object, bytes]]:
    """(field number, wire type, value, the field's raw bytes) for each field of a message.
    A length-delimited value is its payload (bytes); a varint its int."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise DequantError(f"protobuf wire type {wire} is not used by ONNX")
        if pos > len(buf):
            raise DequantError("truncated protobuf message")
        yield field, wire, value, buf[start:pos]


def _strings(msg: bytes, number: int) -> List[str]:
    return [bytes(v).decode("utf-8") for f, w, v, _ in fields(msg) if f == number and w == 2]


def _ints(msg: bytes, number: int) -> List[int]:
    """A repeated int field, packed or not."""
    out: List[int] = []
    for f, w, v, _ in fields(msg):
        if f != number:
            continue
        if w == 0:
            out.append(v)
        elif w == 2:
            pos = 0
            while pos < len(v):
                x, pos = read_varint(v, pos)
                out.append(x)
    return [x - (1 << 64) if x >= 1 << 63 else x for x in out]


def _node(msg: bytes) -> dict:
    attrs = {}
    for f, w, v, _ in fields(msg):
        if f == NODE_ATTRIBUTE:
            name = _strings(v, ATTR_NAME)
            ints = _ints(v, ATTR_I)
            if name and ints:
                attrs[name[0]] = ints[0]
    return {"op": (_strings(msg, NODE_OP_TYPE) or [""])[0], "inputs": _strings(msg, NODE_INPUT),
            "outputs": _strings(msg, NODE_OUTPUT), "attrs": attrs}


def tensor_to_array(msg: bytes) -> Tuple[str, np.ndarray]:
    """A TensorProto of the types these files use (float32, int8, uint8, int32)."""
    name = (_strings(msg, T_NAME) or [""])[0]
    dims = _ints(msg, T_DIMS)
    dtype = (_ints(msg, T_DATA_TYPE) or [0])[0]
    if dtype not in _NUMPY:
        raise DequantError(f"tensor {name}: data type {dtype} is not handled")
    raw = [v for f, w, v, _ in fields(msg) if f == T_RAW_DATA]
    if raw:
        arr = np.frombuffer(bytes(raw[0]), dtype=np.dtype(_NUMPY[dtype]).newbyteorder("<"))
    elif dtype == FLOAT:
        packed = b"".join(bytes(v) for f, w, v, _ in fields(msg) if f == T_FLOAT_DATA and w == 2)
        single = [struct.unpack("<f", bytes(v))[0] for f, w, v, _ in fields(msg)
                  if f == T_FLOAT_DATA and w == 5]
        arr = np.frombuffer(packed, "<f4") if packed else np.array(single, np.float32)
    else:  # int8/uint8/int32 values live in int32_data
        arr = np.array(_ints(msg, T_INT32_DATA), np.int64).astype(_NUMPY[dtype])
    count = int(np.prod(dims)) if dims else 1
    if arr.size != count:
        raise DequantError(f"tensor {name}: {arr.size} values for shape {dims}")
    return name, arr.astype(_NUMPY[dtype]).reshape(dims)


# --- writing --------------------------------------------------------------------------------

def _encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _key(number, 0) + _encode_varint(value)


def float_tensor(name: str, array: np.ndarray) -> bytes:
    """A TensorProto: dims, data_type FLOAT, name, raw_data (little-endian float32)."""
    array = np.ascontiguousarray(array, dtype="<f4")
    out = b"".join(_int_field(T_DIMS, int(d)) for d in array.shape)
    out += _int_field(T_DATA_TYPE, FLOAT) + _bytes_field(T_NAME, name.encode("utf-8"))
    return out + _bytes_field(T_RAW_DATA, array.tobytes())


def _symbolic_image_input(msg: bytes) -> bytes:
    """An NCHW image input's ValueInfoProto with height and width made symbolic."""
    # ValueInfoProto.type -> TypeProto.tensor_type -> Tensor.shape
    return _rewrite(msg, 2, lambda tp: _rewrite(tp, 1, lambda t: _rewrite(t, 2, _symbolic_hw)))


def _symbolic_hw(shape: bytes) -> bytes:
    dims = [raw for f, w, v, raw in fields(shape) if f == 1]
    if len(dims) != 4:
        return shape
    names = (b"height", b"width")
    return dims[0] + dims[1] + b"".join(_bytes_field(1, _bytes_field(2, n)) for n in names)


def _rewrite(msg: bytes, number: int, change) -> bytes:
    """msg with each length-delimited field `number` replaced by change(payload)."""
    return b"".join(_bytes_field(f, change(bytes(v))) if f == number and w == 2 else raw
                    for f, w, v, raw in fields(msg))


def node_proto(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str) -> bytes:
    """A NodeProto without attributes, as the graph's node field (key and length included)."""
    msg = b"".join(_bytes_field(NODE_INPUT, i.encode("utf-8")) for i in inputs)
    msg += b"".join(_bytes_field(NODE_OUTPUT, o.encode("utf-8")) for o in outputs)
    msg += _bytes_field(NODE_NAME, name.encode("utf-8")) + _bytes_field(NODE_OP_TYPE, op.encode())
    return _bytes_field(GRAPH_NODE, msg)


PRELU_ZERO = "consent_guard_prelu_zero"  # the scalar 0 the written-out PRelus compare with


def prelu_written_out(node: dict, index: int) -> bytes:
    """PRelu(x, slope) as Relu(x) + slope * Min(x, 0): the same values (see the module
    docstring), without onnxruntime's slow PRelu kernel."""
    x, slope = node["inputs"][:2]
    y = node["outputs"][0]
    stem = f"consent_guard_prelu_{index}"
    return (node_proto("Relu", [x], [stem + "_pos"], stem + "_relu")
            + node_proto("Min", [x, PRELU_ZERO], [stem + "_neg"], stem + "_min")
            + node_proto("Mul", [stem + "_neg", slope], [stem + "_scaled"], stem + "_mul")
            + node_proto("Add", [stem + "_pos", stem + "_scaled"], [y], stem + "_add"))


# --- dequantisation ---------------------------------------------------------------------------

def dequantize_linear(q: np.ndarray, scale: np.ndarray, zero: Optional[np.ndarray],
                      axis: int = 1, block_size: int = 0) -> np.ndarray:
    """ONNX DequantizeLinear (opset 21) on constants: (q - zero) * scale, with the scale and
    zero point per tensor (one value), per axis (1-D, length of `axis`), or per block of
    `block_size` along `axis` (same rank as q, ceil(q.shape[axis] / block_size) there)."""
    q = q.astype(np.float32)
    scale = scale.astype(np.float32)
    zero = np.zeros_like(scale) if zero is None else zero.astype(np.float32)
    if scale.size == 1:
        return ((q - zero.reshape(())) * scale.reshape(())).astype(np.float32)
    axis = axis % q.ndim
    if block_size <= 0:  # per axis
        shape = [1] * q.ndim
        shape[axis] = -1
        return ((q - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)
    if scale.ndim != q.ndim or -(-q.shape[axis] // block_size) != scale.shape[axis]:
        raise DequantError(f"block scales of shape {scale.shape} do not fit a tensor of shape "
                           f"{q.shape} with block_size {block_size} on axis {axis}")
    take = np.arange(q.shape[axis]) // block_size
    scale = np.take(scale, take, axis=axis)
    zero = np.take(zero, take, axis=axis)
    return ((q - zero) * scale).astype(np.float32)


def dequantize(model: bytes, image_input: Optional[str] = None) -> bytes:
    """The float32 ONNX file for an int8 block-quantised one (see the module docstring).
    `image_input` names an input whose height and width become symbolic."""
    graphs = [bytes(v) for f, w, v, _ in fields(model) if f == MODEL_GRAPH]
    if len(graphs) != 1:
        raise DequantError("not an ONNX model (no graph)")
    graph = graphs[0]
    inits: Dict[str, bytes] = {}
    nodes: List[Tuple[dict, bytes]] = []
    for f, w, v, raw in fields(graph):
        if f == GRAPH_INITIALIZER:
            inits[(_strings(v, T_NAME) or [""])[0]] = bytes(v)
        elif f == GRAPH_NODE:
            nodes.append((_node(v), raw))

    folded: Dict[str, bytes] = {}  # DequantizeLinear output -> its float initializer
    consumed: Set[str] = set()
    for node, _ in nodes:
        if node["op"] != "DequantizeLinear" or not all(i in inits for i in node["inputs"] if i):
            continue
        arrays = [tensor_to_array(inits[i])[1] if i else None for i in node["inputs"]]
        arrays += [None] * (3 - len(arrays))
        value = dequantize_linear(arrays[0], arrays[1], arrays[2],
                                  axis=node["attrs"].get("axis", 1),
                                  block_size=node["attrs"].get("block_size", 0))
        folded[node["outputs"][0]] = float_tensor(node["outputs"][0], value)
        consumed.update(i for i in node["inputs"] if i)
    if not folded:
        raise DequantError("no DequantizeLinear over constant weights: nothing to dequantise")

    kept_nodes = [prelu_written_out(n, i) if n["op"] == "PRelu" and len(n["inputs"]) == 2
                  else raw for i, (n, raw) in enumerate(nodes)
                  if not (n["outputs"] and n["outputs"][0] in folded)]
    read = {i for n, _ in nodes if not (n["outputs"] and n["outputs"][0] in folded)
            for i in n["inputs"]}
    constants = list(folded.values())
    if any(n["op"] == "PRelu" for n, _ in nodes):
        constants.append(float_tensor(PRELU_ZERO, np.zeros((), np.float32)))
    parts = kept_nodes + [_bytes_field(GRAPH_INITIALIZER, t) for t in constants]
    for f, w, v, raw in fields(graph):
        if f == GRAPH_NODE:
            continue  # written above, in their order, without the folded ones
        if f == GRAPH_INITIALIZER:
            name = (_strings(v, T_NAME) or [""])[0]
            if not (name in consumed and name not in read):
                parts.append(raw)
        elif f == GRAPH_INPUT:
            name = (_strings(v, 1) or [""])[0]
            if name in inits or name not in read:
                continue
            parts.append(_bytes_field(GRAPH_INPUT, _symbolic_image_input(bytes(v)))
                         if name == image_input else raw)
        else:
            parts.append(raw)
    new_graph = b"".join(parts)
    return b"".join(_bytes_field(MODEL_GRAPH, new_graph) if f == MODEL_GRAPH else raw
                    for f, w, v, raw in fields(model))
