"""Sudoku: the puzzle generator and checker, the model's checkpoint layout,
`mlxdg generate` on a puzzle, the board view and `mlxdg bench --task sudoku`."""

import hashlib
import io
import json
import random
import subprocess
import sys

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mlx_diffgemma.cli import app
from mlx_diffgemma.generate import Draft
from mlx_diffgemma.sudoku import checkpoint as sudoku_checkpoint
from mlx_diffgemma.sudoku.board import CELL_POSITIONS, BoardView
from mlx_diffgemma.sudoku.puzzles import (CELLS, PuzzleError, conflicts, format_grid, is_solution, make_puzzle,
                                          parse, puzzles, read_jsonl, solve, write_dataset)

PUZZLE = ("530070000600195000098000060800060003400803001700020006060000280000419005000080079")
SOLUTION = ("534678912672195348198342567859761423426853791713924856961537284287419635345286179")


def test_solver_finds_the_unique_solution_and_counts_a_second():
    assert solve(parse(PUZZLE)) == [parse(SOLUTION)]
    # Blank a whole row of the solution's two digits: two ways to fill it.
    grid = list(parse(SOLUTION))
    a, b = grid.index(1), grid.index(2)  # first 1 and first 2 are in row 0
    other = [i for i in range(CELLS) if i // 9 != 0 and grid[i] in (1, 2)]
    assert len(solve(grid, 2)) == 1
    for i in [a, b] + other:
        grid[i] = 0
    assert len(solve(grid, 2)) == 2


@pytest.mark.parametrize("givens", [36, 46, 50])
def test_puzzles_have_the_asked_givens_and_one_solution(givens):
    puzzle, solution = make_puzzle(random.Random(givens), givens)
    assert sum(1 for d in puzzle if d) == givens
    assert is_solution(puzzle, solution)
    assert solve(puzzle, 2) == [solution]


def test_puzzles_are_reproducible_from_their_seed_and_differ_between_seeds():
    first = list(puzzles(7, 5, (36, 46)))
    assert first == list(puzzles(7, 5, (36, 46)))
    assert first != list(puzzles(8, 5, (36, 46)))
    assert all(36 <= p.givens <= 46 for p in first)
    assert len({p.puzzle for p in first}) == 5


def test_checker_rejects_broken_answers():
    puzzle, solution = parse(PUZZLE), parse(SOLUTION)
    assert is_solution(puzzle, solution)
    swapped = list(solution)
    swapped[2], swapped[3] = swapped[3], swapped[2]  # a row stays whole, two columns break
    assert not is_solution(puzzle, swapped)
    assert conflicts(swapped) == {"rows": 0, "columns": 2, "boxes": 2}
    assert not is_solution(puzzle, solution[:80])
    # A valid grid that changes a given is not this puzzle's solution.
    relabelled = [10 - d for d in solution]
    assert not is_solution(puzzle, relabelled) and is_solution([0] * CELLS, relabelled)


def test_parse_reads_one_line_nine_lines_dots_and_spaces():
    dotted = PUZZLE.replace("0", ".")
    lines = "\n".join(" ".join(PUZZLE[r * 9:(r + 1) * 9]) for r in range(9))
    assert parse(PUZZLE) == parse(dotted) == parse(lines) == parse(format_grid(parse(PUZZLE)))
    with pytest.raises(PuzzleError, match="81 cells, this has 80"):
        parse(PUZZLE[:80])
    with pytest.raises(PuzzleError, match="not 'x'"):
        parse(PUZZLE[:80] + "x")


def test_dataset_is_trainer_jsonl_with_puzzle_prompts_and_solution_completions(tmp_path):
    info = write_dataset(tmp_path, seed=3, train=4, valid=2, test=2, givens=(45, 50))
    assert info == {"seed": 3, "givens": [45, 50], "train": 4, "valid": 2, "test": 2}
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]) == {"prompt", "completion"}
    assert rows[0]["prompt"].count("\n") == 8 and len(rows[0]["completion"]) == 89
    for item in read_jsonl(tmp_path / "train.jsonl"):
        assert is_solution(item.puzzle, item.solution)
    # Each split has its own seed: no puzzle is in two splits.
    splits = [{p.puzzle for p in read_jsonl(tmp_path / f"{n}.jsonl")} for n in ("train", "valid", "test")]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])


