"""`litllm serve` as a real process on a free local port, driven by the official `openai` client and raw HTTP."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from litllm import LLM
from litllm.decode import generate_tokens

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
]


class Server:
    """`litllm serve CKPT --port <free port> ...` in a subprocess, its log in a file (a pipe nobody reads could fill).

    `env` adds environment variables; `headers` go with every request (an API key)."""

    def __init__(self, checkpoint_dir, log_path, *args: str, env: dict | None = None, headers: dict | None = None):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.headers = headers or {}
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "litllm", "serve", str(checkpoint_dir), "--port", str(self.port), *args],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 120
        while not self.healthy():
            assert self.process.poll() is None, f"the server died:\n{self.log()}"
            assert time.monotonic() < deadline, f"no /health after 120 s:\n{self.log()}"
            time.sleep(0.2)

    def healthy(self) -> bool:
        try:
            return self.get("/health")[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, body bytes) of one raw HTTP request."""
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Content-Type": "application/json", **self.headers, **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body, headers: dict | None = None):
        return self.request("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(), headers)

    def interrupt(self, timeout: float = 30) -> int:
        """Send Ctrl-C (SIGINT) and wait for the exit code."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM.load(smollm2_dir)


@pytest.fixture(scope="module")
def llm_chat(llm):
    """`llm.chat(messages, max_new_tokens=n)`, computed once per question."""
    answers = {}

    def chat(messages, max_new_tokens):
        key = json.dumps([messages, max_new_tokens])
        if key not in answers:
            answers[key] = llm.chat(messages, max_new_tokens=max_new_tokens)
        return answers[key]

    return chat


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    server = Server(smollm2_dir, tmp_path_factory.mktemp("serve") / "server.log", "--max_seq_len", "1024")
    yield server
    assert server.interrupt() in (0, 130)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(smollm2_dir):
    return smollm2_dir.name


@pytest.mark.parametrize("messages", CHATS)
def test_greedy_chat_completion_equals_llm_chat(client, llm, llm_chat, model_name, messages):
    response = client.chat.completions.create(model=model_name, messages=messages, max_tokens=24, temperature=0)
    assert response.choices[0].message.content == llm_chat(messages, 24)
    assert response.choices[0].message.role == "assistant"
    prompt_ids = llm.tokenizer.encode_chat(messages)
    tokens = list(generate_tokens(llm.model, prompt_ids, 24, stop_ids=llm.tokenizer.stop_ids))
    stopped = tokens[-1] in llm.tokenizer.stop_ids  # the stop token counts as a completion token, as in vLLM
    assert response.choices[0].finish_reason == ("stop" if stopped else "length")
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (
        len(prompt_ids), len(tokens), len(prompt_ids) + len(tokens))


def test_models_lists_the_checkpoint(client, model_name):
    assert [model.id for model in client.models.list()] == [model_name]


def test_streamed_chunks_join_to_the_same_text(client, server, llm_chat, model_name):
    messages = CHATS[1]
    chunks = list(client.chat.completions.create(model=model_name, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == llm_chat(messages, 24)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    whole = client.chat.completions.create(model=model_name, messages=messages, max_tokens=24, temperature=0)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage and not chunks[-1].choices

    status, body = server.post("/v1/chat/completions", {"model": model_name, "messages": messages,
                                                        "max_tokens": 4, "stream": True})
    events = body.decode().split("\n\n")
    assert status == 200 and events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert json.loads(events[-3][len("data: "):])["choices"][0]["finish_reason"] == "length"


def test_text_completion_equals_llm_generate(client, llm, model_name):
    for stop in (None, [" 7"]):
        response = client.completions.create(model=model_name, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0,
                                             stop=stop)
        assert response.choices[0].text == llm.generate("1, 2, 3, 4,", max_new_tokens=10, stop=stop)
        assert response.choices[0].finish_reason == ("length" if stop is None else "stop")
    streamed = client.completions.create(model=model_name, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0,
                                         stop=[" 7"], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == response.choices[0].text


def test_same_seed_samples_the_same_answer(client, model_name):
    def answer(seed):
        return client.chat.completions.create(model=model_name, messages=CHATS[1], max_tokens=8, temperature=1.0,
                                              top_p=0.9, seed=seed).choices[0].message.content

    assert answer(3) == answer(3)
    assert len({answer(seed) for seed in range(3)}) > 1


def test_sixteen_concurrent_clients_are_decoded_together(client, server, llm_chat, model_name):
    questions = ["Why is the sky blue?", "Name a fruit.", "What is 12 times 12?", "Describe a cat in one sentence.",
                 "What is Python?", "Give me a synonym for happy.", "Where is Mount Everest?", "Who wrote Hamlet?"]
    # prompts of 8 lengths, each sent by two clients: the batch's rows sit at different positions
    chats = [[{"role": "user", "content": question}] for question in questions] * 2
    running = []
    done = threading.Event()

    def watch():  # the scheduler's rows in use, while the clients wait
        while not done.is_set():
            running.append(json.loads(server.get("/health")[1])["running"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda messages: client.chat.completions.create(
                model=model_name, messages=messages, max_tokens=8, temperature=0).choices[0].message.content, chats))
    finally:
        done.set()
        watcher.join()
    assert max(running) >= 8  # many sequences were in the batch at once, not queued one by one
    assert answers == [llm_chat(messages, 8) for messages in chats]


BAD_REQUESTS = {  # name: (path, body, status, error code or param)
    "malformed JSON": ("/v1/chat/completions", b'{"model": "m", "messages": [', 400, None),
    "unknown model": ("/v1/chat/completions", {"model": "gpt-4", "messages": CHATS[0]}, 404, "model_not_found"),
    "missing messages": ("/v1/chat/completions", {"model": "MODEL"}, 400, "messages"),
    "messages not a list": ("/v1/chat/completions", {"model": "MODEL", "messages": "hi"}, 400, "messages"),
    "temperature not a number": ("/v1/chat/completions",
                                 {"model": "MODEL", "messages": CHATS[0], "temperature": "hot"}, 400, "temperature"),
    "negative max_tokens": ("/v1/chat/completions", {"model": "MODEL", "messages": CHATS[0], "max_tokens": -1},
                            400, "max_tokens"),
    "two choices": ("/v1/chat/completions", {"model": "MODEL", "messages": CHATS[0], "n": 2}, 400, "n"),
    "max_tokens beyond the context": ("/v1/chat/completions",
                                      {"model": "MODEL", "messages": CHATS[0], "max_tokens": 1000},
                                      400, "context_length_exceeded"),
    "prompt beyond the context": ("/v1/completions", {"model": "MODEL", "prompt": "word " * 1100},
                                  400, "context_length_exceeded"),
    "missing prompt": ("/v1/completions", {"model": "MODEL"}, 400, "prompt"),
    "empty prompt": ("/v1/completions", {"model": "MODEL", "prompt": ""}, 400, "prompt"),
    "unknown path": ("/v1/embeddings", {"model": "MODEL", "input": "hi"}, 404, None),
}


def test_bad_requests_get_4xx_with_an_openai_error_and_the_server_keeps_answering(server, client, model_name):
    for name, (path, body, status, code_or_param) in BAD_REQUESTS.items():
        if isinstance(body, dict):
            body = json.loads(json.dumps(body).replace('"MODEL"', json.dumps(model_name)))
        got_status, got_body = server.post(path, body)
        error = json.loads(got_body)["error"]
        assert got_status == status, (name, error)
        assert error["message"] and error["type"] == "invalid_request_error", name
        if code_or_param is not None:
            assert code_or_param in (error["code"], error["param"]), (name, error)
    # the official client maps them to its exceptions
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHATS[0])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=model_name, messages=CHATS[0], max_tokens=100_000)
    assert server.healthy() and server.process.poll() is None
    assert client.chat.completions.create(model=model_name, messages=CHATS[0], max_tokens=4).choices[0].message.content
    assert "Traceback" not in server.log()


def test_requests_without_the_api_key_get_401(tiny_chat_model_dir, tmp_path):
    # the key from the environment, where `ps` does not show it (--api_key_file: see test_serve_limits.py)
    server = Server(tiny_chat_model_dir, tmp_path / "server.log", env={"LITLLM_API_KEY": "s3cret"})
    try:
        name = tiny_chat_model_dir.name
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, body = server.post("/v1/chat/completions", {"model": name, "messages": CHATS[0]}, headers)
            assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert server.post("/v1/chat/completions", b"{not json", {})[0] == 401  # the key is checked first
        for path in ("/v1/models", "/openapi.json", "/docs"):  # the API's description is behind the key too
            assert server.get(path)[0] == 401, path
        assert server.request("GET", "/openapi.json", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert server.get("/health")[0] == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert keyed.chat.completions.create(model=name, messages=CHATS[0], max_tokens=3).usage.completion_tokens == 3
    finally:
        server.interrupt()


def test_ctrl_c_ends_open_streams_and_exits_cleanly(tiny_chat_model_dir, tmp_path):
    server = Server(tiny_chat_model_dir, tmp_path / "server.log")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    name = tiny_chat_model_dir.name
    streams = [client.chat.completions.create(model=name, messages=[{"role": "user", "content": f"story {i}"}],
                                              max_tokens=400, temperature=0, stream=True) for i in range(4)]
    for stream in streams:  # every stream has started
        next(iter(stream))
    exit_code = server.interrupt()
    for stream in streams:
        try:  # a stream ends, or reports that the server is shutting down
            for _ in stream:
                pass
        except openai.APIError as error:
            assert "shutting down" in str(error)
    # 130 (Python's code for Ctrl-C) when streams were still open; 0 when the tiny model had already finished them
    assert exit_code in (0, 130)
    log = server.log()
    assert "Traceback" not in log and "Finished server process" in log


def test_a_port_in_use_is_a_one_line_error(tiny_chat_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run([sys.executable, "-m", "litllm", "serve", str(tiny_chat_model_dir),
                                 "--port", str(taken.getsockname()[1])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot listen on 127.0.0.1:") and "--port" in result.stderr
    assert "Traceback" not in result.stderr
