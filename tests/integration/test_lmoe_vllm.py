"""``python -m airoboros.lmoe.vllm`` against a stand-in ``vllm`` executable (first on PATH)
that checks the flags it is given and serves an OpenAI-compatible API answering with the
LoRA module each request reached; the official OpenAI SDK is the client of the router."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.fakes import routing_samples

REPO = Path(__file__).resolve().parents[2]
EXPERTS = {"code": 8, "cooking": 16, "astronomy": 12}  # expert -> LoRA rank r

STAND_IN = r'''#!{python}
"""A stand-in for `vllm serve`: checks its flags, then serves /v1/models and
/v1/chat/completions answering "lora=<model>"."""
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
record = os.environ["STAND_IN_RECORD"]
with open(record, "a") as f:
    f.write(json.dumps(argv) + "\n")
def fail(msg):
    print("stand-in vllm: " + msg, file=sys.stderr)
    sys.exit(3)
if not argv or argv[0] != "serve":
    fail("expected `vllm serve MODEL ...`")
model = argv[1]
if not os.path.isfile(os.path.join(model, "config.json")):
    fail("positional MODEL is not a model folder: " + model)
def values(flag):
    if flag not in argv:
        fail("missing " + flag)
    i = argv.index(flag) + 1
    out = []
    while i < len(argv) and not argv[i].startswith("--"):
        out.append(argv[i]); i += 1
    return out
if "--enable-lora" not in argv:
    fail("missing --enable-lora")
loras = dict(m.split("=", 1) for m in values("--lora-modules"))
for name, path in loras.items():
    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    if os.path.basename(path) != name:
        fail("LoRA %s points at %s" % (name, path))
expected = json.loads(os.environ["STAND_IN_EXPECT"])
if sorted(loras) != sorted(expected["loras"]):
    fail("LoRA modules %s, expected %s" % (sorted(loras), expected["loras"]))
if values("--max-loras") != [str(expected["max_loras"])]:
    fail("--max-loras %s" % values("--max-loras"))
if values("--max-lora-rank") != [str(expected["max_lora_rank"])]:
    fail("--max-lora-rank %s" % values("--max-lora-rank"))
host, port = values("--host")[0], int(values("--port")[0])
if host != "127.0.0.1":
    fail("not on loopback: " + host)
key = values("--api-key")[0]
base = values("--served-model-name")[0]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def send(self, code, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def authorised(self):
        if self.headers.get("authorization") != "Bearer " + key:
            self.send(401, {{"error": {{"message": "bad key", "type": "auth"}}}})
            return False
        return True
    def do_GET(self):
        if not self.authorised():
            return
        if self.path == "/v1/models":
            ids = [base, *loras]
            self.send(200, {{"object": "list", "data": [
                {{"id": i, "object": "model", "owned_by": "vllm", "created": 0}} for i in ids]}})
        else:
            self.send(404, {{"error": {{"message": "no " + self.path}}}})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if not self.authorised():
            return
        model = body.get("model")
        if model not in loras and model != base:
            self.send(404, {{"error": {{"message": "no model " + str(model), "code": 404}}}})
            return
        text = "lora=" + model
        now = int(time.time())
        if not body.get("stream"):
            self.send(200, {{"id": "c1", "object": "chat.completion", "created": now,
                "model": model, "choices": [{{"index": 0, "finish_reason": "stop",
                "message": {{"role": "assistant", "content": text}}}}],
                "usage": {{"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}}})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        def chunk(data):
            payload = b"data: " + data + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
            self.wfile.flush()
        for piece in ["lora=", model]:
            chunk(json.dumps({{"id": "c1", "object": "chat.completion.chunk", "created": now,
                "model": model, "choices": [{{"index": 0, "finish_reason": None,
                "delta": {{"content": piece}}}}]}}).encode())
        chunk(json.dumps({{"id": "c1", "object": "chat.completion.chunk", "created": now,
            "model": model, "choices": [{{"index": 0, "finish_reason": "stop",
            "delta": {{}}}}]}}).encode())
        chunk(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

with open(os.environ["STAND_IN_PID"], "w") as f:
    f.write(str(os.getpid()))
ThreadingHTTPServer((host, port), H).serve_forever()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_package(root: Path) -> tuple[Path, Path]:
    model = root / "base-model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    pkg = root / "package"
    for expert, r in EXPERTS.items():
        ad = pkg / "adapters" / expert
        ad.mkdir(parents=True)
        (ad / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
        routing = pkg / "routing_data" / f"expert_{expert}.jsonl"
        routing.parent.mkdir(parents=True, exist_ok=True)
        routing.write_text(
            "".join(json.dumps({"instruction": s}) + "\n" for s in routing_samples.samples(expert))
        )
    return model, pkg


def env_with(bin_dir: Path | None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("AIROBOROS_API_KEYS", None)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    root = tmp_path_factory.mktemp("lmoe-vllm")
    model, pkg = make_package(root)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "vllm"
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    record, pid_file = root / "argv.jsonl", root / "vllm.pid"
    expect = {"loras": sorted(EXPERTS), "max_loras": 3, "max_lora_rank": 16}
    port = free_port()
    log = (root / "launcher.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "airoboros.lmoe.vllm", "--model", str(model),
         "--lmoe-path", str(pkg), "--router-k", "5", "--router-max-samples", "100",
         "--port", str(port), "--api-keys", "client-key"],
        cwd=REPO,
        env=env_with(bin_dir, STAND_IN_RECORD=str(record), STAND_IN_EXPECT=json.dumps(expect),
                     STAND_IN_PID=str(pid_file)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (root / "launcher.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError((root / "launcher.log").read_text()[-3000:])
        yield url, root, pid_file
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    # SIGTERM to the launcher stops the stand-in too: no orphan vllm.
    vllm_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(vllm_pid):
        time.sleep(0.1)
    assert not alive(vllm_pid), "the vllm child outlived the launcher"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="client-key", max_retries=0, timeout=60)


def test_vllm_gets_every_adapter_as_a_lora_module(launched: tuple[str, Path, Path]) -> None:
    _, root, _ = launched
    argv = json.loads((root / "argv.jsonl").read_text().splitlines()[0])
    modules = argv[argv.index("--lora-modules") + 1 :]
    assert sorted(modules) == sorted(
        f"{e}={(root / 'package' / 'adapters' / e).resolve()}" for e in EXPERTS
    )
    assert argv[argv.index("--max-lora-rank") + 1] == "16"  # r=12 and 16 round up to 16
    assert argv[argv.index("--max-loras") + 1] == "3"
    assert argv[1] == str((root / "base-model").resolve())


def test_router_lists_experts_and_needs_the_client_key(launched: tuple[str, Path, Path]) -> None:
    url, _, _ = launched
    ids = {m.id for m in client(url).models.list()}
    assert set(EXPERTS) | {"auto"} <= ids
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("expert", sorted(EXPERTS))
def test_model_expert_reaches_that_lora(launched: tuple[str, Path, Path], expert: str) -> None:
    url, _, _ = launched
    raw = client(url).chat.completions.with_raw_response.create(
        model=expert, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert raw.headers["x-airoboros-expert"] == expert
    assert raw.parse().choices[0].message.content == f"lora={expert}"


@pytest.mark.parametrize("expert", sorted(EXPERTS))
def test_auto_routes_by_the_routing_samples(launched: tuple[str, Path, Path], expert: str) -> None:
    url, _, _ = launched
    prompt = routing_samples.held_out(expert, 1, seed=3)[0]
    completion = client(url).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=4
    )
    assert completion.choices[0].message.content == f"lora={expert}"


def test_streaming_through_the_router(launched: tuple[str, Path, Path]) -> None:
    url, _, _ = launched
    prompt = routing_samples.held_out("cooking", 1, seed=5)[0]
    stream = client(url).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=4, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert pieces[:2] == ["lora=", "cooking"]
    assert "".join(pieces) == "lora=cooking"


def test_without_vllm_one_line_and_exit_2(tmp_path: Path) -> None:
    model, pkg = make_package(tmp_path)
    env = env_with(None)
    # A PATH without any vllm; the test's interpreter has no importable vllm either.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + "/usr/bin" + os.pathsep + "/bin"
    probe = subprocess.run([sys.executable, "-c", "import vllm"], env=env, capture_output=True)
    if probe.returncode == 0:
        pytest.skip("vllm is importable here")
    r = subprocess.run(
        [sys.executable, "-m", "airoboros.lmoe.vllm", "--model", str(model),
         "--lmoe-path", str(pkg)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "vLLM is not installed" in lines[0]
    assert r.stdout == ""
