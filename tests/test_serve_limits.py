"""`litllm serve` under misuse: no request, however large or odd, breaks or stalls the others' (issue 17).

Real server processes on tiny random models with SmolLM2's tokenizer, raw HTTP and the `openai` client.
"""
import asyncio
import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from litllm import LLM
from litllm.commands import main
from litllm.decode import TextStream
from litllm.batching import Generation, Scheduler
from test_serve import CHATS, Server

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


def error_of(status_and_body) -> dict:
    """The OpenAI error of a (status, body) answer; fails unless the body has exactly OpenAI's shape."""
    body = json.loads(status_and_body[1])
    assert set(body) == {"error"} and set(body["error"]) == OPENAI_ERROR_KEYS, body
    return body["error"]


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def running(server) -> int:
    return json.loads(server.get("/health")[1])["running"]


@pytest.fixture(scope="module")
def server(tiny_chat_model_dir, tmp_path_factory):
    """The tiny model behind an API key read from a file, which every request here sends."""
    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text("k3y\n")
    server = Server(tiny_chat_model_dir, tmp_path_factory.mktemp("serve") / "server.log",
                    "--api_key_file", str(key_file), headers={"Authorization": "Bearer k3y"})
    yield server
    assert server.interrupt() in (0, 130)
    assert "Traceback" not in server.log()


@pytest.fixture(scope="module")
def model_name(tiny_chat_model_dir):
    return tiny_chat_model_dir.name


@pytest.fixture(scope="module")
def busy_server(smollm2_dir, tmp_path_factory):
    """Two places in the batch, two more in the queue, a 1 s queue timeout, and a 16k context: the tiny model
    decodes ~16k tokens for a long answer, and a megabyte of prompt is tokenized before it is refused."""
    from hf_models import save_tiny_hf_model
    from litllm.checkpoint import copy_tokenizer_files

    checkpoint_dir = tmp_path_factory.mktemp("tiny-16k")
    save_tiny_hf_model("tied", checkpoint_dir, vocab_size=49152, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384)
    copy_tokenizer_files(smollm2_dir, checkpoint_dir)
    server = Server(checkpoint_dir, tmp_path_factory.mktemp("serve") / "server.log", "--max_seq_len", "16384",
                    "--max_batch_size", "2", "--max_queue", "2", "--queue_timeout", "1")
    server.model_name = checkpoint_dir.name
    yield server
    assert server.interrupt() in (0, 130)
    assert "Traceback" not in server.log()


def test_a_stream_goes_on_while_others_send_a_tiny_temperature_and_a_huge_stop_string(server, model_name):
    def chat(**fields):
        return server.post("/v1/chat/completions", {"model": model_name, "messages": CHATS[0], **fields})

    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(chat, max_tokens=450, temperature=0, stream=True)
        wait_until(lambda: running(server) == 1)
        tiny_temperature = chat(max_tokens=8, temperature=1e-40)
        huge_stop = chat(max_tokens=8, stop=["x" * 100_000])
        status, body = stream.result()
    assert status == 200 and body.decode().endswith("data: [DONE]\n\n") and b'"error"' not in body
    assert tiny_temperature[0] == 200  # as greedy: dividing the logits by 1e-40 would overflow them
    greedy = chat(max_tokens=8, temperature=0)
    assert json.loads(tiny_temperature[1])["choices"] == json.loads(greedy[1])["choices"]
    assert huge_stop[0] == 400 and error_of(huge_stop)["param"] == "stop"


