"""Generation against transformers' ``DiffusionGemmaForBlockDiffusion.generate()``.

Both sides read one table of noise. The reference's ``torch.randint`` and
``torch.multinomial`` are patched to read it; ours gets it as a NoiseSource.
Draws are keyed by (block, step), not by call count, because the reference
keeps computing rows that we drop, which would shift every later draw. The
proposal is a Gumbel-max draw: ``argmax(log p + g)`` in the reference,
``argmax(logits + g)`` here, the same sample of the same distribution.

Most settings use "settling" checkpoints (see tiny_checkpoints.write_checkpoint's damping). The
plain random tiny checkpoints are chaotic through self-conditioning: the
1e-6 float32 rounding difference between any two implementations grows about
tenfold per step and flips tokens after five or six steps. They appear here
only with one or two steps per block.

Entropy ties at the acceptance boundary would be ordered differently by the
reference's unstable ``torch.sort``; with continuous logits they do not occur
in these settings. Each setting also checks that it still exercises what it is
named for (early stops, rows stopping apart, EOS mid-block, ...).
"""

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from mlx_diffgemma import batch_generate, generate, load, stream_blocks
from mlx_diffgemma.bench import step_time
from mlx_diffgemma.generate import Block, Draft
from mlx_diffgemma.model import ModelArgs

PAD = 0


class NoiseTable:
    """Deterministic draws for the whole batch, keyed by (block, step)."""

    def __init__(self, seed: int, batch: int, length: int, vocab: int):
        self.seed, self.shape, self.vocab = seed, (batch, length), vocab

    def _rng(self, block, step, kind):
        return np.random.default_rng([self.seed, block, step, kind])

    def canvas(self, block: int, step: int) -> np.ndarray:
        return self._rng(block, step, 0).integers(0, self.vocab, self.shape)

    def gumbel(self, block: int, step: int) -> np.ndarray:
        return self._rng(block, step, 1).gumbel(size=(*self.shape, self.vocab)).astype(np.float32)


class TableNoise:
    """Our side: a NoiseSource reading the table."""

    def __init__(self, table: NoiseTable):
        self.table = table

    def canvas(self, rows, length, vocab_size, *, block, step):
        return mx.array(self.table.canvas(block, step)[rows].astype(np.int32))

    def proposal(self, logits, rows, *, block, step):
        return mx.argmax(logits + mx.array(self.table.gumbel(block, step)[rows]), axis=-1)


class ReferenceNoise:
    """The reference's side: stands in for ``torch.randint`` and ``torch.multinomial``.

    Per block the reference calls randint (initial canvas), then per step
    multinomial and randint (renoise); a randint that does not follow a
    multinomial therefore starts a block.
    """

    def __init__(self, table: NoiseTable):
        self.table = table
        self.block, self.step, self.after_proposal = -1, 0, False

    def randint(self, *args, size=None, **kwargs):
        assert tuple(size) == self.table.shape, size
        if not self.after_proposal:
            self.block, self.step = self.block + 1, 0
        self.after_proposal = False
        return torch.from_numpy(self.table.canvas(self.block, self.step))

    def multinomial(self, probs, num_samples, **kwargs):
        assert num_samples == 1 and probs.shape[0] == np.prod(self.table.shape)
        self.step, self.after_proposal = self.step + 1, True
        gumbel = torch.from_numpy(self.table.gumbel(self.block, self.step)).reshape(probs.shape)
        return (probs.log() + gumbel).argmax(-1, keepdim=True)


@pytest.fixture(scope="module")
def checkpoints(make_checkpoint, tmp_path_factory):
    """(MLX model, tokenizer, reference model) per checkpoint name, loaded once."""
    loaded = {}

    def get(name):
        if name not in loaded:
            if name.startswith("settling"):
                _, config, damping = name.split(":")
                path = make_checkpoint(config, damping=float(damping))
            else:
                path = make_checkpoint(name)
            model, tokenizer = load(path)
            reference = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
            loaded[name] = (model, tokenizer, reference)
        return loaded[name]

    return get


