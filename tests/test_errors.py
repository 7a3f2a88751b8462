"""Bad input and faults through the real ``mlxdg``, each in a subprocess.

Every case asserts the exit status, that standard error is one ``mlxdg:``
line (no traceback), and the state of the files afterwards: what the user had
is untouched, and nothing half-written is left. The table's cases run two at
a time in one fixture (each subprocess pays the imports); the signal cases
(SIGKILL and SIGTERM during convert, each followed by a re-run; SIGTERM during
``generate --json``) and a seeded randomized test follow.
"""

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import pytest

TIMEOUT = 120
BAD_UTF8 = b"caf\xe9 \xff\xfe"
TINY = ["-m", "8"]  # one block of the tiny checkpoints' 8-token canvas


def mlxdg_command(preload: str = "") -> list:
    if not preload:
        return [sys.executable, "-m", "mlx_diffgemma"]
    return [sys.executable, "-c", f"import mlx_diffgemma\n{preload}\nfrom mlx_diffgemma.cli import app\napp()"]


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self):
        return [line for line in self.stderr.splitlines() if line.strip()]


def env_without_model():
    return {k: v for k, v in os.environ.items() if k != "MLXDG_MODEL"}


def run_mlxdg(args, cwd, input: Optional[bytes] = None, preload: str = "", stdout=subprocess.PIPE) -> Done:
    args = [a if isinstance(a, bytes) else str(a) for a in args]
    decode = lambda b: (b or b"").decode("utf-8", "replace")
    try:
        done = subprocess.run(mlxdg_command(preload) + args, input=input if input is not None else b"",
                              stdout=stdout, stderr=subprocess.PIPE, cwd=cwd, env=env_without_model(),
                              timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        return Done(-1, decode(e.stdout), f"(still running after {TIMEOUT} s)\n" + decode(e.stderr))
    return Done(done.returncode, decode(done.stdout), decode(done.stderr))


# Usage errors (exit 2) are one mlxdg: line once the CLI's own error mechanism
# (mlx_diffgemma.errors) is in; until then typer's usage box, checked for the message.
ONE_LINE_USAGE_ERRORS = importlib.util.find_spec("mlx_diffgemma.errors") is not None


def assert_one_line(done: Done, code: int, message: str, alone: bool = True) -> None:
    """Exit ``code`` and one ``mlxdg:`` line holding ``message``: the only line,
    or, unless ``alone``, the last after progress lines."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.code == code, (done.code, done.stderr)
    if code == 2 and not ONE_LINE_USAGE_ERRORS and done.lines and not done.lines[0].startswith("mlxdg: "):
        assert done.lines[0].startswith("Usage: mlxdg") and message in " ".join(done.stderr.split()), done.stderr
        return
    errors = [line for line in done.lines if line.startswith("mlxdg: ")]
    assert errors and errors == done.lines[-1:] and (len(done.lines) == 1 or not alone), done.stderr
    assert message in errors[0], errors[0]


# ---------------------------------------------------------------- damaged checkpoints

def damaged(tiny: Path, root: Path, kind: str) -> Path:
    """A copy of ``tiny`` damaged as ``kind`` says."""
    out = root / kind
    shutil.copytree(tiny, out)
    shard = out / "model.safetensors"
    data = shard.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    if kind == "random-shard":
        shard.write_bytes(random.Random(0).randbytes(len(data)))
    elif kind == "empty-shard":
        shard.write_bytes(b"")
    elif kind == "cut-header":
        shard.write_bytes(data[: header // 2])
    elif kind == "cut-data":
        shard.write_bytes(data[:-1000])
    elif kind == "missing-shard":
        weights = mx.load(str(shard))
        names = sorted(weights)
        first = "model-00001-of-00002.safetensors"
        mx.save_safetensors(str(out / first), {n: weights[n] for n in names[: len(names) // 2]})
        shard.unlink()
        weight_map = {n: first if i < len(names) // 2 else "model-00002-of-00002.safetensors"
                      for i, n in enumerate(names)}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif kind == "no-tokenizer":
        (out / "tokenizer.json").unlink()
    elif kind == "bad-tokenizer":
        (out / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    elif kind == "bad-template":
        (out / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    elif kind == "no-template":
        (out / "chat_template.jinja").unlink()
    elif kind == "bad-config":
        (out / "config.json").write_text("{not json")
    elif kind == "wrong-model":
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    else:
        raise ValueError(kind)
    return out


@dataclass
class World:
    """What the cases run on: the tiny checkpoint, its damaged copies, files."""

    root: Path
    tiny: Path

    def bad(self, kind: str) -> Path:
        return self.root / "bad" / kind

    def file(self, name: str, content: bytes) -> Path:
        path = self.root / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path


KINDS = ("random-shard", "empty-shard", "cut-header", "cut-data", "missing-shard", "no-tokenizer", "bad-tokenizer",
         "bad-template", "no-template", "bad-config", "wrong-model")


@dataclass
class Case:
    id: str
    args: Callable[[World, Path], Sequence]  # (world, the case's own folder) -> arguments
    code: int
    message: str
    input: Optional[bytes] = None
    preload: str = ""
    alone: bool = True  # False: progress lines may come before the mlxdg: line
    # (world, the case's own folder) -> None: asserts on the files afterwards
    check: Callable[[World, Path], None] = field(default=lambda world, here: empty_folder(world, here))


def generate(*extra, model=None):
    return lambda w, here: ["generate", "hello", "--model", model(w) if model else w.tiny, *TINY, *extra]


def damaged_generate(kind):
    return lambda w, here: ["generate", "hello", "--model", w.bad(kind), *TINY]


def untouched(kind):
    """The damaged checkpoint is as it was made (nothing was 'repaired' or removed)."""
    def check(w, here):
        fresh = damaged(w.tiny, here / "fresh", kind)
        assert sorted(p.name for p in w.bad(kind).iterdir()) == sorted(p.name for p in fresh.iterdir())
        for p in fresh.iterdir():
            assert (w.bad(kind) / p.name).read_bytes() == p.read_bytes(), p.name
    return check


def empty_folder(w, here):
    """Nothing was written where the command ran."""
    assert list(here.iterdir()) == [], list(here.iterdir())


def holding(here: Path, name: str) -> Path:
    """A folder ``here/name`` that holds the user's notes and no model."""
    folder = here / name
    folder.mkdir()
    (folder / "notes.txt").write_bytes(b"mine")
    return folder


def model_dir(here: Path) -> Path:
    out = here / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"mine")
    return out