# ---------------------------------------------------------------- the checkpoint

@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    # Two layers keep the fixture fast; the layout is the packaged model's.
    return sudoku_checkpoint.write_init(tmp_path_factory.mktemp("sudoku") / "init", seed=0, num_hidden_layers=2,
                                        layer_types=["sliding_attention", "full_attention"])


def test_init_checkpoint_loads_in_transformers_and_here_with_the_same_tokens(init_checkpoint):
    import torch
    from mlx_lm.utils import load_tokenizer
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    import mlx_diffgemma  # noqa: F401  (OpenBLAS before MLX)
    import mlx.core as mx
    from mlx_diffgemma import load

    config = json.loads((init_checkpoint / "config.json").read_text())
    assert config["model_type"] == "diffusion_gemma" and config["mlxdg_task"] == "sudoku"
    assert config["canvas_length"] == 90
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(init_checkpoint).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(init_checkpoint)
    tokenizer = load_tokenizer(init_checkpoint)
    messages = [{"role": "user", "content": format_grid(parse(PUZZLE))}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert sudoku_checkpoint.VOCAB.index("<unk>") not in ids
    answer = hf_tokenizer.encode(format_grid(parse(SOLUTION)), add_special_tokens=False)
    assert len(answer) + 1 == config["canvas_length"]  # the digits, the newlines and EOS fill the canvas
    assert tokenizer.decode(answer) == format_grid(parse(SOLUTION))

    model, _ = load(init_checkpoint)
    canvas = answer + [sudoku_checkpoint.EOS]
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([canvas])).logits
    cache = model.make_cache()
    model.encode(mx.array([ids]), cache)
    logits = model.denoise(mx.array([canvas]), cache)
    np.testing.assert_allclose(np.array(logits), expected.numpy(), atol=1e-4)


def test_init_takes_architecture_overrides_and_refuses_a_bad_one(tmp_path):
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 1696.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    out = tmp_path / "init"
    ran = CliRunner().invoke(app, ["sudoku", "init", str(out), "--set", "num_hidden_layers=2",
                                   "--set", 'layer_types=["sliding_attention","full_attention"]',
                                   "--set", "rope_parameters=" + json.dumps(rope, separators=(",", ":"))])
    assert ran.exit_code == 0, ran.output
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert text["num_hidden_layers"] == 2 and text["rope_parameters"] == rope
    for bad in ("hidden=3", "hidden_size", "hidden_size=[1"):
        refused = CliRunner().invoke(app, ["sudoku", "init", str(tmp_path / "bad"), "--set", bad])
        assert refused.exit_code == 2 and bad in refused.output
    assert not (tmp_path / "bad").exists()