@dataclass
class Setting:
    checkpoint: str
    batch: int = 1
    prompt_length: int = 9  # longer than the sliding windows (4 and 6)
    max_new_tokens: int = 24
    max_denoising_steps: int = 8
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    pad_token_id: Optional[int] = PAD
    eos: list = field(default_factory=list)  # (row, block, position) of generated tokens to use as EOS
    expect: set = field(default_factory=set)  # scenarios this setting must exercise
    seed: int = 0

    def sampler(self):
        return dict(max_new_tokens=self.max_new_tokens, max_denoising_steps=self.max_denoising_steps,
                     entropy_bound=self.entropy_bound, t_min=self.t_min, t_max=self.t_max,
                     stability_threshold=self.stability_threshold,
                     confidence_threshold=self.confidence_threshold, pad_token_id=self.pad_token_id)


SETTINGS = {
    "three blocks, every step": Setting("settling:two_layer:0.3", expect={"blocks:3"}),
    "checkpoint defaults stop early": Setting(
        "settling:two_layer:0.2", batch=2, max_denoising_steps=10, expect={"early stop", "rows stop apart"}),
    "high entropy bound": Setting(
        "settling:four_layer:0.2", entropy_bound=1.0, confidence_threshold=0.5, expect={"early stop"}),
    "eos mid-block, pad after": Setting(
        "settling:two_layer:0.3", eos=[(0, 1, 3)], expect={"eos mid-block", "blocks:2"}),
    "batch rows stop at different steps": Setting(
        "settling:two_layer:0.3", batch=2, entropy_bound=0.5, confidence_threshold=1.0,
        max_denoising_steps=10, expect={"rows stop apart", "early stop"}),
    "batch row ends while the other goes on": Setting(
        "settling:four_layer:0.3", batch=2, entropy_bound=1.0, confidence_threshold=0.5,
        max_denoising_steps=10, eos=[(0, 0, 4)], expect={"row dropped", "eos mid-block", "rows stop apart"}),
    "stability over two steps": Setting(
        "settling:four_layer:0.2", batch=2, entropy_bound=1.0, confidence_threshold=0.5,
        stability_threshold=2, max_denoising_steps=10, expect={"early stop", "rows stop apart"}),
    "confidence alone (stability 0)": Setting(
        "settling:four_layer:0.3", batch=2, entropy_bound=2.0, stability_threshold=0,
        confidence_threshold=0.3, max_denoising_steps=9, expect={"early stop", "rows stop apart"}),
    # The plain checkpoints only with one or two steps (see the module docstring).
    "one step per block, hot schedule": Setting(
        "four_layer", max_new_tokens=20, max_denoising_steps=1, t_min=0.5, t_max=1.5, expect={"blocks:3"}),
    "partial last block, wide schedule": Setting(
        "two_layer", batch=2, max_new_tokens=13, max_denoising_steps=2, t_min=0.1, t_max=1.2,
        entropy_bound=0.3, prompt_length=5, expect={"blocks:2"}),
    "eos without pad": Setting(
        "settling:two_layer:0.3", batch=2, entropy_bound=1.0, confidence_threshold=0.5,
        max_denoising_steps=10, pad_token_id=None, eos=[(1, 0, 5)], expect={"row dropped"}),
    "rows end in different blocks": Setting(
        "settling:four_layer:0.2", batch=2, max_denoising_steps=6, entropy_bound=0.3, max_new_tokens=32,
        eos=[(0, 2, 2), (1, 0, 5)], expect={"row dropped", "eos mid-block", "all rows stop"}),
}


def make_prompt(setting: Setting, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + setting.seed)
    return rng.integers(3, vocab, (setting.batch, setting.prompt_length))


def pick_eos(tokens, row: int, block: int, position: int, length: int) -> int:
    """The token at (row, block, position), checked to appear nowhere earlier in the row."""
    token = tokens[row][block * length + position]
    assert token not in tokens[row][:block * length + position], "pick another position"
    return int(token)


