"""`mlxdg bench`: the report's numbers agree with each other and with the runs they come from.

Timings are never asserted: only that every derived figure is computed from
the same records the report lists.
"""

import json
import math
import statistics

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_diffgemma.bench.engines import ANSWER_BUCKETS, EncoderLM
from mlx_diffgemma.bench.roofline import crossover_steps
from mlx_diffgemma.bench.models import QUANT, gemma4_on_same_weights, recipe_predicate
from mlx_diffgemma.bench.synthetic import build_diffusion_model, synthetic_args
from mlx_diffgemma.cli import app

STEPS = (2, 3)
GEN_TOKENS = 64  # two canvases of the tiny shape (32), so one commit happens inside the run
TRIALS = 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(app, [
        "bench", "--synthetic", "tiny", "--steps", ",".join(map(str, STEPS)), "--trials", str(TRIALS),
        "--prompt-tokens", "8", "--gen-tokens", str(GEN_TOKENS), "--json", str(out / "bench.json"),
        "--plot", str(out / "bench.png"), "--batch", "2,4"])
    assert result.exit_code == 0, result.output
    return result.output, json.loads((out / "bench.json").read_text()), out


def _close(a, b):
    return a == pytest.approx(b, rel=1e-9)


def test_report_lists_every_engine_and_section(tiny_run):
    output, report, out = tiny_run
    assert report["schema"] == "mlxdg-bench/1"
    names = [e["name"] for e in report["engines"]]
    assert names == ["diffusion-s2", "diffusion-s3", "diffusion-natural", "ar-same-weights", "ar-gemma4"]
    assert len(report["records"]) == TRIALS * len(names)
    assert {r["trial"] for r in report["records"]} == set(range(TRIALS))
    for key in ("device", "memory_bytes", "bandwidth", "dense_flops", "quantized_flops", "versions"):
        assert key in report["machine"]
    probes = report["machine"]["probes"]  # before and after the trials; the roofline takes the higher
    assert len(probes) == 2 and report["roofline"]["bandwidth"] == max(p["bandwidth"] for p in probes)
    assert report["model"]["cpu_expert_path"] == "dequantized"
    assert "toy model" in report["model"]["scaled"]
    for rooflines in ("this_run", "full_model"):
        assert set(report["roofline"][rooflines]) == {"ar_tokens_per_second", "step_ms", "step_bound", "commit_ms",
                                                      "crossover_steps"}
    for title in ("Engines", "Efficiency", "Diffusion / AR", "Roofline", "Crossover s*", "Short answers"):
        assert title in output
    if (out / "bench.png").exists():
        assert "plot written" in output
    else:
        assert "matplotlib is not installed" in output


def test_records_are_internally_consistent(tiny_run):
    _, report, _ = tiny_run
    canvas = report["settings"]["canvas_length"]
    for r in report["records"]:
        assert _close(r["decode_tokens_per_second"], r["decode_tokens"] / r["decode_seconds"])
        assert _close(r["prefill_tokens_per_second"], r["prompt_tokens"] / r["prefill_seconds"])
        assert _close(r["end_to_end_tokens_per_second"], r["generated_tokens"] / r["total_seconds"])
        assert _close(r["tokens_per_forward"], r["generated_tokens"] / r["forwards"])
        assert r["first_output_seconds"] <= r["total_seconds"]
        answers = [r["answer_seconds"][str(high)] for _, high in ANSWER_BUCKETS]
        reached = [a for a in answers if a is not None]
        assert reached == sorted(reached) and answers[-1] is None  # 64 tokens never reach 256
        if r["engine"].startswith("ar"):
            assert r["generated_tokens"] == r["forwards"] == GEN_TOKENS
            assert r["decode_tokens"] == GEN_TOKENS - 1
        else:
            assert r["decode_tokens"] == r["generated_tokens"]
            assert _close(r["steps_per_block"], r["forwards"] / r["blocks"])
            assert r["blocks"] == math.ceil(GEN_TOKENS / canvas) and r["commits_timed"] == r["blocks"]
            # the first three buckets all end in the first canvas of 32 tokens
            assert answers[0] == answers[1] == r["first_output_seconds"]
    for s in STEPS:  # fixed steps: no early stop, no end of sequence
        for r in (r for r in report["records"] if r["engine"] == f"diffusion-s{s}"):
            assert r["steps_per_block"] == s and r["generated_tokens"] == GEN_TOKENS


