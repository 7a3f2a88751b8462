"""``mlxdg chat``: turns continue the KV cache and encode only what is new,
and give what a fresh run on the whole conversation gives."""

import os
import signal

import pytest
from typer.testing import CliRunner

from mlx_diffgemma import batch_generate, commands
from mlx_diffgemma.chat import HELP, ChatSession
from mlx_diffgemma.cli import app
from mlx_diffgemma.commands import Settings, SoftInterrupt, open_checkpoint
from mlx_diffgemma.generate import Block
from mlx_diffgemma.live import QuietView

L = 8  # canvas length of the tiny checkpoints

# A settling checkpoint (see tiny_checkpoints.write_checkpoint) stops blocks
# early and is not chaotic, so encoding a conversation turn by turn rather
# than at once (float32 rounding differences) does not change the answers.
# With seed 2 its first answer's second block holds token 42, which
# STOPPING makes an end-of-sequence token, so that answer ends mid-block.
SETTLING = {"config": "two_layer", "damping": 0.3}
STOPPING = {"eos_token_id": [1, 106, 42]}


@pytest.fixture(scope="module")
def settling(make_checkpoint):
    return make_checkpoint(**SETTLING, generation_config=STOPPING)


def session_for(path, seed, max_tokens=2 * L):
    settings = Settings(model=str(path), seed=seed, max_tokens=max_tokens)
    checkpoint = open_checkpoint(settings)
    return ChatSession(checkpoint, checkpoint.load(), settings)


def counting_encodes(session, monkeypatch):
    """The length of every ``model.encode`` call, as a list that grows."""
    lengths = []
    encode = session.model.encode

    def counted(ids, cache, *args, **kwargs):
        lengths.append(ids.shape[1])
        return encode(ids, cache, *args, **kwargs)

    monkeypatch.setattr(session.model, "encode", counted)
    return lengths


def fresh(session, tokens, seed):
    return batch_generate(session.model, session.tokenizer, tokens, seed=seed, config=session.sampler)


@pytest.mark.parametrize("seed, first_finish", [(2, "stop"), (1, "length")])
def test_second_turn_encodes_only_new_tokens_and_matches_a_fresh_run(settling, monkeypatch, seed, first_finish):
    session = session_for(settling, seed)
    encoded = counting_encodes(session, monkeypatch)
    opening = session.turn_tokens("hello")
    first = session.ask("hello", QuietView(), SoftInterrupt())
    assert first.finish_reason == first_finish and len(first.steps) == 2  # what this case is for
    assert fresh(session, opening, seed).tokens[0] == first.tokens

    history = list(session.transcript)
    cached = session.cache[0].offset
    assert cached == len(opening) + L  # the prompt and the first block, not the last
    kept = len(history) - cached  # the last block up to its end-of-sequence token
    assert kept == (L if first_finish == "length" else first.tokens.index(42) - L)

    encoded.clear()
    turn = session.turn_tokens("how are you")
    second = session.ask("how are you", QuietView(), SoftInterrupt())
    assert encoded[0] == kept + len(turn)  # the first encode of the turn: what is new, nothing else
    assert session.transcript[:len(history)] == history

    full = history + turn
    assert full[cached:] == session.transcript[cached:len(full)]
    again = fresh(session, full, seed)
    assert (again.tokens[0], again.text) == (second.tokens, second.text)


def test_turn_tokens_close_the_answer_with_the_template(settling):
    session = session_for(settling, 0)
    tokenizer = session.tokenizer
    session.transcript = [0]  # anything: the conversation has started
    expected = "<turn|>\n<|turn>user\nhow are you<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert tokenizer.decode(session.turn_tokens("how are you")) == expected


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_the_answer_and_the_conversation_goes_on(settling, monkeypatch, presses):
    """After the first block, one Ctrl-C stops at the next step and keeps the
    cache; a second one interrupts at once, and the cache is rebuilt. Either
    way the committed block stays in the conversation."""
    session = session_for(settling, 1, max_tokens=4 * L)
    stream = commands.stream_blocks

    def interrupted(*args, **kwargs):
        for event in stream(*args, **kwargs):
            yield event
            if isinstance(event, Block):
                for _ in range(presses):
                    os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(commands, "stream_blocks", interrupted)
    with SoftInterrupt() as interrupt:
        first = session.ask("hello", QuietView(), interrupt)
    assert first.finish_reason == "interrupted" and len(first.tokens) == L
    assert (session.cache is None) == (presses == 2)
    monkeypatch.setattr(commands, "stream_blocks", stream)

    encoded = counting_encodes(session, monkeypatch)
    turn = session.turn_tokens("how are you")
    full = session.transcript + turn
    second = session.ask("how are you", QuietView(), SoftInterrupt())
    # A soft stop comes at the next denoising step, once the first block is encoded.
    assert encoded[0] == (len(full) if presses == 2 else len(turn))
    assert fresh(session, full, 1).tokens[0] == second.tokens


def test_scripted_session(make_checkpoint):
    """/reset starts over (the same question gets the same answer again), a
    turn that does not fit is refused without ending the session, and /exit leaves."""
    path = make_checkpoint(**SETTLING, generation_config=STOPPING, max_position_embeddings=72)
    script = "hello\nhow are you today, my friend?\n/reset\nhello\n/nope\n/exit\nnever read\n"
    result = CliRunner().invoke(app, ["chat", "--model", str(path), "--seed", "2", "-m", str(2 * L)], input=script)
    assert result.exit_code == 0, result.output
    turns = result.stdout.split(">>> ")
    assert [t.splitlines()[0] for t in turns[1:]] == ["hello", "how are you today, my friend?", "/reset", "hello",
                                                       "/nope", "/exit"]
    answer = turns[1].splitlines()[1]
    assert answer and turns[4].splitlines()[1] == answer
    assert turns[2].splitlines()[1:] == []  # refused
    stderr = result.stderr.splitlines()
    assert stderr[0].startswith(f"mlxdg: chatting with {path}")
    assert "positions, but the model has 72; /reset starts a new conversation" in stderr[1]
    assert stderr[2:] == ["mlxdg: conversation cleared", f"mlxdg: unknown command /nope: {HELP}"]


def test_startup_errors_are_one_line():
    result = CliRunner().invoke(app, ["chat", "--model", "/no/such/checkpoint"])
    assert result.exit_code == 1
    assert result.stderr == "mlxdg: /no/such/checkpoint: no such directory, and not a Hugging Face repo id\n"