def run_reference(reference, prompt, setting: Setting, eos, table, monkeypatch):
    noise = ReferenceNoise(table)
    options = setting.sampler()
    options["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(options.pop("entropy_bound")))
    with monkeypatch.context() as patch:
        patch.setattr(torch, "randint", noise.randint)
        patch.setattr(torch, "multinomial", noise.multinomial)
        out = reference.generate(torch.from_numpy(prompt), eos_token_id=eos, disable_compile=True, **options)
    return out.sequences[:, prompt.shape[1]:].numpy(), out.tokens_per_forward.numpy()


def scenarios(result, setting: Setting, length: int) -> set:
    seen = {f"blocks:{max(len(s) for s in result.steps_per_block)}"}
    N = setting.max_denoising_steps
    if any(s < N for steps in result.steps_per_block for s in steps):
        seen.add("early stop")
    if any(len(set(s)) > 1 for s in zip(*result.steps_per_block)):
        seen.add("rows stop apart")
    if len({len(s) for s in result.steps_per_block}) > 1:
        seen.add("row dropped")
    if all(reason == "stop" for reason in result.finish_reasons):
        seen.add("all rows stop")
    for tokens, reason in zip(result.tokens, result.finish_reasons):
        last = tokens[-length:]
        if reason == "stop" and setting.pad_token_id is not None and last[-1] == PAD and last[0] != PAD:
            seen.add("eos mid-block")
    return seen


# The fast path runs the settling settings with K = vocab and the reference's draws (a noise source
# without ``uniform``): then its one-pass entropy, argmax and acceptance and its gathered
# self-conditioning must give the reference's tokens; only K < vocab and its own draws make it differ.
CASES = [(name, "exact") for name in SETTINGS] + [
    (name, "fast") for name, setting in SETTINGS.items() if setting.checkpoint.startswith("settling")]


@pytest.mark.parametrize("name, path", CASES)
def test_tokens_match_reference(name, path, checkpoints, monkeypatch):
    setting = SETTINGS[name]
    model, tokenizer, reference = checkpoints(setting.checkpoint)
    L, V = model.args.canvas_length, model.args.vocab_size
    prompt = make_prompt(setting, V)
    table = NoiseTable(setting.seed, setting.batch, L, V)

    eos = None
    if setting.eos:
        free_run = batch_generate(model, tokenizer, prompt, noise=TableNoise(table), eos_token_id=[],
                                  **setting.sampler())
        eos = [pick_eos(free_run.tokens, *where, L) for where in setting.eos]
    path_options = {} if path == "exact" else {"exact": False, "top_k": V}
    ours = batch_generate(model, tokenizer, prompt, noise=TableNoise(table), eos_token_id=eos or [], **path_options,
                          **setting.sampler())
    expected, expected_tpf = run_reference(reference, prompt, setting, eos, table, monkeypatch)

    for row, tokens in enumerate(ours.tokens):
        if setting.pad_token_id is None:
            # Without pad the reference keeps generating finished rows; we stop them, so compare what both made.
            assert tokens == expected[row, :len(tokens)].tolist(), f"row {row}"
        else:
            padded = tokens + [PAD] * (expected.shape[1] - len(tokens))
            assert padded == expected[row].tolist(), f"row {row}"
        if setting.pad_token_id is not None or len(tokens) == expected.shape[1]:
            assert ours.tokens_per_forward[row] == pytest.approx(float(expected_tpf[row]), rel=1e-6), f"row {row}"

    missing = setting.expect - scenarios(ours, setting, L)
    assert not missing, f"setting no longer exercises {missing}: {ours.steps_per_block}"


# The engine's own promises, beyond matching the reference.

BATCH_PROMPT = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
BATCH_OPTIONS = dict(max_new_tokens=24, max_denoising_steps=10, entropy_bound=0.5, confidence_threshold=1.0)


def test_seeded_runs_are_reproducible_and_seeds_differ(checkpoints):
    model, tokenizer, _ = checkpoints("two_layer")
    runs = [batch_generate(model, tokenizer, BATCH_PROMPT, seed=seed, **BATCH_OPTIONS).tokens for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@contextmanager
def batch_sizes(model):
    """Records the batch size of every call of the decoder's body, its
    vocabulary projection and the encoder."""
    seen = {"denoise": [], "logits": [], "encode": []}
    # On the CPU the engine projects onto the vocabulary by host_logits, elsewhere by logits.
    methods = {"hidden_states": "denoise", "logits": "logits", "host_logits": "logits", "encode": "encode"}

    def counted(method):
        original = getattr(model, method)

        def call(first, *args, **kwargs):
            seen[methods[method]].append(first.shape[0])
            return original(first, *args, **kwargs)
        return call

    for method in methods:
        setattr(model, method, counted(method))
    try:
        yield seen
    finally:
        for method in methods:
            delattr(model, method)


def test_finished_rows_leave_the_computation(checkpoints):
    model, tokenizer, _ = checkpoints("settling:two_layer:0.3")
    setting = SETTINGS["batch rows stop at different steps"]
    L, V = model.args.canvas_length, model.args.vocab_size
    prompt = make_prompt(setting, V)
    noise = TableNoise(NoiseTable(setting.seed, setting.batch, L, V))

    with batch_sizes(model) as seen:
        result = batch_generate(model, tokenizer, prompt, noise=noise, eos_token_id=[], **setting.sampler())
    # A row is computed for exactly the steps it ran: once its block stops, it costs nothing more.
    assert sum(seen["denoise"]) == sum(map(sum, result.steps_per_block)) and 1 in seen["denoise"]
    assert seen["logits"] == seen["denoise"]
    # Each prompt is encoded into its own cache; the blocks are committed as one batch.
    assert seen["encode"] == [1, 1] + [2] * (len(result.steps_per_block[0]) - 1)

    eos = pick_eos(result.tokens, 0, 0, 3, L)
    with batch_sizes(model) as seen:
        result = batch_generate(model, tokenizer, prompt, noise=noise, eos_token_id=[eos], **setting.sampler())
    # The prompt of both rows, then only the row that did not end is committed and denoised.
    assert result.finish_reasons[0] == "stop" and len(result.tokens[0]) == L
    assert seen["encode"] == [1, 1, 1] and seen["denoise"][-1] == 1


def test_stream_events_agree_with_the_result(checkpoints):
    model, tokenizer, _ = checkpoints("settling:two_layer:0.3")
    options = dict(BATCH_OPTIONS, seed=3, pad_token_id=None)
    events = list(stream_blocks(model, tokenizer, BATCH_PROMPT, **options))
    result = batch_generate(model, tokenizer, BATCH_PROMPT, **options)

    blocks = [e for e in events if isinstance(e, Block)]
    assert [b.round for b in blocks] == list(range(len(blocks)))
    for block in blocks:
        drafts = [e for e in events if isinstance(e, Draft) and e.round == block.round]
        assert [d.step for d in drafts] == list(range(1, len(drafts) + 1))
        assert len(drafts) == max(block.steps)
        # The committed block is the last draft's argmax.
        np.testing.assert_array_equal(drafts[-1].canvas, block.tokens)
        for row in range(len(block.rows)):
            ran = [i == 0 or not drafts[i - 1].stopped[row] for i in range(len(drafts))]
            assert sum(ran) == block.steps[row]
            # The most certain position is always accepted; a row that stopped accepts nothing more.
            assert all((d.accepted[row] >= 1) == r for d, r in zip(drafts, ran))
    assert result.texts == ["".join(b.texts[b.rows.index(r)] for b in blocks if r in b.rows) for r in (0, 1)]
    assert result.tokens == [sum((b.tokens[b.rows.index(r)].tolist() for b in blocks if r in b.rows), [])
                             for r in (0, 1)]
    assert result.tokens_per_forward == blocks[-1].tokens_per_forward
    assert result.prompt_tokens == 18 and result.generation_tokens == 48 and result.peak_memory > 0


def test_the_checkpoints_generation_config_is_the_default(make_checkpoint):
    path = make_checkpoint("two_layer", generation_config={
        "max_new_tokens": 16, "max_denoising_steps": 3, "t_min": 0.2, "t_max": 0.6,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.3},
        "eos_token_id": [1, 106], "pad_token_id": 0})
    model, tokenizer = load(path)
    assert model.generation_config.max_denoising_steps == 3 and model.generation_config.entropy_bound == 0.3
    result = batch_generate(model, tokenizer, [3, 4, 5, 6], seed=0)
    assert len(result.tokens[0]) <= 16 and all(s <= 3 for s in result.steps_per_block[0])
    result = batch_generate(model, tokenizer, [3, 4, 5, 6], seed=0, max_denoising_steps=1, max_new_tokens=8)
    assert result.steps_per_block == [[1]]


class ScriptedModel:
    """Denoises block ``i`` confidently to ``blocks[i]``: stable and certain by its second step."""

    def __init__(self, blocks, vocab_size=128):
        self.args = ModelArgs(canvas_length=len(blocks[0]), vocab_size=vocab_size, num_hidden_layers=1)
        self.blocks = blocks
        self.encoded = []

    dtype = mx.float32

    def parameters(self):
        return {}

    def make_cache(self):
        return [type("Cache", (), {"offset": 0, "cached_kv": lambda self: None})()]

    def encode(self, ids, cache):
        self.encoded.append(np.array(ids).tolist())

    def hidden_states(self, canvas, cache, soft_embeddings=None):
        target = self.blocks[len(self.encoded) - 1]
        return mx.array(np.broadcast_to(np.array(target), canvas.shape))

    def logits(self, hidden_states):
        return mx.array(np.eye(self.args.vocab_size, dtype=np.float32)[np.array(hidden_states)] * 50)

    def host_logits(self, hidden_states):
        return np.array(self.logits(hidden_states))

    def soft_embeddings(self, processed_logits):
        return processed_logits


def test_answers_leave_out_thinking_special_tokens_and_what_follows_eos(make_checkpoint):
    _, tokenizer = load(make_checkpoint("two_layer"))
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    CHANNEL, END_CHANNEL, TURN, END_TURN, NEWLINE = 100, 101, 105, 106, 107
    blocks = [[CHANNEL] + ids("thought"),
              [NEWLINE] + ids("ok") + [END_CHANNEL] + ids("H") + [TURN] + ids("i") + [END_TURN],
              ids("ignored!")]
    model = ScriptedModel(blocks + [ids("never..")])
    messages = [{"role": "user", "content": "hey"}]
    result = batch_generate(model, tokenizer, messages=messages, max_new_tokens=32, eos_token_id=[1, END_TURN],
                      pad_token_id=0)
    assert result.texts == ["Hi"] and result.thinking == ["ok"]
    assert result.finish_reasons == ["stop"] and result.steps_per_block == [[2, 2]]
    assert result.tokens == [blocks[0] + blocks[1]]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    assert model.encoded[0] == [prompt] and prompt[-1] == END_CHANNEL  # the empty thought channel

    model = ScriptedModel([ids("Hi!") + [END_TURN] + ids("rest")])
    result = batch_generate(model, tokenizer, "hey", chat=True, enable_thinking=True, max_new_tokens=8,
                      eos_token_id=[END_TURN], pad_token_id=0)
    assert result.text == "Hi!" and result.tokens == [ids("Hi!") + [END_TURN] + [0] * 4]
    assert model.encoded[0][0][-1] != END_CHANNEL


def test_prompt_forms_and_bad_arguments(make_checkpoint):
    _, tokenizer = load(make_checkpoint("two_layer"))
    model = ScriptedModel([[10] * 8])
    generate(model, tokenizer, "hello", max_new_tokens=8)
    assert model.encoded[0] == [tokenizer.encode("hello")]
    with pytest.raises(TypeError, match="unexpected options"):
        generate(model, tokenizer, "hello", temperature=0.5)
    with pytest.raises(ValueError, match="use .texts"):
        _ = batch_generate(ScriptedModel([[10] * 8] * 2), tokenizer, [[1, 2], [3, 4]], max_new_tokens=8).text


def test_step_time_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "steps.json"
    step_time.main(["--shape", "tiny", "--layers", "2", "--prompt-tokens", "16", "--repeats", "2",
                    "--warmup", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert set(report["median_ms"]) == {"step_ms", "forward_ms", "commit_ms"}
    assert report["context_after"] == 16 + 3 * report["args"]["canvas_length"]
    assert "denoise step" in capsys.readouterr().out