def test_summaries_and_experts(tiny_run):
    _, report, _ = tiny_run
    args = report["model"]["args"]
    for e in report["engines"]:
        runs = [r for r in report["records"] if r["engine"] == e["name"]]
        decode = [r["decode_tokens_per_second"] for r in runs]
        assert e["summary"]["decode_tokens_per_second"]["values"] == decode
        assert _close(e["summary"]["decode_tokens_per_second"]["median"], statistics.median(decode))
        experts = e["distinct_experts_per_layer_per_step"]
        assert args["top_k_experts"] <= experts["min"] <= experts["mean"] <= experts["max"] <= args["num_experts"]
        if e["kind"] == "ar":  # one token picks exactly top-k distinct experts
            assert experts["min"] == experts["max"] == args["top_k_experts"]
        step = e["efficiency"]["step"]
        step_s = e["summary"]["step_ms"]["median"] / 1e3
        assert _close(step["bandwidth"], step["modelled_bytes"] / step_s)
        assert _close(step["percent_of_roofline"], 100 * step["roofline_seconds"] / step_s)


def test_ratios_and_crossover_come_from_the_same_trials(tiny_run):
    _, report, _ = tiny_run
    by = {(r["engine"], r["trial"]): r for r in report["records"]}
    assert len(report["ratios"]) == 3 * 2
    for ratio in report["ratios"]:
        decode = lambda engine, t: by[engine, t]["decode_tokens_per_second"]
        expected = [decode(ratio["diffusion"], t) / decode(ratio["ar"], t) for t in range(TRIALS)]
        assert ratio["decode_tokens_per_second"]["values"] == pytest.approx(expected, rel=1e-12)
    canvas = report["settings"]["canvas_length"]
    for ar, stat in report["crossover_steps"]["measured"].items():
        expected = []
        for t in range(TRIALS):
            fixed = [by[f"diffusion-s{s}", t] for s in STEPS]
            # every fixed-step run of a trial has its steps and commits in equal measure
            step_s = sum(r["step_ms"] * r["steps_per_block"] for r in fixed) / sum(STEPS) / 1e3
            commit_s = statistics.fmean(r["commit_ms"] for r in fixed) / 1e3
            expected.append(crossover_steps(by[ar, t]["decode_tokens_per_second"], step_s, commit_s, canvas))
        assert stat["values"] == pytest.approx(expected, rel=1e-12)
    assert report["crossover_steps"]["roofline"] == report["roofline"]["this_run"]["crossover_steps"]


@pytest.mark.parametrize("args, message", [
    ([], "either --model"),
    (["--synthetic", "huge"], "--synthetic takes one of"),
    (["--model", "somewhere", "--layers", "2"], "shape a --synthetic model"),
    (["--synthetic", "tiny", "--quant", "3"], "--quant takes one of"),
    (["--synthetic", "tiny", "--gen-tokens", "1"], "must be 2 or more"),
    (["--synthetic", "tiny", "--vs", "vllm"], "--vs takes mlx-vlm"),
])
def test_bad_requests_fail_in_one_line(args, message):
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 2 and message in result.output


def test_vs_mlx_vlm_times_both_engines_on_the_same_weights(tmp_path):
    pytest.importorskip("mlx_vlm")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--synthetic", "tiny", "--steps", "2", "--trials", "1",
                                      "--gen-tokens", "32", "--vs", "mlx-vlm", "--json", str(out)])
    assert result.exit_code == 0, result.output
    vs = json.loads(out.read_text())["vs"]
    assert vs["engine"] == "mlx-vlm" and vs["rounds"] == 1
    names = set(vs["median_seconds"])
    assert {"ours: engine step, exact", "mlx-vlm: engine step", "mlx-vlm: commit (encode one block)"} <= names
    assert all(len(v) == 1 and v[0] > 0 for v in vs["seconds"].values())
    assert "Against mlx-vlm on the same weights" in result.output


def test_tiny_is_a_smoke_run_by_default():
    from mlx_diffgemma.bench.run import Options, with_defaults

    tiny, full = with_defaults(Options(synthetic="tiny")), with_defaults(Options(synthetic="26b-a4b"))
    assert tiny.trials < full.trials and tiny.gen_tokens < full.gen_tokens and len(tiny.steps) < len(full.steps)
    assert with_defaults(Options(synthetic="tiny", trials=7)).trials == 7


def test_steps_must_be_counts():
    result = CliRunner().invoke(app, ["bench", "--synthetic", "tiny", "--steps", "4,x"])
    assert result.exit_code == 2 and "comma-separated" in result.output


