"""``mlxdg serve`` driven on loopback with the official ``openai`` client (and
raw HTTP where a client would hide what is tested), on tiny checkpoints."""

import http.client
import json
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import openai
import pytest
from mlx_lm.utils import load_tokenizer

from mlx_diffgemma.loader import read_config
from mlx_diffgemma.model import ModelArgs
from mlx_diffgemma.server import Server, open_server
from mlx_diffgemma.server.prefix import PrefixCache
from mlx_diffgemma.server.protocol import Served
from mlx_diffgemma import batch_generate, load
from mlx_diffgemma.server.scheduler import Committed, DraftStep, Job, Scheduler, Started
from mlx_diffgemma.sampler import SamplerConfig

L = 8  # canvas length of the tiny checkpoints
# A settling checkpoint (see tiny_checkpoints.write_checkpoint): blocks stop at
# different steps, and encoding a prompt in pieces (float32 rounding) does not
# change its answers. Token 42 ends answers too, so some stop mid-block.
GENERATION = {"eos_token_id": [1, 106, 42], "max_denoising_steps": 12, "confidence_threshold": 0.5}
HELLO = [{"role": "user", "content": "hello"}]


class LogLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def of(self, request_id):
        return next(line for line in self.lines if line.startswith(request_id + " "))


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint("two_layer", damping=0.3, generation_config=GENERATION)


@pytest.fixture(scope="module")
def log_lines():
    lines = LogLines()
    logger = logging.getLogger("mlxdg.server")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(lines)


def started(path, **options):
    return open_server(str(path), port=0, max_tokens=2 * L, **options).start()


@pytest.fixture(scope="module")
def server(checkpoint, log_lines):
    srv = started(checkpoint)
    yield srv
    srv.close(cancel=True)


def client(srv, **options):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=options.pop("api_key", "none"), max_retries=0, **options)


def chat(srv, messages=HELLO, **options):
    return client(srv).chat.completions.create(model=srv.served.id, messages=messages, **options)


def raw(srv, method, path, body=None, headers=None):
    """(status, headers, parsed JSON body) of one plain HTTP request."""
    host, port = srv.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), json.loads(payload) if payload else None


def test_models_and_health(server):
    models = client(server).models.list().data
    assert [m.id for m in models] == [server.served.id]
    status, _, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["active"] == 0


def test_chat_streamed_and_not_give_the_same_answer(server):
    whole = chat(server, seed=3, max_tokens=13)
    chunks = list(chat(server, seed=3, max_tokens=13, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # One chunk per committed block that has new text, and at most two blocks for 13 tokens.
    assert len(chunks) <= 1 + 2


@pytest.mark.parametrize("seed", [1, 4])
def test_max_tokens_trims_exactly(server, seed):
    """Usage counts emitted tokens (never a whole canvas), and a shorter answer is the longer one's start."""
    answers = {n: chat(server, seed=seed, max_tokens=n) for n in (3, 8, 11, 3 * L)}
    longest = answers[3 * L]
    for n, answer in answers.items():
        reason, used = answer.choices[0].finish_reason, answer.usage.completion_tokens
        assert used == n if reason == "length" else (reason == "stop" and used <= n)
        assert longest.choices[0].message.content.startswith(answer.choices[0].message.content or "")
    assert answers[3].usage.completion_tokens <= 3 < L


def test_seed_reproduces_and_max_completion_tokens(server):
    first, again = chat(server, seed=9), chat(server, seed=9, max_completion_tokens=2 * L)
    other = chat(server, seed=10)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content


def test_a_seeded_answer_is_the_python_apis(server, checkpoint):
    model, tokenizer = load(checkpoint)
    ids = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, enable_thinking=False)
    for seed in (4, 7):
        expected = batch_generate(model, tokenizer, [ids], seed=seed, max_tokens=3 * L)
        answer = chat(server, seed=seed, max_tokens=3 * L)
        assert answer.choices[0].message.content == expected.texts[0]
        assert answer.choices[0].finish_reason == expected.finish_reasons[0]


def test_temperature_is_a_constant_temperature(server, checkpoint):
    """`temperature` (what OpenAI front-ends send) is `--temp`: t_min = t_max = it."""
    model, tokenizer = load(checkpoint)
    ids = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, enable_thinking=False)
    expected = batch_generate(model, tokenizer, [ids], seed=5, max_tokens=2 * L, temp=1.3).texts[0]
    answer = chat(server, seed=5, max_tokens=2 * L, temperature=1.3).choices[0].message.content
    assert answer == expected
    assert answer == chat(server, seed=5, max_tokens=2 * L, extra_body={"t_min": 1.3, "t_max": 1.3}).choices[0].message.content
    assert answer != chat(server, seed=5, max_tokens=2 * L).choices[0].message.content


