"""The peer for ``bench/serving.py``: the model server people write by hand.

FastAPI + uvicorn + onnxruntime, one endpoint, the same JSON contract as the agent's
``POST /v1/models/{name}/predict``. Written the lean way (read the body with
``await request.json()``, run the session inline in the ``async def``, no thread hop, return a
dict), which is the fastest of the usual hand-written forms for a small model; a pydantic body
model or a sync ``def`` endpoint (threadpool) would only slow the peer down.

Run (what the benchmark does)::

    EDGEFLEET_PEER_MODEL=model.onnx EDGEFLEET_PEER_THREADS=1 \\
        python -m uvicorn fastapi_peer:app --app-dir bench/peers --workers 1 --no-access-log

``EDGEFLEET_PEER_ORJSON=1`` (an info row in the benchmark) makes it the orjson variant a user
would write: ``orjson.loads(await request.body())`` and FastAPI's ``ORJSONResponse`` as the
app's response class, the same numbers on the wire (outputs go out as float64 lists).

Not part of the agent: the agent installs without FastAPI or uvicorn.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, ORJSONResponse

_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}

_options = ort.SessionOptions()
_options.intra_op_num_threads = int(os.environ.get("EDGEFLEET_PEER_THREADS", "1"))
_options.inter_op_num_threads = 1
session = ort.InferenceSession(os.environ["EDGEFLEET_PEER_MODEL"], sess_options=_options,
                               providers=["CPUExecutionProvider"])
input_types = {i.name: _TYPES[i.type] for i in session.get_inputs()}
output_names = [o.name for o in session.get_outputs()]

FAST_JSON = os.environ.get("EDGEFLEET_PEER_ORJSON", "0") == "1"
if FAST_JSON:
    import orjson

app = FastAPI(default_response_class=ORJSONResponse if FAST_JSON else JSONResponse)


@app.post("/v1/models/{name}/predict")
async def predict(name: str, request: Request) -> dict[str, Any]:
    body = orjson.loads(await request.body()) if FAST_JSON else await request.json()
    feeds = {k: np.asarray(v, dtype=input_types[k]) for k, v in body["inputs"].items()}
    outputs = session.run(output_names, feeds)
    return {"model": name, "version": "1",
            "outputs": {n: v.tolist() for n, v in zip(output_names, outputs, strict=True)}}