def test_export_writes_trained_weights_back_in_the_init_layout(init_checkpoint, tmp_path):
    from mlx.utils import tree_flatten
    from safetensors.numpy import load_file

    import mlx_diffgemma  # noqa: F401
    from mlx_diffgemma import load

    model, _ = load(init_checkpoint)
    weights = {k: np.array(v) + 1.0 for k, v in tree_flatten(model.parameters())}
    out = sudoku_checkpoint.export(init_checkpoint, weights, tmp_path / "trained")
    before, after = load_file(str(init_checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    key = "model.decoder.layers.0.experts.gate_up_proj"
    np.testing.assert_array_equal(after[key], before[key] + 1.0)
    vision = [k for k in before if "vision" in k]
    assert vision and all(np.array_equal(before[k], after[k]) for k in vision)
    reloaded, _ = load(out)
    np.testing.assert_array_equal(np.array(reloaded.model.decoder.norm.weight),
                                  np.array(model.model.decoder.norm.weight) + 1.0)
    with pytest.raises(ValueError, match="not in"):
        sudoku_checkpoint.export(init_checkpoint, {"model.decoder.nonsense": np.zeros(1)}, tmp_path / "bad")


def test_generate_reads_a_puzzle_and_refuses_a_bad_one_in_one_line(init_checkpoint):
    runner = CliRunner()
    bad = runner.invoke(app, ["generate", "--model", str(init_checkpoint), PUZZLE[:80]])
    assert bad.exit_code == 1
    assert bad.output.strip() == "mlxdg: a Sudoku puzzle has 81 cells, this has 80"
    # The random init answers with something; the command says it is no solution.
    ran = runner.invoke(app, ["generate", "--model", str(init_checkpoint), "--seed", "0", "--steps", "2",
                              PUZZLE.replace("0", ".")])
    assert ran.exit_code == 0, ran.output
    assert "mlxdg: the answer is not a solution" in ran.output


def test_board_view_draws_givens_settled_and_noisy_cells():
    from mlx_lm.utils import load_tokenizer  # noqa: F401

    class Tokens:
        def get_vocab(self):
            return {str(d): 10 + d for d in range(10)}

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80, color_system="truecolor")
    puzzle = parse(PUZZLE)
    view = BoardView(console, Tokens(), puzzle, max_steps=4)
    canvas = np.full((1, 90), 3)  # not a digit anywhere: every blank shows as a dot
    first = Draft(round=0, step=1, rows=(0,), row_blocks=(0,), canvas=canvas, accepted=np.array([1]),
                  stopped=np.array([False]))
    board = view.board(canvas[0], np.zeros(90, bool))
    assert board.plain.count("\u00b7") == CELLS - sum(1 for d in puzzle if d)
    view.draft(first)
    second = canvas.copy()
    second[0, CELL_POSITIONS[2]] = 10 + 4  # the first blank becomes a 4 ...
    view.draft(Draft(0, 2, (0,), (0,), second, np.array([2]), np.array([False])))
    # ... a change, so it is drawn noisy; the unchanged blanks are settled.
    styles = {span.style for span in view.board(second[0], second[0] == canvas[0]).spans}
    assert {"bold cyan", "bold", "dim yellow"} <= styles
    view.block(format_grid(parse(SOLUTION)), "")
    view.close()
    assert "step 2/4" in out.getvalue()


def test_bench_task_sudoku_reports_every_decoding(init_checkpoint, tmp_path):
    result_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    ran = CliRunner().invoke(app, ["bench", "--task", "sudoku", "--model", str(init_checkpoint), "--puzzles", "2",
                                   "--fast", "--json", str(result_path), "--plot", str(plot_path)])
    assert ran.exit_code == 0, ran.output
    result = json.loads(result_path.read_text())
    assert result["schema"] == "mlxdg-bench-sudoku/1" and plot_path.stat().st_size > 0
    assert set(result["engines"]) == {"diffusion", "diffusion (fast)", "autoregressive"}
    assert result["options"]["fast"] and result["options"]["sc_top_k"] == 32
    assert result["model"] == str(init_checkpoint)
    assert result["weights_sha256"] == hashlib.sha256((init_checkpoint / "model.safetensors").read_bytes()).hexdigest()
    for name in ("diffusion", "diffusion (fast)"):
        diffusion = result["engines"][name]
        assert len(diffusion["runs"]) == 2 and diffusion["summary"]["puzzles"] == 2
        assert sum(diffusion["summary"]["steps_per_block_distribution"].values()) == 2
        # The same puzzles with the same seeds.
        assert [r["puzzle"] for r in diffusion["runs"]] == [r["puzzle"] for r in result["engines"]["diffusion"]["runs"]]
    assert "autoregressive" in ran.output and "diffusion (fast)" in ran.output and "fast path against" in ran.output
    bad = CliRunner().invoke(app, ["bench", "--task", "sudoku", "--givens", "50-45"])
    assert bad.exit_code == 2
    # --fast means nothing to the synthetic bench (its --vs mlx-vlm times both paths): refused, not ignored.
    bad = CliRunner().invoke(app, ["bench", "--synthetic", "tiny", "--fast"])
    assert bad.exit_code == 2 and "--task sudoku" in bad.output


def test_generate_on_a_sudoku_checkpoint_runs_without_torch(init_checkpoint, tmp_path):
    """With every installed package but torch visible (python -S, links to the rest): torch is not needed."""
    import site
    from pathlib import Path

    visible = tmp_path / "site-packages"
    visible.mkdir()
    for directory in site.getsitepackages():
        for entry in Path(directory).iterdir():
            hidden = entry.name.startswith(("torch", "functorch")) or entry.suffix == ".pth"
            if not hidden and not (visible / entry.name).exists():
                (visible / entry.name).symlink_to(entry)
    root = Path(__file__).resolve().parents[1]
    code = (f"import sys; sys.path[:0] = [{str(visible)!r}, {str(root)!r}]\n"
            "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch is visible')\n"
            "from typer.testing import CliRunner\nfrom mlx_diffgemma.cli import app\n"
            f"r = CliRunner().invoke(app, ['generate', '--model', {str(init_checkpoint)!r}, '--steps', '1', {PUZZLE!r}])\n"
            "assert r.exit_code == 0, r.output\n")
    subprocess.run([sys.executable, "-S", "-c", code], check=True, cwd=tmp_path)


# ---------------------------------------------------------------- the packaged model

# A fixed, held-out set (the bench's seed, never used for training data) and what the committed
# checkpoint (training step 4000, the end of its schedule) scored on it with seed 0 on this project's
# CPU: 97.2% of blank cells right, 14 of 16 solved, 9.06 denoising steps per block (seeds 1-3:
# 96.3-96.7%, 13-14 solved, 8.9-9.2 steps). Raise these when a better model ships.
GUARD_PUZZLES = list(puzzles(1_000_003, 16, (45, 50)))
GUARD_BLANK_CELL_ACCURACY = 0.972
GUARD_SOLVED = 14
GUARD_STEPS_PER_BLOCK = 9.06


@pytest.fixture(scope="module")
def packaged():
    import mlx_diffgemma  # noqa: F401
    from mlx_diffgemma import load

    return load("sudoku")


def _prompt(tokenizer, grid):
    return tokenizer.apply_chat_template([{"role": "user", "content": format_grid(grid)}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def guard_run(packaged):
    from mlx_diffgemma.generate import batch_generate

    model, tokenizer = packaged
    result = batch_generate(model, tokenizer, [_prompt(tokenizer, p.puzzle) for p in GUARD_PUZZLES], seed=0)
    return result, [score_answer(p, text) for p, text in zip(GUARD_PUZZLES, result.texts)]


def score_answer(item, text):
    from mlx_diffgemma.bench.sudoku import score

    return score(item, text)


def test_packaged_model_is_small_and_in_the_hugging_face_layout():
    from mlx_diffgemma.sudoku import MODEL_DIR

    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "model.safetensors", "training_log.jsonl", "bench.json"} <= names
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) <= 20 * 2**20
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "diffusion_gemma" and config["mlxdg_task"] == "sudoku"


def test_quality_guard_on_fixed_puzzles(guard_run):
    _, scores = guard_run
    accuracy = sum(s["blank_cells_right"] for s in scores) / sum(s["blank_cells"] for s in scores)
    # Another backend's rounding changes some draws: a few points; a real regression costs far more.
    # Chance is about 11% (one digit in 9), so the guard is well above what an untrained model gets.
    assert accuracy >= GUARD_BLANK_CELL_ACCURACY - 0.05, accuracy
    # An untrained model solves none, the model shipped before this one 2-4; seeds 0-3 solve 13-14.
    assert sum(s["solved"] for s in scores) >= GUARD_SOLVED - 3, scores


# The fast path's guard, on the same puzzles with the same seed. With 23 tokens the default top-32
# self-conditioning is the whole vocabulary's, bit for bit the exact path's, so only the proposals'
# draws differ (an inverse-CDF draw against a categorical one). On this CPU, over seeds 0-3, the fast
# path's blank-cell accuracy was -0.4 to +2.6 points from the exact path's and its mean steps per block
# -0.4 to +3.2 from it on the step-700 model, -0.4 to 0 points and -1.2 to +1.4 steps on the step-3350
# one, and -0.7 to +2.8 points and -0.9 to +0.1 steps on the step-4000 one (RoPE base 315); on the
# shipped model (base 1696) -0.2 to 0 points and 0 steps: the margins below hold that noise.
FAST_ACCURACY_MARGIN = 0.03
FAST_STEPS_MARGIN = 4.0


@pytest.fixture(scope="module")
def fast_guard_run(packaged):
    from mlx_diffgemma.generate import batch_generate

    model, tokenizer = packaged
    result = batch_generate(model, tokenizer, [_prompt(tokenizer, p.puzzle) for p in GUARD_PUZZLES], seed=0,
                            exact=False)
    return result, [score_answer(p, text) for p, text in zip(GUARD_PUZZLES, result.texts)]


def _quality(run):
    result, scores = run
    steps = [s for row in result.steps_per_block for s in row]
    return (sum(s["blank_cells_right"] for s in scores) / sum(s["blank_cells"] for s in scores),
            sum(steps) / len(steps))


def test_fast_path_keeps_the_exact_paths_quality(guard_run, fast_guard_run):
    (exact_accuracy, exact_steps), (fast_accuracy, fast_steps) = _quality(guard_run), _quality(fast_guard_run)
    assert fast_accuracy >= exact_accuracy - FAST_ACCURACY_MARGIN, (fast_accuracy, exact_accuracy)
    assert fast_steps <= exact_steps + FAST_STEPS_MARGIN, (fast_steps, exact_steps)


def test_adaptive_stopping_stops_blocks_early_on_the_trained_model(packaged, guard_run):
    result, _ = guard_run
    steps = [s for row in result.steps_per_block for s in row]
    cap = packaged[0].generation_config.max_denoising_steps
    assert min(steps) < cap and sum(steps) / len(steps) < GUARD_STEPS_PER_BLOCK + 4, steps


def test_batched_answers_are_whole_grids(guard_run):
    result, scores = guard_run
    assert len(result.texts) == len(GUARD_PUZZLES)
    assert all(s["conflicts"] is not None for s in scores), result.texts  # 81 digits each


def test_generate_and_chat_print_the_board_as_nine_lines(packaged):
    grid = format_grid(GUARD_PUZZLES[0].puzzle).replace("\n", "")
    ran = CliRunner().invoke(app, ["generate", "--model", "sudoku", "--seed", "0", grid])
    assert ran.exit_code == 0, ran.output
    lines = [line for line in ran.output.splitlines() if not line.startswith("mlxdg:")]
    assert len(lines) == 9 and all(len(line) == 9 and line.isdigit() for line in lines), ran.output
    chatted = CliRunner().invoke(app, ["chat", "--model", "sudoku", "--seed", "0"], input=grid + "\n/exit\n")
    assert chatted.exit_code == 0, chatted.output
    assert lines[0] in chatted.output


def test_live_board_follows_the_denoising_of_the_packaged_model(packaged):
    from mlx_diffgemma.generate import Block, Draft, stream_blocks

    model, tokenizer = packaged
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80)
    item = GUARD_PUZZLES[0]
    view = BoardView(console, tokenizer, item.puzzle, max_steps=model.generation_config.max_denoising_steps)
    steps = 0
    for event in stream_blocks(model, tokenizer, _prompt(tokenizer, item.puzzle), seed=0):
        if isinstance(event, Draft):
            view.draft(event)
            steps += 1
        elif isinstance(event, Block):
            view.block(event.texts[0], "")
    view.close()
    assert steps >= 1 and f"step {steps}/" in out.getvalue()


def test_short_full_fine_tune_lowers_the_loss(init_checkpoint, tmp_path):
    """What CI trains: a few steps of `mlxdg lora --fine-tune-type full` on puzzles; the loss falls."""
    data = tmp_path / "data"
    write_dataset(data, seed=5, train=32, valid=8, test=8, givens=(45, 50))
    adapters = tmp_path / "adapters"
    ran = CliRunner().invoke(app, [
        "lora", "--model", str(init_checkpoint), "--train", "--data", str(data), "--fine-tune-type", "full",
        "--batch-size", "8", "--iters", "12", "--learning-rate", "3e-3", "--steps-per-report", "4",
        "--steps-per-eval", "100", "--val-batches", "1", "--adapter-path", str(adapters), "--seed", "0"])
    assert ran.exit_code == 0, ran.output
    log = [json.loads(line) for line in (adapters / "train_log.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in log if "train_loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, losses
    # The trained weights export back into the init's layout and load.
    from safetensors.numpy import load_file

    out = sudoku_checkpoint.export(init_checkpoint, load_file(str(adapters / "adapters.safetensors")),
                                   tmp_path / "trained")
    assert (out / "model.safetensors").is_file()
