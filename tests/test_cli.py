"""``mlxdg generate`` on tiny checkpoints: in process with typer's runner,
as a subprocess, and in a pseudo-terminal for the live view."""

import functools
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import mlx_diffgemma
from mlx_diffgemma import batch_generate, commands, load
from mlx_diffgemma.cli import app
from mlx_diffgemma.generate import Block

MAX_TOKENS = 16  # two blocks of the tiny checkpoints' 8-token canvas
PROMPT = "hello there"


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint()


def api_answer(path, seed, max_tokens=MAX_TOKENS):
    """The Python API's answer to PROMPT with the chat template."""
    model, tokenizer = load(path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        enable_thinking=False)
    return batch_generate(model, tokenizer, ids, seed=seed, max_new_tokens=max_tokens)


@pytest.fixture(scope="module")
def expected(checkpoint):
    """``api_answer`` on the module's checkpoint, by seed."""
    return functools.cache(lambda seed: api_answer(checkpoint, seed))


def mlxdg(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def run(checkpoint, *args, prompt=PROMPT, input=None):
    args = ["generate", *([] if prompt is None else [prompt]), "--model", checkpoint, "-m", MAX_TOKENS, *args]
    return mlxdg(*args, input=input)


def subprocess_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "MLXDG_MODEL"}
    return {**env, **extra}


def run_module(*args, **env):
    """``mlxdg`` in a subprocess, its output piped."""
    return subprocess.run([sys.executable, "-m", "mlx_diffgemma", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(**env), timeout=120, check=False)


def test_prints_the_answer_and_only_the_answer(checkpoint, expected):
    result = run(checkpoint, "--seed", 1)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected(1).text + "\n"
    assert "\x1b" not in result.stdout


def test_seed_reproduces_the_answer(checkpoint):
    first, again, other = (run(checkpoint, "--seed", seed).stdout for seed in (5, 5, 6))
    assert first == again != other


def test_json_schema(checkpoint, expected):
    result = run(checkpoint, "--seed", 1, "--json", "--verbose")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    want = expected(1)
    assert out == {
        "model": str(checkpoint), "seed": 1,
        "text": want.text, "thinking": "", "finish_reason": want.finish_reasons[0], "tokens": want.tokens[0],
        "steps_per_block": want.steps_per_block[0], "prompt_tokens": want.prompt_tokens,
        "prompt_tps": out["prompt_tps"], "generation_tokens": want.generation_tokens,
        "generation_tps": out["generation_tps"], "peak_memory": out["peak_memory"],
        "tokens_per_forward": want.tokens_per_forward[0],
    }
    assert out["finish_reason"] in ("stop", "length") and len(out["tokens"]) == MAX_TOKENS
    assert all(isinstance(out[k], float) and out[k] > 0 for k in ("prompt_tps", "generation_tps", "peak_memory"))


def test_verbose_prints_mlx_lm_statistics(checkpoint, expected):
    lines = run(checkpoint, "--seed", 1, "--verbose").stdout.splitlines()
    assert lines[0] == lines[2] == "=" * 10 and lines[1] == expected(1).text
    assert lines[3].startswith(f"Prompt: {expected(1).prompt_tokens} tokens, ") and lines[3].endswith(" tokens-per-sec")
    assert lines[4].startswith(f"Generation: {MAX_TOKENS} tokens, ")
    assert lines[5] == f"Diffusion: 2 blocks, {sum(expected(1).steps_per_block[0])} steps, 0.17 tokens per forward"
    assert lines[6].startswith("Peak memory: ") and lines[6].endswith(" GB") and len(lines) == 7


def test_fast_path_and_auto_canvas_flags_reach_the_engine(checkpoint):
    model, tokenizer = load(checkpoint)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        enable_thinking=False)
    for flags, options in ((["--fast", "--sc-top-k", "3"], dict(exact=False, top_k=3)),
                           (["--canvas", "auto", "-m", "2"], dict(canvas="auto", max_new_tokens=2))):
        result = run(checkpoint, "--seed", 2, "--json", *flags)
        assert result.exit_code == 0, result.output
        want = batch_generate(model, tokenizer, ids, seed=2, **{"max_new_tokens": MAX_TOKENS, **options})
        assert json.loads(result.stdout)["tokens"] == want.tokens[0]
    assert len(want.tokens[0]) == 2  # the canvas (a quarter of 8) holds just the 2 tokens asked for
    assert run(checkpoint, "--canvas", "half").exit_code != 0


