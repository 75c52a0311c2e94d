"""The device agent (`nas device serve`), a real process on 127.0.0.1 with torch blocked: hostile requests each get a
clear error within their limit and the agent measures correctly right after; `nas lut build|extend|validate
--device` write a table whose header is the agent's device."""
from __future__ import annotations

import base64
import http.client
import json
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from nas.latency.environment import cpu_id
from nas.latency.onnx import export_onnx
from nas.latency.protocol import Protocol
from nas.latency.table import LatencyTable
from nas.latency.wire import REQUEST

TIME_LIMIT, READ_TIMEOUT, QUEUE_WAIT, MAX_BODY_MB = 4.0, 2.0, 1.5, 2
FAST_ORT = Protocol(backend="onnxruntime-cpu", warmup_runs=2, warmup_s=0.0, repeats=5, min_time_s=0.0, reference=False)
# The agent's process never has torch: it must serve without it.
NO_TORCH = "import sys; sys.modules['torch'] = None; from nas.commands.main import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    d = tmp_path_factory.mktemp("agent")
    token_file = d / "token"
    proc = subprocess.Popen(
        [sys.executable, "-c", NO_TORCH, "device", "serve", "--port", "0", "--token-file", str(token_file),
         "--time-limit", str(TIME_LIMIT), "--read-timeout", str(READ_TIMEOUT), "--queue-wait", str(QUEUE_WAIT),
         "--max-body-mb", str(MAX_BODY_MB)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "nas device agent on http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        url = line.split(" on ")[1].split()[0]
        yield {"url": url, "port": int(url.rsplit(":", 1)[1]), "token": token_file.read_text().strip(),
               "token_file": token_file, "proc": proc}
    finally:
        proc.terminate()
        proc.wait(10)
    err = proc.stderr.read()
    assert token_file.read_text().strip() not in err  # never logged


def _onnx_bytes(module: nn.Module, shape: tuple[int, ...], tmp: Path) -> bytes:
    return export_onnx(module, torch.randn(shape), tmp / "m.onnx", opset=18, exporter="torchscript").read_bytes()


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    return _onnx_bytes(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()), (1, 8, 16, 16),
                       tmp_path_factory.mktemp("conv"))


def _request(model: bytes, protocol: Protocol = FAST_ORT, inputs=((1, 8, 16, 16),), job_id: str = "conv") -> bytes:
    return json.dumps({"format": REQUEST, "protocol": protocol.to_dict(), "reference": None,
                       "jobs": [{"id": job_id, "format": "onnx", "model": base64.b64encode(model).decode(),
                                 "inputs": [list(s) for s in inputs]}]}).encode()


def _post(agent, body: bytes, token: str | None = "", path: str = "/measure", timeout: float = 30.0):
    """(status, reply, seconds) of one POST; token "" means the right one, None none."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token or agent['token']}"
    conn = http.client.HTTPConnection("127.0.0.1", agent["port"], timeout=timeout)
    start = time.monotonic()
    try:
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), time.monotonic() - start
    finally:
        conn.close()


def _serves_correctly(agent, conv_model: bytes) -> dict:
    status, reply, _ = _post(agent, _request(conv_model))
    assert status == 200, reply
    m = reply["results"][0]["measurement"]
    assert m["n"] >= 5 and 0 < m["p10_us"] <= m["median_us"] <= m["p90_us"] < 1e6
    assert reply["device"]["cpu_id"] == cpu_id() and reply["device"]["onnxruntime"]
    return reply


def test_agent_modules_do_not_import_torch():
    code = ("import sys, nas.latency.agent, nas.latency.agentworker, nas.commands.device; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_no_token_wrong_token_and_oversized_body(agent, conv_model):
    status, reply, _ = _post(agent, _request(conv_model), token=None)
    assert status == 401 and "no token" in reply["error"]
    status, reply, _ = _post(agent, _request(conv_model), token="x" * 43)
    assert status == 401 and "wrong token" in reply["error"]
    # headers announcing a body over the limit: refused before a byte of it is read
    conn = http.client.HTTPConnection("127.0.0.1", agent["port"], timeout=10)
    conn.putrequest("POST", "/measure")
    conn.putheader("Authorization", f"Bearer {agent['token']}")
    conn.putheader("Content-Length", str((MAX_BODY_MB + 1) << 20))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "exceeds the agent's limit" in json.loads(resp.read())["error"]
    conn.close()
    _serves_correctly(agent, conv_model)


def test_wrong_format_truncated_and_external_data_models(agent, conv_model):
    status, reply, _ = _post(agent, _request(pickle.dumps({"weights": [1.0, 2.0]})))
    assert status == 415 and "not an ONNX model (a Python pickle)" in reply["error"]
    body = json.loads(_request(conv_model))
    body["jobs"][0]["format"] = "torchscript"
    status, reply, _ = _post(agent, json.dumps(body).encode())
    assert status == 415 and "not allowed" in reply["error"]
    status, reply, _ = _post(agent, _request(conv_model[: len(conv_model) // 2]))
    assert status == 422 and "conv: cannot parse the ONNX model" in reply["error"]
    # a model whose weights would be read from a file on the device
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("float_data")
    w.external_data.add(key="location", value="../../../etc/passwd")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    status, reply, _ = _post(agent, _request(model.SerializeToString(), inputs=((1,),)))
    assert status == 422 and "external data" in reply["error"]
    _serves_correctly(agent, conv_model)


def _never_ending_model() -> bytes:
    """A Loop of 10^15 iterations: ONNX Runtime runs it for days."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["x_in", "x_in"], ["x_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1, 4])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["m"], value=helper.make_tensor("m", TensorProto.INT64, [], [10**15])),
         helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
         helper.make_node("Loop", ["m", "c", "x"], ["y"], body=body)],
        "forever", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_a_model_that_never_finishes_is_stopped_at_the_time_limit(agent, conv_model):
    status, reply, seconds = _post(agent, _request(_never_ending_model(), inputs=((1, 4),), job_id="loop"))
    assert status == 504 and "time limit of 4 s" in reply["error"] and reply["job"] == "loop"
    assert TIME_LIMIT - 0.5 < seconds < TIME_LIMIT + 3
    _serves_correctly(agent, conv_model)  # a fresh measuring process


