"""mlxdg lora end to end on a tiny checkpoint: it learns a handful of answers
that the default sampler then reproduces, resumes exactly where it stopped,
and refuses bad input in one line without writing adapters."""

import json

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_diffgemma.cli import app
from mlx_diffgemma.generate import generate
from mlx_diffgemma.loader import load

PAIRS = [("hi", "hello"), ("cat", "meow"), ("dog", "woof"), ("one", "two")]
# The real checkpoints stop at the end of turn (106) as well as at EOS.
GENERATION_CONFIG = {"eos_token_id": [1, 106], "pad_token_id": 0}


def write_data(directory, rows, splits=("train", "valid", "test")):
    directory.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def pairs_data(tmp_path):
    return write_data(tmp_path / "data", [{"prompt": p, "completion": c} for p, c in PAIRS])


def lora(*args):
    return CliRunner().invoke(app, ["lora", *map(str, args)])


def log(adapter_path):
    return [json.loads(line) for line in (adapter_path / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint("two_layer", generation_config=GENERATION_CONFIG)


def test_full_fine_tune_learns_the_answers(checkpoint, tmp_path):
    out = tmp_path / "adapters"
    result = lora("--model", checkpoint, "--train", "--data", pairs_data(tmp_path), "--fine-tune-type", "full",
                  "--iters", 200, "--batch-size", 4, "--learning-rate", 3e-3, "--steps-per-report", 50,
                  "--steps-per-eval", 100, "--adapter-path", out)
    assert result.exit_code == 0, result.output
    losses = [r["train_loss"] for r in log(out) if "train_loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0] / 10, losses
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "full" and config["model_type"] == "diffusion_gemma"
    model, tokenizer = load(checkpoint, adapter_path=out)
    answers = [generate(model, tokenizer, p, chat=True, seed=0) for p, _ in PAIRS]
    print("answers:", answers)
    assert answers == [c for _, c in PAIRS]


def test_lora_trains_only_the_adapters_and_resumes_exactly(checkpoint, tmp_path):
    data = pairs_data(tmp_path)
    common = ["--model", checkpoint, "--train", "--data", data, "--batch-size", 2, "--num-layers", -1,
              "--learning-rate", 1e-2, "--steps-per-eval", 1000, "--save-every", 10]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert lora(*common, "--iters", 20, "--adapter-path", whole).exit_code == 0
    assert lora(*common, "--iters", 10, "--adapter-path", part).exit_code == 0
    result = lora(*common, "--iters", 20, "--adapter-path", part, "--resume-adapter-file",
                  part / "adapters.safetensors")
    assert result.exit_code == 0, result.output
    assert "resuming after step 10" in result.output
    ours, reference = mx.load(str(part / "adapters.safetensors")), mx.load(str(whole / "adapters.safetensors"))
    assert set(ours) == set(reference) and all(k.endswith(("lora_a", "lora_b")) for k in ours)
    assert {k.split(".layers.")[1].split(".")[1] for k in ours} == {"self_attn", "mlp"}  # no router, experts
    for k in ours:
        assert np.allclose(ours[k], reference[k], atol=1e-6), k


def test_dora_runs(checkpoint, tmp_path):
    out = tmp_path / "dora"
    result = lora("--model", checkpoint, "--train", "--data", pairs_data(tmp_path), "--fine-tune-type", "dora",
                  "--iters", 5, "--batch-size", 2, "--adapter-path", out, "--test")
    assert result.exit_code == 0, result.output
    assert "Test loss" in result.output
    assert any(k.endswith(".m") for k in mx.load(str(out / "adapters.safetensors")))


BAD = {
    "malformed line": ({"train": '{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n'}, [],
                       "train.jsonl line 2: not valid JSON"),
    "no usable fields": ({"train": '{"question": "a"}\n'}, [], "train.jsonl line 1: has none of"),
    "empty split": ({"valid": "\n"}, [], "valid.jsonl holds no examples"),
    "batch larger than data": ({}, ["--batch-size", 9], "--batch-size 9 is larger than the 4 examples"),
    "too long": ({"train": json.dumps({"prompt": "a" * 40, "completion": "b"}) + "\n"}, ["--max-seq-length", 32],
                 "more than --max-seq-length 32"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_refused_in_one_line(checkpoint, tmp_path, case):
    files, extra, message = BAD[case]
    data = pairs_data(tmp_path)
    for split, text in files.items():
        (data / f"{split}.jsonl").write_text(text)
    out = tmp_path / "adapters"
    result = lora("--model", checkpoint, "--train", "--data", data, "--iters", 2, "--adapter-path", out, *extra)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlxdg: ") and message in lines[0], result.output
    assert not out.exists()


def test_missing_data_is_refused(checkpoint, tmp_path):
    result = lora("--model", checkpoint, "--train", "--adapter-path", tmp_path / "a")
    assert result.exit_code == 1 and result.output.startswith("mlxdg: --data is required")
    assert not (tmp_path / "a").exists()


def test_adapters_of_another_model_are_refused(checkpoint, make_checkpoint, tmp_path):
    out = tmp_path / "adapters"
    assert lora("--model", checkpoint, "--train", "--data", pairs_data(tmp_path), "--iters", 2,
                "--batch-size", 2, "--adapter-path", out).exit_code == 0
    other = make_checkpoint("four_layer")
    result = CliRunner().invoke(app, ["generate", "--model", str(other), "--adapter-path", str(out), "hi"])
    assert result.exit_code == 1
    assert result.output.startswith("mlxdg: ") and "does not fit this model" in result.output, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    result = CliRunner().invoke(app, ["generate", "--model", str(checkpoint), "--adapter-path", str(out), "hi"])
    assert result.exit_code == 1 and "for a 'llama' model" in result.output


def test_a_run_that_cannot_fit_is_refused_before_training(checkpoint, tmp_path):
    out = tmp_path / "adapters"
    result = lora("--model", checkpoint, "--train", "--data", pairs_data(tmp_path), "--iters", 2,
                  "--adapter-path", out, "--memory-limit", "100KB")
    assert result.exit_code == 1 and result.output.startswith("mlxdg: training needs about"), result.output
    assert "lower" in result.output and not out.exists()


def test_config_file_schedule_optimizer_and_grad_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "adapters"
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {checkpoint}\ntrain: true\ndata: {pairs_data(tmp_path)}\niters: 6\nbatch_size: 2\n"
                      "steps_per_report: 2\nsteps_per_eval: 100\noptimizer: adamw\n"
                      "optimizer_config:\n  adamw:\n    weight_decay: 0.01\n"
                      "lr_schedule:\n  name: cosine_decay\n  arguments: [1.0e-3, 6]\n  warmup: 2\n"
                      "lora_parameters:\n  rank: 4\n  scale: 1.0\n  dropout: 0.0\n")
    result = lora("-c", config, "--adapter-path", out, "--grad-checkpoint", "--seed", 3)
    assert result.exit_code == 0, result.output
    rates = [r["learning_rate"] for r in log(out) if "learning_rate" in r]
    assert rates[0] < rates[1] and rates[-1] < rates[1]  # warm-up, then the cosine decay
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["optimizer"] == "adamw" and saved["grad_checkpoint"] and saved["lora_parameters"]["rank"] == 4
    assert saved["seed"] == 3  # the command line wins over the file's and the defaults
    bad = lora("-c", config, "--adapter-path", tmp_path / "b", "--optimizer", "lion")
    assert bad.exit_code == 1 and bad.output.startswith("mlxdg: --optimizer must be one of")