BAD_REQUESTS = {  # name: (path, body, status, param or code)
    "malformed JSON": ("/v1/chat/completions", b'{"model": "m", "messages": [', 400, None),
    "a lone surrogate": ("/v1/chat/completions",
                         b'{"model": "MODEL", "messages": [{"role": "user", "content": "a\\ud800"}]}',
                         400, "messages.0.content"),
    "a lone surrogate in the model name": ("/v1/chat/completions",
                                           b'{"model": "\\udfff", "messages": [{"role": "user", "content": "a"}]}',
                                           404, "model_not_found"),
    "not UTF-8": ("/v1/completions", b'{"model": "MODEL", "prompt": "\xff"}', 400, None),
    "tools": ("/v1/chat/completions", {"model": "MODEL", "messages": CHATS[0], "tools": [{"type": "function"}]},
              400, "tools"),
    "logprobs": ("/v1/chat/completions", {"model": "MODEL", "messages": CHATS[0], "logprobs": True}, 400, "logprobs"),
    "response_format": ("/v1/chat/completions", {"model": "MODEL", "messages": CHATS[0],
                                                 "response_format": {"type": "json_object"}}, 400, "response_format"),
    "a misspelled field": ("/v1/completions", {"model": "MODEL", "prompt": "hi", "max_token": 5}, 400, "max_token"),
    "n > 1": ("/v1/completions", {"model": "MODEL", "prompt": "hi", "n": 2}, 400, "n"),
    "fractional max_tokens": ("/v1/completions", {"model": "MODEL", "prompt": "hi", "max_tokens": 1.5}, 400,
                              "max_tokens"),
    "max_tokens as a string": ("/v1/completions", {"model": "MODEL", "prompt": "hi", "max_tokens": "7"}, 400,
                               "max_tokens"),
    "five stop strings": ("/v1/completions", {"model": "MODEL", "prompt": "hi", "stop": list("abcde")}, 400, "stop"),
    "a prompt no context holds": ("/v1/completions", {"model": "MODEL", "prompt": "x" * 1_000_000}, 400,
                                  "context_length_exceeded"),
    "a 5 MB body": ("/v1/completions", {"model": "MODEL", "prompt": "x" * 5_000_000}, 413, "request_too_large"),
    "unknown path": ("/v1/embeddings", {"model": "MODEL", "input": "hi"}, 404, None),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_every_error_is_an_openai_error(server, model_name, name):
    path, body, status, param_or_code = BAD_REQUESTS[name]
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace('"MODEL"', json.dumps(model_name)))
    else:
        body = body.replace(b'"MODEL"', json.dumps(model_name).encode())
    answer = server.post(path, body)
    error = error_of(answer)
    assert answer[0] == status, error
    assert error["message"] and error["type"] == "invalid_request_error"
    if param_or_code is not None:
        assert param_or_code in (error["param"], error["code"]), error


def test_a_body_without_a_length_is_counted_as_it_comes(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    chunks = iter([b" " * 2**20] * 5)  # 5 MB of JSON whitespace, chunked: no Content-Length to refuse it by
    connection.request("POST", "/v1/completions", body=chunks, encode_chunked=True,
                       headers={**server.headers, "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 413 and error_of((413, response.read()))["code"] == "request_too_large"


def test_fields_that_ask_for_nothing_more_are_accepted(server, model_name):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k3y", max_retries=0)
    response = client.chat.completions.create(
        model=model_name, messages=CHATS[0], max_tokens=3, n=1, logprobs=False, presence_penalty=0,
        response_format={"type": "text"}, user="someone", extra_body={"tools": None})
    assert response.usage.completion_tokens == 3


def test_health_answers_while_a_megabyte_prompt_is_tokenized(busy_server):
    prompt = "The quick brown fox jumps over the lazy dog. " * 22_000  # 1 MB: about a second to tokenize
    latencies = []
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(busy_server.post, "/v1/completions", {"model": busy_server.model_name, "prompt": prompt})
        while not answer.done():
            start = time.monotonic()
            assert busy_server.get("/health")[0] == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.02)
    assert error_of(answer.result())["code"] == "context_length_exceeded"  # it was tokenized: too many tokens
    assert len(latencies) >= 5 and max(latencies) < 0.5, latencies


def test_beyond_max_queue_clients_get_429_and_the_others_their_answer(busy_server):
    def complete(i):
        return busy_server.post("/v1/completions", {"model": busy_server.model_name, "prompt": f"Story {i}:",
                                                    "max_tokens": 100, "temperature": 0})

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(complete, range(20)))
    assert {status for status, _ in answers} == {200, 429}
    for answer in answers:
        if answer[0] == 429:
            assert error_of(answer)["code"] in ("queue_full", "queue_timeout")
    assert sum(status == 200 for status, _ in answers) >= 2  # both places in the batch served someone


def test_a_request_that_waits_past_queue_timeout_gets_429(busy_server):
    client = openai.OpenAI(base_url=busy_server.url + "/v1", api_key="unused", max_retries=0)
    streams = [client.completions.create(model=busy_server.model_name, prompt=f"Story {i}:", max_tokens=16_000,
                                         temperature=0, stream=True) for i in range(2)]
    for stream in streams:  # both places in the batch are taken
        next(iter(stream))
    start = time.monotonic()
    with pytest.raises(openai.RateLimitError) as error:
        client.completions.create(model=busy_server.model_name, prompt="Late", max_tokens=4)
    assert error.value.code == "queue_timeout" and 1 <= time.monotonic() - start < 10
    for stream in streams:  # a stream closed by its client frees its place
        stream.close()
    wait_until(lambda: running(busy_server) == 0, timeout=5)


def test_a_client_that_hangs_up_frees_its_row(busy_server):
    body = json.dumps({"model": busy_server.model_name, "prompt": "Once", "max_tokens": 16_000}).encode()
    with socket.create_connection(("127.0.0.1", busy_server.port)) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: running(busy_server) == 1)
    start = time.monotonic()
    wait_until(lambda: running(busy_server) == 0, timeout=5)  # decoding all 16k tokens would take far longer
    assert time.monotonic() - start < 1