def afile(here: Path) -> Path:
    (here / "afile").write_bytes(b"mine")
    return here / "afile"


def convert(*extra, source=None):
    return lambda w, here: ["convert", "--hf-path", source(w) if source else w.tiny, "--mlx-path", here / "out",
                            *extra]


nothing_converted = empty_folder  # no output, and no hidden work folder next to it


def file_is(path: str, content: bytes):
    def check(w, here):
        assert (here / path).read_bytes() == content
        assert sorted(p.name for p in here.iterdir()) == [path.split("/")[0]]
    return check


# Preloads: faults injected into the real CLI's process.
FAKE_FULL_DISK = ("import shutil, os, collections\n"
                  "real = os.statvfs\n"
                  "def statvfs(p):\n"
                  "    s = real(p)\n"
                  "    return os.statvfs_result((s.f_bsize, s.f_frsize, s.f_blocks, 10, 10, s.f_files, s.f_ffree,"
                  " s.f_favail, s.f_flag, s.f_namemax))\n"
                  "os.statvfs = statvfs\n")
ENOSPC_MID_WRITE = ("import errno, os\n"
                    "from mlx_diffgemma.convert import shards\n"
                    "written = [0]\n"
                    "real = shards.ShardWriter._write\n"
                    "def write(self, data):\n"
                    "    written[0] += memoryview(data).nbytes\n"
                    "    if written[0] > 20000:\n"
                    "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))\n"
                    "    real(self, data)\n"
                    "shards.ShardWriter._write = write\n")