def test_the_fast_path_serves_the_python_apis_fast_answer(checkpoint):
    model, tokenizer = load(checkpoint)
    ids = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, enable_thinking=False)
    expected = batch_generate(model, tokenizer, [ids], seed=1, max_tokens=3 * L, exact=False, top_k=5)
    exact = batch_generate(model, tokenizer, [ids], seed=1, max_tokens=3 * L)
    assert expected.texts != exact.texts  # what this case is for
    fast = started(checkpoint, exact=False, sc_top_k=5)
    try:
        assert chat(fast, seed=1, max_tokens=3 * L).choices[0].message.content == expected.texts[0]
    finally:
        fast.close()


def test_adapters_are_served(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from mlx_diffgemma.cli import app

    data = tmp_path / "data"
    data.mkdir()
    rows = "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in [("hi", "hello"), ("cat", "meow")])
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text(rows)
    out = tmp_path / "adapters"
    result = CliRunner().invoke(app, ["lora", "--model", str(checkpoint), "--train", "--data", str(data),
                                      "--fine-tune-type", "full", "--iters", "30", "--batch-size", "2",
                                      "--learning-rate", "3e-3", "--steps-per-eval", "1000", "--adapter-path", str(out)])
    assert result.exit_code == 0, result.output
    model, tokenizer = load(checkpoint, adapter_path=out)
    ids = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, enable_thinking=False)
    tuned = started(checkpoint, adapter_path=str(out))
    try:
        for seed in (1, 2):
            expected = batch_generate(model, tokenizer, [ids], seed=seed, max_tokens=2 * L).texts[0]
            assert chat(tuned, seed=seed).choices[0].message.content == expected
    finally:
        tuned.close()
    base_model, _ = load(checkpoint)
    assert expected != batch_generate(base_model, tokenizer, [ids], seed=2, max_tokens=2 * L).texts[0]


def test_text_completions(server):
    c = client(server)
    whole = c.completions.create(model=server.served.id, prompt="abc de", seed=2, max_tokens=10)
    streamed = list(c.completions.create(model=server.served.id, prompt="abc de", seed=2, max_tokens=10, stream=True))
    assert "".join(s.choices[0].text for s in streamed) == whole.choices[0].text
    assert streamed[-1].usage.completion_tokens == whole.usage.completion_tokens <= 10
    ids = server.served.tokenizer.encode("abc de")
    by_ids = c.completions.create(model=server.served.id, prompt=ids, seed=2, max_tokens=10)
    assert by_ids.choices[0].text == whole.choices[0].text


def test_conversation_reuses_the_cache_and_matches_a_cold_run(server, checkpoint, log_lines):
    first = chat(server, seed=5)
    history = HELLO + [{"role": "assistant", "content": first.choices[0].message.content},
                       {"role": "user", "content": "and you?"}]
    second = chat(server, messages=history, seed=6)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Everything the first turn's prompt shares with the second: all of it but the generation prompt's empty
    # thinking channel, which a past turn does not carry.
    tokenizer = server.served.tokenizer
    opening = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, enable_thinking=False)
    tail = tokenizer.encode("<|channel>thought\n<channel|>", add_special_tokens=False)
    assert cached == len(opening) - len(tail) > 0
    assert f"cached={cached}" in log_lines.of(second.id)
    cold = started(checkpoint, prefix_cache=False)
    try:
        assert chat(cold, messages=history, seed=6).choices[0].message.content == second.choices[0].message.content
        assert chat(cold, messages=history, seed=6).usage.prompt_tokens_details.cached_tokens == 0
    finally:
        cold.close()