def test_a_slow_client_times_out_without_holding_up_others(agent, conv_model):
    with socket.create_connection(("127.0.0.1", agent["port"]), timeout=10) as s:
        s.sendall(f"POST /measure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent['token']}\r\n"
                  f"Content-Length: 5000\r\n\r\n{{\"format\"".encode())
        start = time.monotonic()
        _serves_correctly(agent, conv_model)  # while that client stalls
        data = b""
        while chunk := s.recv(65536):  # the agent closes the connection after its reply
            data += chunk
        seconds, reply = time.monotonic() - start, data.decode()
    assert reply.startswith("HTTP/1.0 408") and "did not arrive within 2 s" in reply
    assert seconds < READ_TIMEOUT + 2


def test_concurrent_requests_queue_one_at_a_time_with_a_bounded_wait(agent, conv_model):
    _serves_correctly(agent, conv_model)  # the measuring process is up
    slow = _request(conv_model, Protocol(**{**FAST_ORT.to_dict(), "min_time_s": 2.5, "max_repeats": 10**9}))
    out: dict[str, tuple] = {}
    first = threading.Thread(target=lambda: out.update(slow=_post(agent, slow)))
    first.start()
    time.sleep(0.4)
    status, reply, seconds = _post(agent, _request(conv_model))  # waits QUEUE_WAIT behind a 2.5 s measurement
    first.join()
    assert status == 503 and "busy" in reply["error"] and QUEUE_WAIT - 0.2 < seconds < QUEUE_WAIT + 1.5
    assert out["slow"][0] == 200 and out["slow"][1]["results"][0]["measurement"]["n"] >= 5
    # two short requests at once: both served, one after the other
    replies: list[dict] = []
    threads = [threading.Thread(target=lambda: replies.append(_post(agent, _request(conv_model))[1])) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all("results" in r and len(r["results"]) == 1 for r in replies), replies
    a, b = sorted(replies, key=lambda r: r["started"])
    assert a["finished"] <= b["started"]


def test_lut_build_extend_validate_through_the_agent(agent, tiny_dir, tmp_path):
    from nas.commands.main import main

    table = tmp_path / "remote.csv"
    device = ["--device", agent["url"], "--token-file", str(agent["token_file"])]
    fast = ["--repeats", "5", "--min-time", "0", "--warmup", "2", "--warmup-time", "0"]
    assert main(["lut", "build", "--space", str(tiny_dir / "space.yaml"), "--backend", "onnxruntime-cpu", *fast,
                 "--calibrate", "0", "--out", str(table), "--quiet", *device]) == 0
    t = LatencyTable.load(table)
    assert t.header["device"]["agent"] == agent["url"] and t.header["device"]["cpu_id"] == cpu_id()
    assert t.header["device"]["onnxruntime"] and t.reference_us and len(t.entries) > 20
    # a killed build resumes: `extend` measures only what is missing
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines[:-3]) + "\n")
    assert main(["lut", "extend", str(table), "--space", str(tiny_dir / "space.yaml"), "--quiet", *device]) == 0
    assert len(LatencyTable.load(table).entries) == len(t.entries)
    out = tmp_path / "validate"
    assert main(["lut", "validate", str(table), "--space", str(tiny_dir / "space.yaml"), "-n", "3", "--repeats",
                 "5", "--min-time", "0", "--out", str(out), "--quiet", "--json", *device]) == 0
    summary = json.loads((out / "validation.json").read_text())
    assert summary["n"] == 3 and 0 <= summary["within_10pct"] <= 1