NO_MATPLOTLIB = "import sys\nsys.modules['matplotlib'] = None\nsys.modules['matplotlib.figure'] = None\n"

CASES = [
    # generate: flags and prompts, all refused before any weight is read
    Case("seed negative", generate("--seed", -1), 2, "--seed"),
    Case("seed too big", generate("--seed", 2**64), 2, "--seed"),
    Case("t-max inf", generate("--t-max", "inf"), 2, "--t-max"),
    Case("t-min nan", generate("--t-min", "nan"), 2, "--t-min"),
    Case("steps huge", generate("--steps", 100000), 2, "--steps"),
    Case("steps zero", generate("--steps", 0), 2, "--steps"),
    Case("max-tokens zero", generate("--max-tokens", 0), 2, "--max-tokens"),
    Case("entropy bound negative", generate("--entropy-bound", -1), 2, "--entropy-bound"),
    Case("memory limit unreadable", generate("--memory-limit", "lots"), 2, "lots"),
    Case("cpu-dequantize unknown", generate("--cpu-dequantize", "sometimes"), 2, "--cpu-dequantize"),
    Case("prompt argument not UTF-8", lambda w, here: ["generate", BAD_UTF8, "--model", w.tiny], 2, "UTF-8"),
    Case("stdin not UTF-8", lambda w, here: ["generate", "-", "--model", w.tiny], 2, "standard input",
         input=BAD_UTF8),
    Case("prompt file not UTF-8",
         lambda w, here: ["generate", "--prompt-file", w.file("bad.txt", BAD_UTF8), "--model", w.tiny], 2,
         "bad.txt"),
    Case("prompts file not UTF-8",
         lambda w, here: ["generate", "--prompts-file", w.file("bad-batch.txt", b"ok\n" + BAD_UTF8),
                          "--model", w.tiny], 2, "bad-batch.txt"),
    Case("prompts file bad JSON line",
         lambda w, here: ["generate", "--prompts-file", w.file("bad.jsonl", b'{"prompt": 1\n'), "--model", w.tiny],
         2, "line 1"),
    Case("prompt file missing", lambda w, here: ["generate", "--prompt-file", here / "nope.txt", "--model", w.tiny],
         2, "nope.txt"),
    Case("prompt empty", lambda w, here: ["generate", "--prompt-file", w.file("empty.txt", b"\n"),
                                          "--model", w.tiny], 2, "empty"),
    Case("no prompt", lambda w, here: ["generate", "--model", w.tiny], 2, "prompt"),
    Case("system prompt without template", generate("--system", "be brief", "--ignore-chat-template"), 2, "--system"),
    Case("system prompt without template, prompts file",
         lambda w, here: ["generate", "--prompts-file", w.file("two.txt", b"hi\nho\n"), "--system", "be brief",
                          "--ignore-chat-template", "--model", w.tiny], 2, "--system"),
    # generate: checkpoints that cannot be used, each named
    Case("model missing", lambda w, here: ["generate", "hi", "--model", here / "nope"], 1, "nope"),
    Case("model not DiffusionGemma", damaged_generate("wrong-model"), 1, "'llama'", check=untouched("wrong-model")),
    Case("config not JSON", damaged_generate("bad-config"), 1, "config.json"),
    Case("shard of random bytes", damaged_generate("random-shard"), 1, "model.safetensors: not a valid safetensors",
         check=untouched("random-shard")),
    Case("shard empty", damaged_generate("empty-shard"), 1, "model.safetensors: not a valid safetensors"),
    Case("shard header cut", damaged_generate("cut-header"), 1, "model.safetensors: not a valid safetensors"),
    Case("shard data cut", damaged_generate("cut-data"), 1, "cut short"),
    Case("shard in index missing", damaged_generate("missing-shard"), 1, "model-00002-of-00002.safetensors"),
    Case("tokenizer missing", damaged_generate("no-tokenizer"), 1, "no tokenizer"),
    Case("tokenizer broken", damaged_generate("bad-tokenizer"), 1, "tokenizer.json"),
    Case("chat template broken", damaged_generate("bad-template"), 1, "chat_template.jinja"),
    Case("chat template missing", damaged_generate("no-template"), 1, "--ignore-chat-template"),
    Case("memory too small", generate("--memory-limit", "1KB"), 1, "is available"),
    Case("answer longer than the positions", generate("--max-tokens", 4096), 1, "positions"),
    # chat
    Case("chat without a template", lambda w, here: ["chat", "--model", w.bad("no-template")], 1, "chat template"),
    Case("chat on a damaged shard", lambda w, here: ["chat", "--model", w.bad("random-shard")], 1,
         "not a valid safetensors"),
    Case("chat seed negative", lambda w, here: ["chat", "--model", w.tiny, "--seed", -1], 2, "--seed"),
    # convert: refusals leave the folder as it was
    Case("convert without --hf-path", lambda w, here: ["convert", "--mlx-path", here / "out"], 1, "--hf-path",
         check=nothing_converted),
    Case("convert missing source", convert(source=lambda w: w.root / "nope"), 1, "nope", check=nothing_converted),
    Case("convert shard of random bytes", convert(source=lambda w: w.bad("random-shard")), 1,
         "not a valid safetensors", check=nothing_converted),
    Case("convert shard in index missing", convert(source=lambda w: w.bad("missing-shard")), 1,
         "model-00002-of-00002.safetensors", check=nothing_converted),
    Case("convert existing output", lambda w, here: ["convert", "--hf-path", w.tiny, "--mlx-path", model_dir(here)],
         1, "--force", check=file_is("out/model.safetensors", b"mine")),
    Case("convert --force over a folder that is not a model",
         lambda w, here: ["convert", "--hf-path", w.tiny, "--mlx-path", holding(here, "notes"), "--force"], 1,
         "no model", check=file_is("notes/notes.txt", b"mine")),
    Case("convert --force over a file",
         lambda w, here: ["convert", "--hf-path", w.tiny, "--mlx-path", afile(here), "--force"], 1,
         "is a file", check=file_is("afile", b"mine")),
    Case("convert read-only target", lambda w, here: ["convert", "--hf-path", w.tiny, "--mlx-path", "/sys/mlxdg-out"],
         1, "/sys/mlxdg-out"),
    Case("convert disk full", convert(), 1, "not enough space", preload=FAKE_FULL_DISK, check=nothing_converted),
    Case("convert disk fills while writing", convert(), 1, "no space left", preload=ENOSPC_MID_WRITE,
         check=nothing_converted),
    Case("convert bad recipe", convert("--recipe", "2bit"), 1, "unknown recipe", check=nothing_converted),
    # serve, lora, fuse
    Case("serve on a damaged shard", lambda w, here: ["serve", "--model", w.bad("cut-header"), "--port", 0], 1,
         "not a valid safetensors"),
    Case("serve port negative", lambda w, here: ["serve", "--model", w.tiny, "--port", -5], 2, "--port"),
    Case("lora without --train or --test", lambda w, here: ["lora", "--model", w.tiny, "--data", here], 1,
         "--train"),
    Case("lora data folder missing", lambda w, here: ["lora", "--model", w.tiny, "--train", "--data", here / "no"],
         1, "--data"),
    Case("lora data not JSON", lambda w, here: ["lora", "--model", w.tiny, "--train", "--data",
                                                w.file("data/train.jsonl", b'{"text": "hi"\n').parent], 1,
         "train.jsonl line 1"),
    Case("fuse adapter folder missing",
         lambda w, here: ["fuse", "--model", w.tiny, "--adapter-path", here / "adapters"], 1, "adapter_config.json"),
    # bench: every output and dependency checked before the first trial
    Case("bench --json into a missing folder",
         lambda w, here: ["bench", "--synthetic", "tiny", "--json", here / "no" / "b.json"], 2, "--json",
         check=empty_folder),
    Case("bench --json is a folder", lambda w, here: ["bench", "--synthetic", "tiny", "--json", here], 2,
         "is a directory", check=empty_folder),
    Case("bench --plot without matplotlib",
         lambda w, here: ["bench", "--synthetic", "tiny", "--plot", here / "b.png"], 2, "matplotlib",
         preload=NO_MATPLOTLIB, check=empty_folder),
    Case("bench --plot unknown format", lambda w, here: ["bench", "--synthetic", "tiny", "--plot", here / "b.xyz"],
         2, ".png", check=empty_folder),
    Case("bench on a damaged checkpoint",
         lambda w, here: ["bench", "--model", w.bad("cut-data"), "--json", here / "b.json"], 1, "cut short",
         alone=False),
    Case("bench --steps not counts", lambda w, here: ["bench", "--synthetic", "tiny", "--steps", "4,x"], 2,
         "--steps"),
]