def test_prompt_from_stdin_and_from_a_file(checkpoint, tmp_path):
    direct = run(checkpoint, "--seed", 2).stdout
    assert run(checkpoint, "--seed", 2, prompt="-", input=PROMPT + "\n").stdout == direct
    (tmp_path / "prompt.txt").write_text(PROMPT + "\n")
    assert run(checkpoint, "--seed", 2, "--prompt-file", tmp_path / "prompt.txt", prompt=None).stdout == direct
    # mlx-lm's -p/--prompt, with - for stdin too.
    assert run(checkpoint, "--seed", 2, "-p", PROMPT, prompt=None).stdout == direct
    assert run(checkpoint, "--seed", 2, "--prompt", "-", prompt=None, input=PROMPT).stdout == direct
    both = run(checkpoint, "-p", PROMPT)
    assert both.exit_code == 2 and both.stderr.startswith("mlxdg: ") and "-p/--prompt" in both.stderr


def test_temp_is_t_min_and_t_max_both(checkpoint):
    def tokens(*args):
        result = mlxdg("generate", "-p", "hi", *args, "-m", 8, "--model", checkpoint, "--seed", 5, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["tokens"]

    constant = tokens("--temp", 0.5)
    assert constant == tokens("--t-min", 0.5, "--t-max", 0.5) and constant != tokens("--temp", 1.5)
    clash = mlxdg("generate", "-p", "hi", "--temp", 0.5, "--t-min", 0.2, "--model", checkpoint)
    assert clash.exit_code == 2 and clash.stderr.startswith("mlxdg: ") and "--temp" in clash.stderr
    zero = mlxdg("generate", "-p", "hi", "--temp", 0, "--model", checkpoint)
    assert zero.exit_code == 2 and zero.stderr.count("\n") == 1 and "--temp must be above 0" in zero.stderr, zero.stderr


@pytest.mark.parametrize("args, code, message", [
    (["generate", "hi", "--tmep", 3], 2, "no such option (--tmep): did you mean --temp?"),
    (["generate", "hi", "--max-tokns", 3], 2, "did you mean --max-tokens?"),
    (["generate", "hi", "-m", 0], 2, "Invalid value for '--max-tokens' / '-m'"),
    (["generat", "hi"], 2, "No such command 'generat'"),
    (["chat", "--steps"], 2, "requires an argument"),
    (["bench", "--steps", "x,y"], 2, "--steps"),
])
def test_usage_errors_are_one_line(args, code, message):
    result = mlxdg(*args)
    assert result.exit_code == code and result.stdout == ""
    assert result.stderr.startswith("mlxdg: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr


def test_version_and_debug_on_every_command():
    assert mlxdg("--version").stdout == f"mlx-diffgemma {mlx_diffgemma.__version__}\n"
    assert mlxdg("version", "--debug").exit_code == 0
    failed = mlxdg("convert", "--hf-path", "/no/such/dir", "--debug")
    assert failed.exit_code == 1 and failed.stderr.startswith("mlxdg: ")


def test_help_loads_no_model_code():
    """``--help`` imports neither mlx-lm nor transformers (their import takes seconds);
    and the package's ``generate`` is the function, whichever import came first."""
    code = ("import sys, mlx_diffgemma.generate, mlx_diffgemma.cli as cli\n"
            "assert callable(mlx_diffgemma.generate) and mlx_diffgemma.generate.__module__ == 'mlx_diffgemma.generate'\n"
            "from mlx_diffgemma import generate; assert generate is sys.modules['mlx_diffgemma.generate'].generate\n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
    code = ("import sys\nfrom mlx_diffgemma.cli import app\ntry:\n    app(['generate', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('mlx_lm', 'transformers', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "[]", done.stderr


def test_prompt_options_shape_the_prompt(checkpoint):
    _, tokenizer = load(checkpoint)

    def prompt_tokens(*args):
        return json.loads(run(checkpoint, "--json", *args).stdout)["prompt_tokens"]

    def template(messages, think=False):
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=think))

    user = {"role": "user", "content": PROMPT}
    assert prompt_tokens() == template([user])
    assert prompt_tokens("--think") == template([user], think=True) < template([user])
    assert prompt_tokens("--system", "be brief") == template([{"role": "system", "content": "be brief"}, user])
    assert prompt_tokens("--no-chat-template") == len(tokenizer.encode(PROMPT))


def test_ctrl_c_prints_what_was_committed(checkpoint, monkeypatch):
    """Ctrl-C after the first block: that block is the output, exit 130."""
    first = []

    def interrupted(*args, **kwargs):
        for event in stream(*args, **kwargs):
            yield event
            if isinstance(event, Block):
                first.append(event.texts[0])
                os.kill(os.getpid(), signal.SIGINT)

    stream = commands.stream_blocks
    monkeypatch.setattr(commands, "stream_blocks", interrupted)
    result = run(checkpoint, "--seed", 1, "-m", 64)
    assert result.exit_code == 130
    assert result.stdout == first[0] + "\n"
    assert "interrupted; the answer so far is the 1 committed block\n" in result.stderr

    first.clear()
    result = run(checkpoint, "--seed", 1, "-m", 64, "--json")
    assert result.exit_code == 130
    out = json.loads(result.stdout)
    assert out["finish_reason"] == "interrupted" and out["text"] == first[0] and len(out["tokens"]) == 8


def test_thinking_goes_to_stderr_and_json(checkpoint, monkeypatch):
    """The thinking channel's text, without its name, never reaches stdout."""
    segments = [("", "thought"), ("Hi", "\nfirst, "), (" there", "greet")]

    def thinking_stream(*args, **kwargs):
        for i, (text, thought) in enumerate(segments):
            yield Block(round=i, rows=(0,), row_blocks=(i,), tokens=np.full((1, 8), 5), texts=[text],
                        generated=[8], thinking=[thought], steps=[3], finish_reasons=[None if i < 2 else "stop"],
                        tokens_per_forward=[8 / 3], prompt_tokens=30, prompt_tps=1.0, generation_tokens=24,
                        generation_tps=1.0, peak_memory=0.1)

    monkeypatch.setattr(commands, "stream_blocks", thinking_stream)
    result = run(checkpoint, "--think")
    assert (result.stdout, result.stderr) == ("Hi there\n", "first, greet")
    out = json.loads(run(checkpoint, "--think", "--json").stdout)
    assert (out["text"], out["thinking"], out["steps_per_block"]) == ("Hi there", "first, greet", [3, 3, 3])


def wrong_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("args, code, message", [
    pytest.param(["--model", "/no/such/checkpoint"], 1, "/no/such/checkpoint: no such directory", id="no such model"),
    pytest.param(["--model", wrong_model_type], 1, "holds a 'llama' model, not a DiffusionGemma", id="model type"),
    pytest.param(["--max-tokens", 4096], 1, "the prompt is 48 tokens; with up to 4096 new tokens that needs 4144 "
                 "positions, but the model has 4096; shorten the prompt or lower --max-tokens",
                 id="prompt and answer too long"),
    pytest.param(["--memory-limit", "1KB"], 1, "is available; use a smaller quantization", id="memory"),
    pytest.param(["--steps", 0], 2, "Invalid value for '--steps'", id="steps"),
    pytest.param(["--t-min", 0.9, "--t-max", 0.5], 2, "need 0 <= t_min <= t_max", id="temperatures"),
    pytest.param(["--memory-limit", "lots"], 2, "not a memory size: 'lots'", id="memory limit"),
    pytest.param(["--cpu-dequantize", "sometimes"], 2, "Invalid value for '--cpu-dequantize'", id="dequantize"),
    pytest.param(["--prompt-file", os.devnull], 2, "the prompt is empty", id="empty prompt"),
    pytest.param(["--prompt-file", "/no/such/file"], 2, "Invalid value for '--prompt-file'", id="prompt file"),
])
def test_errors(checkpoint, tmp_path, monkeypatch, args, code, message):
    """One line, the right exit code, and no weights read first."""
    def never(*a, **k):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(commands.Checkpoint, "load", never)  # the one place weights are read
    args = [a(tmp_path) if callable(a) else a for a in args]
    model = [] if "--model" in args else ["--model", checkpoint]
    prompt = [] if "--prompt-file" in args else ["x" * 22]
    result = mlxdg("generate", *prompt, *model, *args)
    assert result.exit_code == code, result.output
    assert message in " ".join(result.stderr.split()), result.stderr
    assert result.stderr.startswith("mlxdg: ") and result.stderr.count("\n") == 1, result.stderr


def test_a_batch_that_cannot_fit_fails_before_the_weights_are_read(checkpoint, tmp_path, monkeypatch):
    """--max-batch asks for canvases the memory limit has no room for."""
    def never(*a, **k):
        raise AssertionError("the weights were read")

    (tmp_path / "prompts.txt").write_text("one\ntwo\nthree\n")
    args = ["generate", "--prompts-file", tmp_path / "prompts.txt", "--model", checkpoint, "-m", MAX_TOKENS]
    tight = next(limit for limit in range(1 << 16, 1 << 30, 1 << 14)
                 if mlxdg(*args, "--memory-limit", limit, "--max-batch", 1).exit_code == 0)
    monkeypatch.setattr(commands.Checkpoint, "load", never)  # the one place weights are read
    result = mlxdg(*args, "--memory-limit", tight, "--max-batch", 3)
    assert result.exit_code == 1 and "3 x " in result.stderr and "is available" in result.stderr


def test_no_prompt_is_a_usage_error(checkpoint):
    result = mlxdg("generate", "--model", checkpoint)
    assert result.exit_code == 2 and "give a prompt" in result.stderr


def test_prompt_longer_than_the_model_positions(make_checkpoint):
    result = mlxdg("generate", "x" * 60, "--model", make_checkpoint(max_position_embeddings=64), "-m", 8)
    assert result.exit_code == 1
    assert "positions, but the model has 64; shorten the prompt" in result.stderr


def test_debug_keeps_the_traceback(tmp_path):
    result = mlxdg("generate", "x", "--model", wrong_model_type(tmp_path), "--debug")
    assert result.exit_code == 1 and "not a DiffusionGemma" in str(result.exception)


def test_subprocess_pipe_gets_plain_text_and_model_comes_from_the_environment(checkpoint, expected):
    result = run_module("generate", PROMPT, "-m", MAX_TOKENS, "--seed", 1, MLXDG_MODEL=str(checkpoint))
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected(1).text + "\n"


def test_subprocess_default_model_offline_says_how_to_get_it(tmp_path):
    result = run_module("generate", PROMPT, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"mlxdg: {commands.DEFAULT_MODEL} is not in the Hugging Face cache")
    assert f"hf download {commands.DEFAULT_MODEL}" in result.stderr and "mlxdg convert" in result.stderr


def test_live_view_in_a_terminal(make_checkpoint):
    """In a pseudo-terminal the canvas is drawn while denoising, no line is
    ever on the screen twice, and the final screen holds the committed text
    and no trace of the canvas. The checkpoint settles, so its canvases end
    as the committed text (the case where a stale canvas would show twice)."""
    pexpect = pytest.importorskip("pexpect")
    pyte = pytest.importorskip("pyte")
    path = make_checkpoint(damping=0.3)
    rows, columns, tokens = 24, 40, 6 * 8  # enough blocks for whole lines to be printed above the canvas
    child = pexpect.spawn(sys.executable, ["-m", "mlx_diffgemma", "generate", PROMPT, "--model", str(path),
                                           "-m", str(tokens), "--seed", "3"],
                          env=subprocess_env(TERM="xterm-256color"), dimensions=(rows, columns), timeout=120)
    raw = child.read()
    child.close()
    assert child.exitstatus == 0, raw[-2000:]
    screen = pyte.Screen(columns, rows)
    stream = pyte.ByteStream(screen)
    frames = raw.split(b"accepted")  # the end of the status line, the last thing a frame draws
    assert len(frames) > 2 and b"step 1/48" in frames[0]
    for frame in frames:
        stream.feed(frame)
        lines = [line for line in screen.display if line.strip()]
        assert all(a[:30] != b[:30] for a, b in zip(lines, lines[1:])), "\n".join(screen.display)
    shown = "".join(screen.display)
    assert "settled" not in shown

    text = api_answer(path, 3, tokens).text
    assert len(text) > 2 * columns and "".join(text.split()) in "".join(shown.split())


def test_prompts_file_answers_in_order_as_a_batch(checkpoint, tmp_path, monkeypatch):
    """Batched answers equal the Python API's batch, in the file's order (plain lines and JSON Lines)."""
    prompts = ["hello there", "why is the sky blue?", "hi"]
    (tmp_path / "plain.txt").write_text("\n".join(prompts) + "\n\n")
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts))
    model, tokenizer = load(checkpoint)
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         enable_thinking=False) for p in prompts]
    api = batch_generate(model, tokenizer, ids, seed=3, max_new_tokens=MAX_TOKENS)

    result = mlxdg("generate", "--prompts-file", tmp_path / "lines.jsonl", "--model", checkpoint,
                   "-m", MAX_TOKENS, "--seed", 3, "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2] and [r["prompt"] for r in records] == prompts
    assert [r["text"] for r in records] == api.texts and [r["tokens"] for r in records] == api.tokens

    plain = mlxdg("generate", "--prompts-file", tmp_path / "plain.txt", "--model", checkpoint,
                  "-m", MAX_TOKENS, "--seed", 3)
    assert plain.exit_code == 0 and plain.stdout == "".join(t + "\n\n" for t in api.texts)
    verbose = mlxdg("generate", "--prompts-file", tmp_path / "plain.txt", "--model", checkpoint,
                    "-m", MAX_TOKENS, "--seed", 3, "--verbose")
    longest = max(api.texts, key=len)
    assert verbose.stdout.count(longest) == 1 and "Generation: " in verbose.stdout, "each answer once, then the stats"

    two_at_a_time = mlxdg("generate", "--prompts-file", tmp_path / "lines.jsonl", "--model", checkpoint,
                          "-m", MAX_TOKENS, "--seed", 3, "--json", "--max-batch", 2)
    paired = batch_generate(model, tokenizer, ids, seed=3, max_new_tokens=MAX_TOKENS, max_batch=2)
    assert paired.tokens != api.tokens, "two at a time draws other noise than three at once"
    assert [json.loads(line)["tokens"] for line in two_at_a_time.stdout.splitlines()] == paired.tokens
    alone = mlxdg("generate", "hi", "--model", checkpoint, "--max-batch", 2)
    assert alone.exit_code == 2 and "--max-batch goes with --prompts-file" in alone.output

    # Ctrl-C once the first prompt is done (one at a time): its answer is already written.
    stream = commands.stream_blocks

    def interrupted_after_the_first_answer(*args, **kwargs):
        for event in stream(*args, **kwargs):
            yield event
            if isinstance(event, Block) and event.rows == (0,) and event.finish_reasons[0] is not None:
                raise KeyboardInterrupt

    one_at_a_time = batch_generate(model, tokenizer, ids, seed=3, max_new_tokens=MAX_TOKENS, max_batch=1)
    monkeypatch.setattr(commands, "stream_blocks", interrupted_after_the_first_answer)
    stopped = mlxdg("generate", "--prompts-file", tmp_path / "lines.jsonl", "--model", checkpoint,
                    "-m", MAX_TOKENS, "--seed", 3, "--json", "--max-batch", 1)
    assert stopped.exit_code == 130 and "the first 1 of 3 answers were written" in stopped.stderr
    assert [json.loads(line)["tokens"] for line in stopped.stdout.splitlines()] == one_at_a_time.tokens[:1]

    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt key"}\n')
    bad = mlxdg("generate", "--prompts-file", tmp_path / "bad.jsonl", "--model", checkpoint)
    assert bad.exit_code == 2 and "line 1 is not a JSON object" in bad.output