def test_concurrent_clients_each_get_their_alone_answer(server, log_lines):
    requests = [dict(messages=[{"role": "user", "content": f"question {i}" + "!" * i}], seed=i, max_tokens=4 * L)
                for i in range(8)]
    alone = [chat(server, **r) for r in requests]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: chat(server, **r), requests))
    for a, t in zip(alone, together):
        assert t.choices[0].message.content == a.choices[0].message.content
        assert (t.choices[0].finish_reason, t.usage.completion_tokens) == (a.choices[0].finish_reason,
                                                                          a.usage.completion_tokens)
    shared = [int(re.search(r"batch=[0-9.]+/(\d+)", log_lines.of(t.id)).group(1)) for t in together]
    assert max(shared) >= 4, shared  # their canvases went through the same passes
    assert all(f"batch=1.0/1" in log_lines.of(a.id) for a in alone)


@pytest.mark.parametrize("body, status, param", [
    ({"messages": HELLO, "model": "gpt-4"}, 404, "model"),
    ({}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": HELLO, "max_tokens": -1}, 400, "max_tokens"),
    ({"messages": HELLO, "max_tokens": "8"}, 400, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 5000}, 400, "messages"),
    ({"messages": HELLO, "top_p": 0.5}, 400, "top_p"),
    ({"messages": HELLO, "top_k": 40}, 400, "top_k"),
    ({"messages": HELLO, "n": 2}, 400, "n"),
    ({"messages": HELLO, "logprobs": True}, 400, "logprobs"),
    ({"messages": HELLO, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"messages": HELLO, "temperature": 0}, 400, "temperature"),
    ({"messages": HELLO, "temperature": 0.7, "t_max": 0.9}, 400, "temperature"),
    ({"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ({"messages": HELLO, "max_denoising_steps": 0}, 400, None),
    ({"messages": HELLO, "seed": -1}, 400, "seed"),
    ({"messages": HELLO, "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages"),
])
def test_bad_requests_get_a_json_error(server, body, status, param):
    got, _, error = raw(server, "POST", "/v1/chat/completions", body)
    assert got == status and error["error"]["param"] == param and error["error"]["message"]


def test_prompt_over_the_context_and_malformed_json(server):
    status, _, error = raw(server, "POST", "/v1/completions", {"prompt": [5] * 4100})
    assert status == 400 and error["error"]["code"] == "context_length_exceeded"
    status, _, error = raw(server, "POST", "/v1/chat/completions", b'{"messages": [')
    assert status == 400 and "not valid JSON" in error["error"]["message"]
    status, _, error = raw(server, "POST", "/v1/chat/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in error["error"]["message"]
    assert raw(server, "POST", "/v1/nowhere", {})[0] == 404
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client(server).chat.completions.create(model="gpt-4", messages=HELLO)
    # And the server is still up and answers as before.
    assert chat(server, seed=9).choices[0].message.content == chat(server, seed=9).choices[0].message.content


def test_client_that_disconnects_mid_stream_frees_its_slot(server, log_lines):
    host, port = server.httpd.server_address[:2]
    sock = socket.create_connection((host, port), timeout=30)
    body = json.dumps({"messages": HELLO, "stream": True, "max_tokens": 60 * L, "seed": 1, "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    received = b""
    while received.count(b"data: ") < 2:  # the role chunk and the first block
        received += sock.recv(4096)
    request_id = re.search(rb'"id": "([^"]+)"', received).group(1).decode()
    sock.close()
    deadline = time.time() + 10
    while not any(line.startswith(request_id + " ") for line in log_lines.lines) and time.time() < deadline:
        time.sleep(0.02)
    line = log_lines.of(request_id)
    assert "finish=cancelled" in line
    assert int(re.search(r"blocks=(\d+)", line).group(1)) < 10  # of 60
    assert raw(server, "GET", "/health")[2]["active"] == 0
    assert chat(server, seed=9).choices[0].message.content == chat(server, seed=9).choices[0].message.content


def test_flood_past_the_queue_gets_503_with_retry_after(checkpoint):
    srv = started(checkpoint, max_batch=1, max_queue=2)
    try:
        body = {"messages": HELLO, "max_tokens": 20 * L, "seed": 0, "ignore_eos": True}
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda _: raw(srv, "POST", "/v1/chat/completions", body), range(10)))
        busy = [r for r in results if r[0] == 503]
        done = [r for r in results if r[0] == 200]
        assert busy and done and len(busy) + len(done) == 10
        assert all(r[1]["Retry-After"] == "1" and r[2]["error"]["code"] == "queue_full" for r in busy)
        assert len({r[2]["choices"][0]["message"]["content"] for r in done}) == 1  # the same seed, the same answer
        assert raw(srv, "GET", "/health")[2]["waiting"] == 0
    finally:
        srv.close()


def test_api_key(checkpoint):
    srv = started(checkpoint, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(srv, api_key="wrong").chat.completions.create(model=srv.served.id, messages=HELLO)
        assert raw(srv, "GET", "/v1/models")[0] == 401
        assert raw(srv, "GET", "/health")[0] == 200
        answer = client(srv, api_key="s3cret").chat.completions.create(model=srv.served.id, messages=HELLO, seed=1)
        assert answer.choices[0].message.content
    finally:
        srv.close()


def test_drafts_only_when_asked(server):
    c = client(server)
    plain = list(c.chat.completions.create(model=server.served.id, messages=HELLO, seed=1, stream=True))
    assert all(c.choices for c in plain)
    drafted = list(c.chat.completions.create(model=server.served.id, messages=HELLO, seed=1, stream=True,
                                             extra_body={"stream_drafts": True}))
    drafts = [d.model_extra["draft"] for d in drafted if not d.choices]
    assert drafts and drafts[0]["step"] == 1 and drafts[0]["block"] == 0
    text = "".join(d.choices[0].delta.content or "" for d in drafted if d.choices)
    assert text == "".join(p.choices[0].delta.content or "" for p in plain)


def test_sampler_settings_as_extra_fields(server, log_lines):
    few = chat(server, seed=1, extra_body={"max_denoising_steps": 2})
    assert re.search(r"blocks=(\d+) steps=(\d+)", log_lines.of(few.id)).group(2) in ("2", "4")


class Recorder:
    """A job's event queue that keeps everything, and cancels the job from
    the engine's own thread once it reports step ``at`` = (block, step)."""

    def __init__(self, at=None):
        self.events, self.at, self.job, self.done = [], at, None, threading.Event()

    def put(self, event):
        self.events.append(event)
        if isinstance(event, DraftStep) and (event.block, event.step) == self.at:
            self.job.cancel()
        if isinstance(event, Committed) and event.finish is not None:
            self.done.set()

    def tokens(self):
        return [int(t) for e in self.events if isinstance(e, Committed) for t in e.tokens]


def test_a_cancelled_request_leaves_at_the_next_step_and_its_neighbour_goes_on(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    # MLX streams belong to a thread: the engine thread loads the model it runs.
    scheduler = Scheduler(lambda: load(checkpoint)[0], max_batch=4, prefix_cache=False)
    config = SamplerConfig.from_checkpoint(checkpoint).override(max_new_tokens=4 * L, eos_token_id=())
    prompt = np.array(tokenizer.encode("hello"), dtype=np.int32)

    def job(seed, at=None):
        recorder = Recorder(at)
        recorder.job = Job(f"job{seed}", prompt, config, seed, drafts=True, events=recorder)
        return recorder

    leaving, staying = job(1, at=(1, 1)), job(2)
    for r in (leaving, staying):  # queued before the engine starts, so both join the first batch
        scheduler.submit(r.job)
    scheduler.start()
    try:
        assert leaving.done.wait(30) and staying.done.wait(30)
        first_block_steps = sum(1 for e in leaving.events if isinstance(e, DraftStep) and e.block == 0)
        assert leaving.job.steps == first_block_steps + 1 and leaving.job.finish == "cancelled"
        assert leaving.job.most_shared == 2
        alone = job(2)
        scheduler.submit(alone.job)
        assert alone.done.wait(30)
        assert staying.tokens() == alone.tokens() and len(alone.tokens()) == 4 * L
        assert staying.job.steps == alone.job.steps
    finally:
        scheduler.stop()


# -- tools and thinking, with a scheduler that answers with set tokens -----------------------

TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|turn>system\n{% for t in tools %}declare:{{ t['function']['name'] }}\n"
    "{% endfor %}<turn|>\n{% endif %}{% for m in messages %}<|turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% if not enable_thinking %}<|channel>thought\n<channel|>"
    "{% endif %}{% endif %}"
)


class Scripted:
    """The scheduler interface, answering every request with ``tokens`` in canvas-sized blocks."""

    def __init__(self):
        self.tokens, self.prompts, self.max_batch, self.max_queue = [], [], 1, 1

    def start(self):
        pass

    def stop(self, cancel_active=False, timeout=None):
        pass

    def join(self, timeout=None):
        return True

    def healthy(self):
        return True

    def stats(self):
        return {"active": 0, "waiting": 0}

    def fits_alone(self, prompt_tokens, max_new_tokens):
        pass

    def submit(self, job):
        self.prompts.append(job.prompt)
        job.events.put(Started(0))
        tokens = self.tokens[: job.config.max_new_tokens]
        for start in range(0, len(tokens), L):
            last = start + L >= len(tokens)
            job.completion_tokens = start + len(tokens[start : start + L])
            job.events.put(Committed(np.array(tokens[start : start + L]), 1, ("stop" if last else None)))


@pytest.fixture(scope="module")
def scripted(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "checkpoint"
    shutil.copytree(checkpoint, path)
    (path / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    tokenizer = load_tokenizer(path)
    sampler = SamplerConfig(max_new_tokens=64, eos_token_id=[1])
    served = Served("scripted", tokenizer, ModelArgs.from_dict(read_config(path)), sampler)
    scheduler = Scripted()
    srv = Server(served, scheduler, port=0).start()
    yield srv, scheduler
    srv.close()


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_tools_reach_the_template_and_calls_come_back_parsed(scripted):
    srv, scheduler = scripted
    tokenizer = srv.served.tokenizer
    call = ids(tokenizer, 'call:get_weather{city:<|"|>Paris<|"|>}')
    scheduler.tokens = ids(tokenizer, "Let me look.") + [48, *call, 49] + [1]
    answer = chat(srv, tools=[WEATHER])
    assert "declare:get_weather" in tokenizer.decode(scheduler.prompts[-1].tolist())
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    chunks = list(chat(srv, tools=[WEATHER], stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "<|tool_call>" not in "".join(c.choices[0].delta.content or "" for c in chunks)
    chat(srv, tools=[WEATHER], tool_choice="none")
    assert "declare" not in tokenizer.decode(scheduler.prompts[-1].tolist())


def test_thinking_goes_to_reasoning_content_only_when_asked(scripted):
    srv, scheduler = scripted
    tokenizer = srv.served.tokenizer
    scheduler.tokens = [100, *ids(tokenizer, "thought\nhmm, yes"), 101, *ids(tokenizer, "Yes."), 1]
    answer = chat(srv, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert not tokenizer.decode(scheduler.prompts[-1].tolist()).endswith("<channel|>")
    assert answer.choices[0].message.content == "Yes."
    assert answer.choices[0].message.model_extra["reasoning_content"] == "hmm, yes"
    chunks = list(chat(srv, stream=True, extra_body={"chat_template_kwargs": {"enable_thinking": True}}))
    assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks) == "hmm, yes"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Yes."
    chat(srv, reasoning_effort="high")
    assert not tokenizer.decode(scheduler.prompts[-1].tolist()).endswith("<channel|>")
    for off in ({}, {"reasoning_effort": "none"}):
        chat(srv, **off)
        assert tokenizer.decode(scheduler.prompts[-1].tolist()).endswith("<|channel>thought\n<channel|>")


def test_stop_strings_cut_the_answer_even_across_blocks(scripted):
    srv, scheduler = scripted
    tokenizer = srv.served.tokenizer
    scheduler.tokens = ids(tokenizer, "Hello world. And more after it.") + [1]
    assert len(ids(tokenizer, "Hello w")) < L < len(ids(tokenizer, "Hello world"))  # the stop string spans a block
    answer = chat(srv, stop=["world", "zzz"])
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == ("Hello ", "stop")
    chunks = list(chat(srv, stop="world", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello "
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chat(srv, stop=["nowhere"]).choices[0].message.content == "Hello world. And more after it."
    assert raw(srv, "POST", "/v1/chat/completions", {"messages": HELLO, "stop": [1]})[0] == 400


# -- the command ----------------------------------------------------------------------------

def test_serve_command_finishes_in_flight_requests_on_sigterm(checkpoint):
    process = subprocess.Popen([sys.executable, "-m", "mlx_diffgemma", "serve", "--model", str(checkpoint),
                                "--port", "0", "-m", str(2 * L)], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in process.stderr:
            if match := re.search(r"at (http://\S+)", line):
                url = match.group(1)
                break
        assert url, "the server did not start"
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        result = {}
        thread = threading.Thread(target=lambda: result.update(
            answer=c.chat.completions.create(model=str(checkpoint), messages=HELLO, max_tokens=30 * L, seed=1, extra_body={"ignore_eos": True})))
        thread.start()
        deadline = time.time() + 30
        while json.loads(urllib.request.urlopen(url + "/health").read())["active"] == 0:
            assert time.time() < deadline and thread.is_alive()
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        thread.join(60)
        assert result["answer"].choices[0].finish_reason in ("stop", "length")
        assert process.wait(30) == 0
        assert "stopped" in process.stderr.read()
    finally:
        process.kill()


def test_prefix_cache_is_bounded_and_keeps_the_latest_turn(checkpoint):
    model, _ = load(checkpoint)
    rng = np.random.default_rng(0)

    def encoded(tokens):
        cache = model.make_cache()
        model.encode(mx.array(tokens[None]), cache)
        return cache

    a, b = rng.integers(3, 100, 20).astype(np.int32), rng.integers(3, 100, 20).astype(np.int32)
    probe = PrefixCache(1 << 30)
    probe.store(a, encoded(a))
    size = probe.bytes
    cache = PrefixCache(int(2.5 * size), max_entries=8)
    cache.store(a, encoded(a))
    cache.store(b, encoded(b))
    assert cache.lookup(np.concatenate([a, b]))[0].offset == len(a) and cache.lookup(b[:10]) is None
    longer = np.concatenate([a, b])
    cache.store(longer, encoded(longer))  # a's next turn replaces a; b goes for room
    assert [len(t) for t, _, _ in cache.entries.values()] == [len(longer)] and cache.bytes <= cache.capacity
    hit = cache.lookup(np.concatenate([longer, a]))
    assert hit[0].offset == len(longer)
    # Extending a copy leaves the stored entry as it was.
    model.encode(mx.array(a[None]), hit)
    assert cache.lookup(longer)[0].offset == len(longer)
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (3, 1, 1)


def test_serve_bench_on_a_tiny_synthetic_model(tmp_path, capsys):
    from mlx_diffgemma.bench.serve import main

    assert main(["--synthetic", "tiny", "--clients", "1,2", "--gen-tokens", "40", "--rounds", "1",
                 "--json", str(tmp_path / "serve.json")]) == 0
    records = json.loads((tmp_path / "serve.json").read_text())["records"]
    assert [(r["clients"], r["requests"], r["completion_tokens"]) for r in records] == [(1, 1, 40), (2, 2, 80)]
    assert "tok/s" in capsys.readouterr().out