@pytest.fixture(scope="module")
def world(make_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    world = World(root, make_checkpoint())
    (root / "bad").mkdir()
    for kind in KINDS:
        damaged(world.tiny, root / "bad", kind)
    return world


@pytest.fixture(scope="module")
def table(world):
    """Every case of CASES run, two at a time: {id: (Done, its folder)}."""
    def one(case):
        here = world.root / "cases" / case.id.replace(" ", "_")
        here.mkdir(parents=True)
        args = case.args(world, here)
        return case.id, (run_mlxdg(args, cwd=here, input=case.input, preload=case.preload), here)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(table, world, case):
    done, here = table[case.id]
    assert_one_line(done, case.code, case.message, case.alone)
    assert done.stdout == ""
    case.check(world, here)


# ---------------------------------------------------------------- signals

SLOW_WRITES = ("import sys, time\n"
               "from mlx_diffgemma.convert import convert as c\n"
               "write = c._write_tensor\n"
               "def slow(writer, tensor):\n"
               "    write(writer, tensor)\n"
               "    print('WROTE', file=sys.stderr, flush=True)\n"
               "    time.sleep(0.2)\n"
               "c._write_tensor = slow\n")
# Each encoder pass (the prompt, then each committed block) says so on stderr.
SAY_ENCODED = ("import sys\n"
               "from mlx_diffgemma.model import Model\n"
               "encode = Model.encode\n"
               "def say(self, *args, **kwargs):\n"
               "    out = encode(self, *args, **kwargs)\n"
               "    print('ENCODED', file=sys.stderr, flush=True)\n"
               "    return out\n"
               "Model.encode = say\n")


def start(args, cwd, preload: str = "", stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(mlxdg_command(preload) + [str(a) for a in args], cwd=cwd, env=env_without_model(),
                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True)


def wait_for(process: subprocess.Popen, marker: str, count: int = 1) -> list:
    """Lines of the process's stderr up to the ``count``-th ``marker`` line."""
    lines, seen, deadline = [], 0, time.monotonic() + TIMEOUT
    while seen < count:
        line = process.stderr.readline()
        assert line and time.monotonic() < deadline, ("ended before the marker", process.wait(), lines)
        lines.append(line)
        seen += line.strip() == marker
    return lines


def hidden(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_convert_stopped_by_a_signal_then_run_again(world, tmp_path, sig):
    out = tmp_path / "out"
    args = ["convert", "--hf-path", world.tiny, "--mlx-path", out, "-q"]
    first = start(args, tmp_path, SLOW_WRITES)
    wait_for(first, "WROTE", 2)
    (partial,) = hidden(tmp_path)
    assert partial.startswith(".out.") and partial.endswith(".partial")
    if sig == signal.SIGKILL:
        # While it is alive, another run leaves its work alone and says who is writing.
        second = run_mlxdg(args, cwd=tmp_path)
        assert_one_line(second, 1, f"another mlxdg convert (pid {first.pid}) is writing")
        assert hidden(tmp_path) == [partial]
    first.send_signal(sig)
    rest = first.stderr.read()
    assert first.wait(TIMEOUT) == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM)
    assert not out.exists()
    if sig == signal.SIGTERM:
        lines = [line for line in rest.splitlines() if line.strip() and line.strip() != "WROTE"]
        assert lines == [f"mlxdg: terminated; {out} was left as it was"] and "Traceback" not in rest
        assert list(tmp_path.iterdir()) == []
    else:
        assert hidden(tmp_path) == [partial]  # nothing could clean up after SIGKILL ...

    again = run_mlxdg(args, cwd=tmp_path)  # ... so the next run does
    assert again.code == 0, again.stderr
    removed = [line for line in again.lines if line.startswith("mlxdg: removed")]
    assert len(removed) == (sig == signal.SIGKILL) and all(partial in line for line in removed)
    assert list(tmp_path.iterdir()) == [out] and (out / "config.json").is_file()


def test_generate_json_terminated_writes_what_was_committed(world, tmp_path):
    # Seed 1's answer runs all 50 blocks on this CPU; some seeds' answers end in their first block.
    process = start(["generate", "hello", "--model", world.tiny, "-m", 400, "--seed", 1, "--json"], tmp_path,
                    SAY_ENCODED)
    wait_for(process, "ENCODED", 3)  # the prompt and two committed blocks
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 128 + signal.SIGTERM
    out = json.loads(stdout)
    blocks = len(out["steps_per_block"])
    assert out["finish_reason"] == "interrupted" and 2 <= blocks < 50 and len(out["tokens"]) == 8 * blocks
    lines = [line for line in stderr.splitlines() if line.strip() and line.strip() != "ENCODED"]
    assert lines == [f"mlxdg: terminated; the answer so far is the {blocks} committed blocks"], stderr


def test_broken_pipe_exits_quietly(world, tmp_path):
    process = start(["generate", "hello", "--model", world.tiny, "-m", 400, "--steps", 4, "--no-live", "--seed", 1],
                    tmp_path)
    # Closed before the first write (the interpreter has not started yet), as `| head -c 0` does: reading a
    # byte first raced a fast machine, which could write the whole answer before the close.
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(TIMEOUT) == 128 + signal.SIGPIPE and stderr == ""


def test_closed_stdout_is_an_error(world, tmp_path):
    command = ["sh", "-c", 'exec "$@" >&-', "sh", *mlxdg_command(), "generate", "hello", "--model", str(world.tiny),
               *TINY]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env_without_model(),
                          timeout=TIMEOUT)
    assert_one_line(Done(done.returncode, "", done.stderr), 1, "standard output is closed")


def test_bench_interrupted_keeps_what_it_measured(tmp_path):
    result = tmp_path / "bench.json"
    process = start(["bench", "--synthetic", "tiny", "--steps", "2,3", "--trials", 50, "--prompt-tokens", 8,
                     "--gen-tokens", 32, "--json", result], tmp_path)
    deadline = time.monotonic() + TIMEOUT
    while not result.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    kept = json.loads(result.read_text())
    assert kept["complete"] is False and len(kept["records"]) >= 1
    assert f"mlxdg: terminated after {len(kept['records'])} timed run" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_bench_skips_the_probes_a_checkpoint_cannot_run(world, tmp_path):
    """The tiny checkpoint's hidden size (32) is below the probe's quantization group (64)."""
    done = run_mlxdg(["bench", "--model", world.tiny, "--steps", 2, "--trials", 1, "--prompt-tokens", 8,
                      "--gen-tokens", 16], cwd=tmp_path)
    assert done.code == 0, done.stderr
    assert "skipping the quantized matmul probes: hidden size 32" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- randomized

FUZZ_CASES = int(os.environ.get("MLXDG_FUZZ_CASES", 12))


def fuzz_case(rng: random.Random, world: World, here: Path):
    """One generated bad (or occasionally good) input: (arguments, stdin)."""
    kind = rng.choice(["shard", "flags", "prompt"])
    base = ["generate", "--json", *TINY]
    if kind == "shard":
        model = here / "model"
        shutil.copytree(world.tiny, model)
        shard = model / "model.safetensors"
        data = bytearray(shard.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        damage = rng.choice(["truncate", "overwrite", "insert"])
        if damage == "truncate":
            data = data[: rng.randrange(len(data))]
        elif damage == "overwrite":
            at = rng.randrange(header)
            data[at: at + rng.randint(1, 16)] = rng.randbytes(rng.randint(1, 16))
        else:
            at = rng.randrange(header)
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        shard.write_bytes(bytes(data))
        return [*base, "hello", "--model", model], None
    if kind == "flags":
        values = {
            "--steps": lambda: rng.choice([rng.randint(-5, 3), rng.randint(1000, 10**7), "x", "1.5"]),
            "--seed": lambda: rng.choice([rng.randint(-(2**70), -1), 2**64 + rng.randint(0, 9), rng.randint(0, 99),
                                          "seed"]),
            "--t-min": lambda: rng.choice(["nan", "inf", "-inf", str(-rng.random()), "0.9"]),
            "--t-max": lambda: rng.choice(["nan", "inf", "-1", "0", str(rng.random())]),
            "--entropy-bound": lambda: rng.choice(["nan", "inf", "-0.5", "1e400", str(rng.random())]),
            "--max-tokens": lambda: rng.choice([rng.randint(-9, 0), "ten", 8]),
            "--memory-limit": lambda: rng.choice(["0", "1B", "lots", "-5GB", "1e3", "16QB"]),
        }
        chosen = rng.sample(sorted(values), rng.randint(1, 3))
        return [*base, "hello", "--model", world.tiny, *[a for flag in chosen for a in (flag, values[flag]())]], None
    raw = rng.randbytes(rng.randint(1, 40)).replace(b"\0", b"")  # an argument cannot hold NUL
    source = rng.choice(["argument", "stdin", "file"])
    if source == "argument":
        return [*base, raw or b"x", "--model", world.tiny], None
    if source == "stdin":
        return [*base, "-", "--model", world.tiny], raw
    (here / "prompt.txt").write_bytes(raw)
    return [*base, "--prompt-file", here / "prompt.txt", "--model", world.tiny], None


def test_randomized_bad_inputs_never_crash_nor_answer_nothing(world, tmp_path):
    """Seeded and bounded (MLXDG_FUZZ_CASES, 12 by default): no traceback ever;
    a refusal is one mlxdg: line with a non-zero exit; a success has an answer."""
    rng = random.Random(15)
    cases = []
    for i in range(FUZZ_CASES):
        here = tmp_path / f"case{i}"
        here.mkdir()
        cases.append((here, *fuzz_case(rng, world, here)))

    def one(case):
        here, args, stdin = case
        return case, run_mlxdg(args, cwd=here, input=stdin)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for (here, args, stdin), done in pool.map(one, cases):
            where = (args, stdin, done.code, done.stderr[-2000:])
            assert "Traceback" not in done.stderr and done.code >= 0, where
            if done.code == 0:
                tokens = json.loads(done.stdout)["tokens"]
                assert tokens and any(t != 0 for t in tokens), where
            else:
                assert done.stdout == "", where
                assert_one_line(done, done.code, "", alone=True)
