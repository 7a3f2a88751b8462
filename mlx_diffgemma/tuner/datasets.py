"""Training data: JSON Lines files in mlx-lm's formats, as ``Example``s.

Each line is one object of one of these forms:

* ``{"messages": [...]}``: a chat. The last message must be the assistant's;
  it is the answer. Everything before it, through the chat template with the
  generation prompt, is the context, exactly the prompt ``mlxdg generate``
  would build for it. Only that assistant turn is scored.
* ``{"prompt": ..., "completion": ...}``: the prompt as one user turn of the
  chat template (as is, when the tokenizer has none), the completion as answer.
* ``{"text": ...}``: the text's first token (BOS where the tokenizer adds one)
  is the context, the rest the answer.

An answer is its tokens followed by one end-of-sequence token: the end of
turn for chat rows (``<turn|>``, which the sampler stops at), else the
tokenizer's EOS. A line whose context plus padded canvases is longer than
``max_seq_length`` is refused by file and line, not truncated: a truncated
answer would lose its end of sequence.
"""

import json
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np

from ..errors import UserError
from ..generate import prompt_ids
from .batches import Batch, Example, collate

SPLITS = ("train", "valid", "test")
END_OF_TURN = "<turn|>"  # Gemma 4 closes every chat turn with it


class DataError(UserError, ValueError):
    """Unusable training data, said in one line that names the file (and line)."""


class Dataset:
    """The examples of one split, with where each came from."""

    def __init__(self, path: Path, examples: List[Example], lines: List[int]):
        self.path, self.examples, self.lines = path, examples, lines

    def __len__(self):
        return len(self.examples)

    @property
    def tokens(self) -> int:
        return sum(len(e.answer) for e in self.examples)


def _end_of_answer(tokenizer, chat: bool) -> int:
    if chat:
        end = tokenizer.get_vocab().get(END_OF_TURN)
        if end is not None:
            return end
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no end-of-sequence token to end the answers with")
    return tokenizer.eos_token_id


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f'"{what}" is not a string')
    if not value:
        raise ValueError(f'"{what}" is empty')
    return value


def example(row, tokenizer) -> Example:
    """The ``Example`` of one parsed JSON line (ValueError when unusable)."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    chat = tokenizer.has_chat_template
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError('"messages" is not a list of message objects')
        if messages[-1].get("role") != "assistant":
            raise ValueError('the last of "messages" is not an assistant turn')
        if len(messages) < 2:
            raise ValueError('"messages" has no turn before the assistant\'s')
        if not chat:
            raise ValueError('"messages" needs a tokenizer with a chat template')
        context = prompt_ids(tokenizer, None, messages=messages[:-1])[0]
        answer = _text(messages[-1].get("content"), "content")
    elif "prompt" in row or "completion" in row:
        prompt, answer = _text(row.get("prompt"), "prompt"), _text(row.get("completion"), "completion")
        context = prompt_ids(tokenizer, prompt, chat=chat)[0]
    elif "text" in row:
        ids = tokenizer.encode(_text(row["text"], "text"))
        if len(ids) < 2:
            raise ValueError('"text" is a single token')
        return Example(ids[:1], ids[1:] + [_end_of_answer(tokenizer, False)])
    else:
        raise ValueError('has none of "messages", "prompt"/"completion" or "text"')
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    return Example(context.tolist(), list(answer_ids) + [_end_of_answer(tokenizer, chat)])


def load_split(path: Path, tokenizer, canvas_length: int, max_seq_length: int) -> Dataset:
    """Every example of one JSON Lines file; blank lines are skipped."""
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    examples, lines = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                e = example(json.loads(line), tokenizer)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}: not valid JSON ({error.msg})") from None
            except (ValueError, TypeError, KeyError) as error:
                raise DataError(f"{path} line {number}: {error}") from None
            if e.length(canvas_length) > max_seq_length:
                raise DataError(
                    f"{path} line {number}: {len(e.context)} context tokens and {e.canvases(canvas_length)} "
                    f"canvas(es) of {canvas_length} need {e.length(canvas_length)} positions, more than "
                    f"--max-seq-length {max_seq_length}; shorten it or raise --max-seq-length")
            examples.append(e)
            lines.append(number)
    if not examples:
        raise DataError(f"{path} holds no examples")
    return Dataset(path, examples, lines)


def load_splits(data: Optional[str], tokenizer, names: Sequence[str], canvas_length: int,
                max_seq_length: int) -> dict:
    """The ``names`` splits of the ``--data`` directory (``{name}.jsonl``)."""
    if data is None:
        raise DataError("--data is required: a directory with train.jsonl and valid.jsonl (and test.jsonl for --test)")
    directory = Path(data).expanduser()
    if not directory.is_dir():
        raise DataError(f"--data {data} is not a directory with train.jsonl and valid.jsonl")
    return {name: load_split(directory / f"{name}.jsonl", tokenizer, canvas_length, max_seq_length)
            for name in names}


def check_batch_size(dataset: Dataset, batch_size: int) -> None:
    if batch_size > len(dataset):
        raise DataError(f"--batch-size {batch_size} is larger than the {len(dataset)} examples of "
                        f"{dataset.path}; lower --batch-size or add examples")


def batches(dataset: Dataset, batch_size: int, canvas_length: int, pad_token_id: int, seed: int,
            loop: bool = True) -> Iterator[Batch]:
    """Batches of examples of similar length (as mlx-lm groups them), in a
    fresh random order every pass over the data."""
    order = sorted(range(len(dataset)), key=lambda i: dataset.examples[i].length(canvas_length))
    groups = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng = np.random.default_rng(seed)
    while True:
        for g in rng.permutation(len(groups)):
            yield collate([dataset.examples[i] for i in groups[g]], canvas_length, pad_token_id)
        if not loop:
            return
