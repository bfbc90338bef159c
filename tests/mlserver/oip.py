"""Helpers for tests/it/grpc.rs's real-MLServer test, run with the venv tests/run.sh installs.

  oip.py model DIR HTTP_PORT GRPC_PORT METRICS_PORT
      Trains a small scikit-learn model (4 features, predict_proba) and writes an MLServer
      model repository to DIR, serving it as `spam-filter` on 127.0.0.1 only.
  oip.py infer ADDR ROWS SEED [gzip] [tag=TAG] [model=NAME]
      One ModelInfer call through MLServer's own gRPC client stubs; prints a JSON line with the
      status, the initial metadata and the outputs as the client decoded them.
  oip.py rest-body ROWS SEED
      The REST v2 request body of the same rows `infer` sends.
  oip.py raw-server PORT
      A gRPC ModelInfer server that answers in raw_output_contents (as Triton does), built
      with the protobuf library; serves until killed.
"""
import json
import sys


def model(directory, http_port, grpc_port, metrics_port):
    import os
    import joblib
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(7)
    x = rng.uniform(-0.5, 1.5, size=(400, 4))
    y = (x @ np.array([1.7, -0.9, 2.3, 0.4]) - 1.2 > 0).astype(int)
    os.makedirs(os.path.join(directory, "spam-filter"), exist_ok=True)
    joblib.dump(LogisticRegression().fit(x, y), os.path.join(directory, "spam-filter", "model.joblib"))
    with open(os.path.join(directory, "spam-filter", "model-settings.json"), "w") as f:
        json.dump({"name": "spam-filter", "implementation": "mlserver_sklearn.SKLearnModel",
                   "parameters": {"uri": "./model.joblib", "version": "1"}}, f)
    with open(os.path.join(directory, "settings.json"), "w") as f:
        json.dump({"host": "127.0.0.1", "http_port": int(http_port), "grpc_port": int(grpc_port),
                   "metrics_port": int(metrics_port), "parallel_workers": 0,
                   "metrics_endpoint": None}, f)


def rows(n, seed):
    import numpy as np
    return np.random.default_rng(int(seed)).uniform(-0.5, 1.5, size=(int(n), 4))


def rest_body(n, seed):
    x = rows(n, seed)
    print(json.dumps({"id": f"req-{seed}", "inputs": [{"name": "features", "datatype": "FP64",
                      "shape": list(x.shape), "data": x.flatten().tolist()}],
                      "outputs": [{"name": "predict_proba"}]}))


def infer(addr, n, seed, *flags):
    import grpc
    import numpy as np
    from mlserver.grpc import dataplane_pb2 as pb
    from mlserver.grpc import dataplane_pb2_grpc as stubs

    x = rows(n, seed)
    name = next((f[6:] for f in flags if f.startswith("model=")), "spam-filter")
    request = pb.ModelInferRequest(model_name=name, id=f"req-{seed}")
    tensor = request.inputs.add(name="features", datatype="FP64", shape=list(x.shape))
    tensor.contents.fp64_contents.extend(x.flatten().tolist())
    request.outputs.add(name="predict_proba")
    for flag in flags:
        if flag.startswith("tag="):
            t = request.inputs.add(name="previous", datatype="BYTES", shape=[1])
            t.contents.bytes_contents.append(flag[4:].encode())
    options = {}
    if "gzip" in flags:
        options["compression"] = grpc.Compression.Gzip
    with grpc.insecure_channel(addr, options=[("grpc.enable_http_proxy", 0)]) as channel:
        call = stubs.GRPCInferenceServiceStub(channel).ModelInfer.with_call
        try:
            response, rpc = call(request, timeout=10, **options)
        except grpc.RpcError as e:
            print(json.dumps({"code": e.code().name, "details": e.details(),
                              "metadata": dict(e.initial_metadata() or ()),
                              "trailing": dict(e.trailing_metadata() or ())}))
            return
    outputs = []
    for i, o in enumerate(response.outputs):
        if response.raw_output_contents:
            raw = response.raw_output_contents[i]
            if o.datatype == "BYTES":
                data, at = [], 0
                while at < len(raw):
                    size = int.from_bytes(raw[at:at + 4], "little")
                    data.append(raw[at + 4:at + 4 + size].decode())
                    at += 4 + size
            else:
                data = np.frombuffer(raw, dtype={"FP32": "<f4", "FP64": "<f8"}[o.datatype]).tolist()
        elif o.datatype == "BYTES":
            data = [b.decode() for b in o.contents.bytes_contents]
        else:
            data = list(o.contents.fp64_contents) or list(o.contents.fp32_contents)
        outputs.append({"name": o.name, "datatype": o.datatype, "shape": list(o.shape), "data": data})
    print(json.dumps({"code": "OK", "metadata": dict(rpc.initial_metadata()),
                      "model_name": response.model_name, "raw": bool(response.raw_output_contents),
                      "outputs": outputs}))


def raw_server(port):
    from concurrent import futures
    import grpc
    import numpy as np
    from mlserver.grpc import dataplane_pb2 as pb
    from mlserver.grpc import dataplane_pb2_grpc as stubs

    class Raw(stubs.GRPCInferenceServiceServicer):
        def ModelInfer(self, request, context):
            x = np.array(request.inputs[0].contents.fp64_contents).reshape(-1, 4)
            p = 1 / (1 + np.exp(-(x @ np.array([1.7, -0.9, 2.3, 0.4]) - 1.2)))
            proba = np.stack([1 - p, p], axis=1).astype("<f4")
            response = pb.ModelInferResponse(model_name="spam-filter", model_version="1", id=request.id)
            response.outputs.add(name="predict_proba", datatype="FP32", shape=list(proba.shape))
            response.raw_output_contents.append(proba.tobytes())
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    stubs.add_GRPCInferenceServiceServicer_to_server(Raw(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    {"model": model, "infer": infer, "rest-body": rest_body, "raw-server": raw_server}[sys.argv[1]](*sys.argv[2:])