def test_autoregression_on_our_weights_is_gemma4():
    """The 'AR, same weights' engine computes what mlx-lm's Gemma 4 computes
    with those weights, past the sliding window and token by token."""
    args = synthetic_args("tiny", 3)
    model = build_diffusion_model(args, mx.float32, seed=3)
    for i, layer in enumerate(model.model.encoder.language_model.layers):
        layer.layer_scalar = mx.array([0.5 + 0.1 * i])  # the encoder's own scalars, unlike the decoder's ones
    gemma = gemma4_on_same_weights(model)
    tokens = mx.array([[(7 * i) % args.vocab_size for i in range(args.sliding_window + 20)]])
    lm = EncoderLM(model)
    cache = lm.make_cache()
    prompt = tokens.shape[1] - 2
    ours = [lm(tokens[:, :prompt], cache)[:, -1]] + [lm(tokens[:, i:i + 1], cache)[:, -1] for i in (prompt, prompt + 1)]
    for n, logits in zip((prompt, prompt + 1, prompt + 2), ours):
        assert mx.allclose(logits, gemma(tokens[:, :n])[:, -1], atol=1e-5).item()


def test_gemma4_reads_our_quantized_arrays_without_copies():
    args = synthetic_args("tiny")
    model = build_diffusion_model(args, mx.bfloat16, quant_predicate=recipe_predicate(*QUANT["mixed"]))
    before = mx.get_active_memory()
    gemma = gemma4_on_same_weights(model)
    assert mx.get_active_memory() - before < 0.01 * sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    ours, theirs = model.layers[0], gemma.model.layers[0]
    experts = theirs.experts.switch_glu
    assert ours.experts.gate_up_proj.bits == experts.gate_proj.bits == experts.down_proj.bits == 4
    assert ours.self_attn.q_proj.bits == theirs.self_attn.q_proj.bits == 8
    tokens = mx.array([[5, 9, 2, 77]])
    assert mx.allclose(EncoderLM(model)(tokens, model.make_cache())[:, -1], gemma(tokens)[:, -1], atol=1e-2).item()


def test_batch_sweep_is_consistent(tiny_run):
    output, result, _ = tiny_run
    sweep = result["batch_sweep"]
    assert [r["batch"] for r in sweep["records"]] == [1, 2, 4] and "Batch sweep" in output
    for record in sweep["records"]:
        # Fixed steps and no EOS: every request generates gen-tokens, whatever the batch.
        assert record["generated_tokens"] == record["batch"] * GEN_TOKENS
        assert record["logits_canvases"] == record["batch"]  # a tiny model's logits always fit
        assert _close(record["tokens_per_second"], record["generated_tokens"] / record["seconds"])
    single = sweep["records"][0]["tokens_per_second"]
    assert all(_close(sweep["throughput_gain"][str(r["batch"])], r["tokens_per_second"] / single)
               for r in sweep["records"])


def test_mlx_vlm_built_on_our_arrays_computes_our_logits():
    pytest.importorskip("mlx_vlm")
    from mlx_diffgemma.bench.sidebyside import mlx_vlm_model

    model = build_diffusion_model(synthetic_args("tiny"), dtype=mx.float32, seed=3)
    theirs = mlx_vlm_model(model)
    prompt, canvas = mx.arange(5, 45)[None], mx.arange(100, 132)[None]
    cache = model.make_cache()
    model.encode(prompt, cache)
    their_cache = theirs.diffusion_prefill_cache(prompt, cache=theirs.make_cache(), attention_mask=None,
                                                 pixel_values=None, mm_token_type_ids=None, prefill_step_size=None,
                                                 chunk_prefill=False)
    their_logits = theirs.diffusion_decoder_logits(canvas, their_cache)
    assert mx.allclose(their_logits, model.denoise(canvas, cache), atol=1e-4)


def test_sidebyside_times_short_answers_on_both_paths(tmp_path):
    from mlx_diffgemma.bench.sidebyside import BASE, main

    out = tmp_path / "sidebyside.json"
    main(["--shape", "small", "--rounds", "1", "--short-answer", "4", "--short-answer-steps", "2", "--only", "answer",
          "--prompt-tokens", "8", "--json", str(out)])
    seconds = json.loads(out.read_text())["seconds"]
    answers = [f"answer of 4 tokens, {canvas} canvas, {path} (2 steps)" for path in ("fast", "exact")
               for canvas in ("full", "auto")]
    assert sorted(seconds) == sorted([BASE, *answers]) and all(len(v) == 1 and v[0] > 0 for v in seconds.values())


def test_reference_step_times_transformers_at_our_shape():
    from mlx_diffgemma.bench.reference_step import measure, reference_model

    model, args = reference_model("tiny", 2)
    text = model.config.text_config
    assert (text.hidden_size, text.num_experts, text.vocab_size, text.num_hidden_layers) == (
        args.hidden_size, args.num_experts, args.vocab_size, 2)
    result = measure("tiny", 2, rounds=1, prompt_tokens=8)
    assert set(result["seconds"]) == {"forward, no self-conditioning", "forward with self-conditioning",
                                      "commit (encode one block)"}
    assert all(len(v) == 1 and v[0] > 0 for v in result["seconds"].values())