def test_lut_build_with_device_refuses_torch_backends_and_missing_tokens(agent, tiny_dir, tmp_path, capsys):
    from nas.commands.main import main

    base = ["lut", "build", "--space", str(tiny_dir / "space.yaml"), "--out", str(tmp_path / "t.csv"), "--quiet",
            "--device", agent["url"]]
    assert main([*base, "--token-file", str(agent["token_file"])]) == 2
    assert "--backend onnxruntime-cpu or openvino-cpu" in capsys.readouterr().err
    bad = tmp_path / "bad-token"
    bad.write_text("y" * 40)
    assert main([*base, "--backend", "onnxruntime-cpu", "--token-file", str(bad)]) == 2
    assert "refused the token: wrong token" in capsys.readouterr().err


def test_a_batch_over_the_time_limit_keeps_what_was_measured_and_sends_the_rest_again(agent, caplog):
    from nas.latency.remote import RemoteMeasurer

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    p = Protocol(**{**FAST_ORT.to_dict(), "min_time_s": 1.2, "max_repeats": 10**9})  # 4 x 1.2 s > TIME_LIMIT
    remote = RemoteMeasurer(agent["url"], agent["token"])
    with caplog.at_level("WARNING", logger="nas.latency.remote"):
        out = remote.measure_many([(conv, (8, 16, 16))] * 4, p)
    assert "overran the agent's time limit" in caplog.text
    assert len(out) == 4 and all(m.n > 5 and m.p10_us > 0 for m in out)


def test_the_agent_binds_beyond_this_machine_only_when_asked(tmp_path, capsys):
    from nas.commands.main import main

    assert main(["device", "serve", "--host", "0.0.0.0", "--port", "0", "--token-file", str(tmp_path / "t")]) == 2
    assert "--allow-remote" in capsys.readouterr().err and not (tmp_path / "t").exists()