def test_a_row_whose_sampling_fails_ends_alone(tiny_chat_model_dir):
    llm = LLM.load(tiny_chat_model_dir)
    scheduler = Scheduler(llm.model, max_batch_size=2, max_seq_len=128, max_queue=2, queue_timeout=60)
    prompt = "1, 2, 3,"

    async def run(temperature):
        generation = Generation(llm.tokenizer.encode(prompt), 12, temperature, 1.0, None,
                                TextStream(llm.tokenizer), asyncio.get_running_loop())
        scheduler.submit(generation)
        text = ""
        while True:
            piece, finish_reason, error = await generation.events.get()
            if error is not None:
                return error
            text += piece
            if finish_reason is not None:
                return text

    async def side_by_side():
        # a NaN temperature, which the HTTP side never lets through, makes sampling fail in that row alone
        return await asyncio.gather(run(float("nan")), run(0.0))

    scheduler.start()
    try:
        failed, answered = asyncio.run(side_by_side())
    finally:
        scheduler.shutdown()
        scheduler.thread.join()
    assert failed.status == 500 and "failed" in failed.message
    assert answered == llm.generate(prompt, max_new_tokens=12)


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be between 1 and 65535"),
    (["--host", "no-such-host.invalid"], "cannot listen on no-such-host.invalid:8000"),
    (["--api_key_file", "/no/such/key"], "--api_key_file /no/such/key"),
    (["--api_key", "a", "--api_key_file", "/no/such/key"], "give the API key once"),
    (["--max_queue", "-1"], "--max_queue must be >= 0"),
])
def test_a_bad_option_is_a_one_line_error(tiny_chat_model_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        main(["serve", str(tiny_chat_model_dir), *args])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("api_key", [None, "k3y"])
def test_a_public_address_without_a_key_warns(tiny_chat_model_dir, capsys, monkeypatch, api_key):
    if api_key is None:
        monkeypatch.delenv("LITLLM_API_KEY", raising=False)
    else:
        monkeypatch.setenv("LITLLM_API_KEY", api_key)
    with socket.socket() as taken:  # the port is taken, so the server stops right after the warning
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        with pytest.raises(SystemExit):
            main(["serve", str(tiny_chat_model_dir), "--host", "0.0.0.0", "--port", str(taken.getsockname()[1])])
    lines = capsys.readouterr().err.splitlines()
    warned = lines[0].startswith("warning: 0.0.0.0 is reachable from other machines and no API key is set")
    assert warned == (api_key is None) and lines[-1].startswith("error: cannot listen on 0.0.0.0:")
