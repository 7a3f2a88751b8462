"""`mlxdg bench`: block diffusion against autoregression on this machine, next to the roofline.

Three engines share one process and one prompt per trial, interleaved
(A B C A B C ...) so that thermal drift hits them alike, after one warm-up
each: our diffusion engine (a fixed-step sweep with the adaptive stop off, and
a natural run with the checkpoint's sampler), our encoder decoding one token
at a time (same weights: only the decoding strategy differs), and mlx-lm's
Gemma 4. The report puts each engine's figures next to what the measured
bandwidth and matmul throughput of this device allow (``roofline``).
"""

import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from mlx_diffgemma.bench.batching import batch_sweep, throughput_gains
from mlx_diffgemma.bench.engines import ExpertCounter, EncoderLM, run_autoregressive, run_diffusion
from mlx_diffgemma.bench.models import (QUANT, Models, Subject, add_ar_checkpoint, checkpoint_models,
                                        synthetic_models)
from mlx_diffgemma.bench.probe import MachineProbe, probe
from mlx_diffgemma.bench.roofline import (ar_token, commit, crossover_steps, denoise_step, expected_distinct_experts,
                                          roofline)
from mlx_diffgemma.bench.synthetic import SHAPES
from mlx_diffgemma.cpu import DEQUANTIZED, NATIVE, UPCAST
from mlx_diffgemma.loader import CheckpointError

SCHEMA = "mlxdg-bench/1"
AR_WARMUP_TOKENS = 16
# The probe's quantized matmuls use this group size; a hidden size it does not divide cannot run them.
PROBE_GROUP_SIZE = 64
PROBE_BITS = (4, 8)
# Weights that run as plain float matmuls, whose peak is the probe's dense throughput.
FLOAT_PATHS = (DEQUANTIZED, UPCAST, NATIVE)


class BenchError(ValueError):
    """A request `mlxdg bench` cannot run, said in one line."""


@dataclass(frozen=True)
class Options:
    model: Optional[str] = None
    ar_model: Optional[str] = None
    synthetic: Optional[str] = None
    layers: Optional[int] = None
    steps: Optional[Sequence[int]] = None  # None: the defaults below
    prompt_tokens: Optional[int] = None
    gen_tokens: Optional[int] = None
    quant: Optional[str] = None
    trials: Optional[int] = None
    seed: int = 0
    cpu_dequantize: str = "auto"
    batches: Sequence[int] = ()  # canvases per forward pass to sweep; empty: no batch sweep
    vs: Optional[str] = None  # "mlx-vlm": also time its engine step on the same weights


# What a run measures unless told otherwise. `--synthetic tiny` is a smoke run: its defaults take seconds.
DEFAULTS = {"steps": (4, 8, 16, 32, 48), "prompt_tokens": 512, "gen_tokens": 512, "trials": 5}
SMOKE_DEFAULTS = {"steps": (4, 8), "prompt_tokens": 32, "gen_tokens": 64, "trials": 2}


def with_defaults(opts: Options) -> Options:
    defaults = SMOKE_DEFAULTS if opts.synthetic == "tiny" else DEFAULTS
    return replace(opts, **{k: v for k, v in defaults.items() if getattr(opts, k) is None})


def parse_batches(text: str) -> List[int]:
    try:
        batches = sorted({int(s) for s in text.split(",") if s.strip()} | {1})
    except ValueError:
        raise BenchError(f"--batch takes comma-separated batch sizes, such as 1,2,4,8; not {text!r}") from None
    if batches[0] < 1:
        raise BenchError("--batch sizes must be 1 or more")
    return batches


def parse_steps(text: str) -> List[int]:
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise BenchError(f"--steps takes comma-separated step counts, such as 4,8,16; not {text!r}") from None
    if not steps or steps[0] < 1:
        raise BenchError("--steps needs at least one step count, each 1 or more")
    return steps


def check(opts: Options) -> None:
    if (opts.model is None) == (opts.synthetic is None):
        raise BenchError("give either --model (a DiffusionGemma checkpoint) or --synthetic SHAPE "
                         f"({', '.join(SHAPES)})")
    if opts.synthetic is not None and opts.synthetic not in SHAPES:
        raise BenchError(f"--synthetic takes one of {', '.join(SHAPES)}, not {opts.synthetic!r}")
    if opts.model is not None and (opts.layers is not None or opts.quant is not None):
        raise BenchError("--layers and --quant shape a --synthetic model; a checkpoint keeps its own")
    if opts.quant is not None and opts.quant not in QUANT:
        raise BenchError(f"--quant takes one of {', '.join(QUANT)}, not {opts.quant!r}")
    if opts.layers is not None and opts.layers < 1:
        raise BenchError("--layers must be 1 or more")
    if opts.vs is not None:
        if opts.vs != "mlx-vlm":
            raise BenchError(f"--vs takes mlx-vlm, not {opts.vs!r}")
        if importlib.util.find_spec("mlx_vlm") is None:
            raise BenchError("--vs mlx-vlm needs mlx-vlm installed (pip install mlx-vlm)")
    if opts.prompt_tokens < 2 or opts.gen_tokens < 2 or opts.trials < 1:
        raise BenchError("--prompt-tokens and --gen-tokens must be 2 or more, --trials 1 or more")


def build_models(opts: Options) -> Models:
    if opts.synthetic:
        models = synthetic_models(opts.synthetic, opts.layers, opts.quant or "mixed", opts.seed, opts.cpu_dequantize,
                                  with_gemma4=opts.ar_model is None)
    else:
        models = checkpoint_models(opts.model, opts.cpu_dequantize)
    if opts.ar_model:
        add_ar_checkpoint(models, opts.ar_model, opts.cpu_dequantize)
    return models


# ---------------------------------------------------------------- engines

@dataclass
class Engine:
    name: str
    label: str
    kind: str  # "diffusion" or "ar"
    family: str  # engines of one family share a model and a warm-up
    steps: Optional[int]  # fixed steps per block; None: the sampler's adaptive stop
    run: Callable  # (prompt, seed, gen_tokens, counter) -> record
    subject: Subject


def _fixed_steps(steps: int) -> dict:
    # A stability window longer than the block never fills, so no block stops early;
    # no end-of-sequence id, so every run makes all its tokens.
    return {"max_denoising_steps": steps, "stability_threshold": steps + 1, "eos_token_id": ()}


def _diffusion_run(model, tokenizer, options: dict):
    return lambda prompt, seed, gen_tokens, counter: run_diffusion(
        model, tokenizer, prompt, dict(options, max_new_tokens=gen_tokens), seed, counter)


def _ar_run(lm):
    return lambda prompt, seed, gen_tokens, counter: run_autoregressive(lm, prompt, gen_tokens, counter)


def make_engines(models: Models, steps: Sequence[int]) -> List[Engine]:
    d = models.diffusion
    engines = [Engine(f"diffusion-s{s}", f"diffusion, {s} steps", "diffusion", "diffusion", s,
                      _diffusion_run(d.model, models.tokenizer, _fixed_steps(s)), d) for s in steps]
    engines.append(Engine("diffusion-natural", "diffusion, adaptive stop", "diffusion", "diffusion", None,
                          _diffusion_run(d.model, models.tokenizer, {}), d))
    engines.append(Engine("ar-same-weights", "AR, same weights", "ar", "ar-same-weights", None,
                          _ar_run(EncoderLM(d.model)), d))
    if models.ar is not None:
        engines.append(Engine("ar-gemma4", "AR Gemma 4 (mlx-lm)", "ar", "ar-gemma4", None,
                              _ar_run(models.ar.model), models.ar))
    return engines


# ---------------------------------------------------------------- measuring

def _prompt(vocab: int, length: int, seed: int, run: int) -> List[int]:
    """Random token ids, as mlx_lm.benchmark prompts; ``run`` 0 is the warm-up's, trial t's is t + 1."""
    return np.random.default_rng([seed, run]).integers(0, vocab, length).tolist()


def warm_up(engines: List[Engine], args, prompt_tokens: int, seed: int) -> dict:
    """One untimed run per family, which also counts the distinct experts each
    router picks per forward pass: {family: [count per layer per step]}."""
    prompt = _prompt(args.vocab_size, prompt_tokens, seed, 0)
    counts = {}
    for engine in engines:
        if engine.family in counts:
            continue
        counter = ExpertCounter()
        tokens = args.canvas_length if engine.kind == "diffusion" else AR_WARMUP_TOKENS
        engine.run(prompt, seed, tokens, counter)
        counts[engine.family] = counter.counts
        mx.clear_cache()
    return counts


def run_trials(engines: List[Engine], args, opts: Options, progress: Callable[[str], None],
               measured: Callable[[List[dict]], None] = lambda records: None) -> List[dict]:
    """Every engine on every trial's prompt; ``measured(records)`` after each run."""
    records = []
    for trial in range(opts.trials):
        prompt = _prompt(args.vocab_size, opts.prompt_tokens, opts.seed, trial + 1)
        for engine in engines:
            record = engine.run(prompt, opts.seed + trial, opts.gen_tokens, None)
            records.append({"engine": engine.name, "trial": trial, **record})
            measured(records)
            mx.clear_cache()
            progress(f"trial {trial + 1}/{opts.trials}  {engine.label:<26} "
                     f"decode {record['decode_tokens_per_second']:9.2f} tok/s  "
                     f"first output {record['first_output_seconds']:7.2f} s")
    return records


# ---------------------------------------------------------------- analysis

def spread(values: Sequence[Optional[float]]) -> Optional[dict]:
    """Median, min and max over trials, with the values themselves."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


SUMMARY_FIELDS = ("prefill_tokens_per_second", "decode_tokens_per_second", "end_to_end_tokens_per_second",
                  "first_output_seconds", "total_seconds", "step_ms", "commit_ms", "steps_per_block",
                  "tokens_per_forward", "generated_tokens", "peak_memory_bytes")


def summarize(records: List[dict]) -> dict:
    summary = {field: spread([r.get(field) for r in records]) for field in SUMMARY_FIELDS}
    summary["answer_seconds"] = {n: spread([r["answer_seconds"][n] for r in records])
                                 for n in records[0]["answer_seconds"]}
    return summary


def peak_flops(machine: MachineProbe, subject: Subject) -> tuple:
    """The matmul peak the experts (most of the FLOPs) can reach on the path they run."""
    if (subject.weight_paths["experts"] in FLOAT_PATHS or subject.expert_bits is None
            or subject.expert_bits not in machine.quantized_flops):  # not probed: see probe_now
        return machine.dense_flops, f"dense {machine.activation_dtype}"
    return machine.quantized_flops.get(subject.expert_bits, machine.dense_flops), f"{subject.expert_bits}-bit"


def _efficiency(costs, seconds: float, machine: MachineProbe, flops_peak: float) -> dict:
    bound = costs.seconds(machine.bandwidth, flops_peak)
    return {
        "modelled_bytes": costs.bytes,
        "modelled_flops": costs.flops,
        "bandwidth": costs.bytes / seconds,
        "bandwidth_percent_of_probe": 100 * costs.bytes / seconds / machine.bandwidth,
        "flops_per_second": costs.flops / seconds,
        "flops_percent_of_probe": 100 * costs.flops / seconds / flops_peak,
        "roofline_seconds": bound,
        "percent_of_roofline": 100 * bound / seconds,
    }


def engine_efficiency(engine: Engine, summary: dict, args, context: int, distinct: float,
                      machine: MachineProbe) -> dict:
    """Achieved bandwidth and FLOP/s of one step (an AR token or a denoising
    step), from the modelled bytes and FLOPs over the measured median time."""
    flops_peak, _ = peak_flops(machine, engine.subject)
    bits = engine.subject.resident_bits
    step_s = summary["step_ms"]["median"] / 1e3
    if engine.kind == "ar":
        return {"step": _efficiency(ar_token(args, bits, context), step_s, machine, flops_peak)}
    return {
        "step": _efficiency(denoise_step(args, bits, context, distinct), step_s, machine, flops_peak),
        "commit": _efficiency(commit(args, bits, context), summary["commit_ms"]["median"] / 1e3, machine,
                              flops_peak),
    }


def _distinct(counts: List[int], num_experts: int, top_k: int, rows: int) -> Optional[dict]:
    if not counts:
        return None
    return {"mean": statistics.fmean(counts), "min": min(counts), "max": max(counts), "samples": len(counts),
            "num_experts": num_experts,
            "uniform_routing_expectation": expected_distinct_experts(num_experts, top_k, rows)}


def _by_trial(records: List[dict], name: str) -> dict:
    return {r["trial"]: r for r in records if r["engine"] == name}


def ratios(engines: List[Engine], records: List[dict]) -> List[dict]:
    """Diffusion over AR for each pair of engines, trial by trial (each
    diffusion run against the AR runs of the same trial and prompt)."""
    out = []
    for d in (e for e in engines if e.kind == "diffusion"):
        for a in (e for e in engines if e.kind == "ar"):
            pairs = [(dr, _by_trial(records, a.name)[t]) for t, dr in sorted(_by_trial(records, d.name).items())]
            ratio = lambda get: spread([get(x) / get(y) for x, y in pairs if get(x) is not None and get(y)])
            out.append({
                "diffusion": d.name, "ar": a.name,
                "decode_tokens_per_second": ratio(lambda r: r["decode_tokens_per_second"]),
                "end_to_end_tokens_per_second": ratio(lambda r: r["end_to_end_tokens_per_second"]),
                "first_output_seconds": ratio(lambda r: r["first_output_seconds"]),
                "peak_memory_bytes": ratio(lambda r: r["peak_memory_bytes"]),
                "answer_seconds": {n: ratio(lambda r, n=n: r["answer_seconds"][n])
                                   for n in pairs[0][0]["answer_seconds"]},
            })
    return out


def _pooled_seconds(runs: List[dict], ms: str, count: str) -> float:
    """The mean over every step (or commit) of ``runs``, in seconds."""
    return sum(r[ms] * r[count] for r in runs) / sum(r[count] for r in runs) / 1e3


def measured_crossover(engines: List[Engine], records: List[dict], canvas: int) -> dict:
    """s* per trial, (canvas / AR tok/s - t_commit) / t_step, with t_step and
    t_commit pooled over that trial's fixed-step diffusion runs."""
    fixed = [e.name for e in engines if e.kind == "diffusion" and e.steps is not None]
    out = {}
    for a in (e for e in engines if e.kind == "ar"):
        values = []
        for trial, ar in sorted(_by_trial(records, a.name).items()):
            runs = [r for r in records if r["trial"] == trial and r["engine"] in fixed]
            values.append(crossover_steps(ar["decode_tokens_per_second"], _pooled_seconds(runs, "step_ms", "forwards"),
                                          _pooled_seconds(runs, "commit_ms", "commits_timed"), canvas))
        out[a.name] = spread(values)
    return out


def _power_mode() -> Optional[str]:
    """macOS power settings that change speed severalfold (Low Power mode), as pmset reports them."""
    if platform.system() != "Darwin":
        return None
    try:
        text = subprocess.run(["pmset", "-g"], capture_output=True, text=True, timeout=5).stdout
    except OSError:
        return None
    found = [line.strip() for line in text.splitlines() if "powermode" in line.lower()]
    return "; ".join(found) or "not reported"


@dataclass(frozen=True)
class Probed:
    """One machine probe and how busy the machine was while it ran."""

    machine: MachineProbe
    load_average: float  # over the minute before it, this process included


def probe_bits(args) -> tuple:
    """The quantized matmuls the probe can run at this model's hidden size."""
    return PROBE_BITS if args.hidden_size % PROBE_GROUP_SIZE == 0 else ()


def probe_now(args) -> Probed:
    load = os.getloadavg()[0]
    return Probed(probe(hidden=args.hidden_size, rows=args.canvas_length, quantized_bits=probe_bits(args)), load)


def best_of(probes: Sequence[Probed]) -> MachineProbe:
    """The highest bandwidth and throughputs seen: the roofline is a bound, and
    what other work takes from a probe only lowers it."""
    machines = [p.machine for p in probes]
    return replace(machines[0], bandwidth=max(m.bandwidth for m in machines),
                   dense_flops=max(m.dense_flops for m in machines),
                   quantized_flops={bits: max(m.quantized_flops[bits] for m in machines)
                                    for bits in machines[0].quantized_flops})


def analyse(engines: List[Engine], records: List[dict], distinct_counts: dict, models: Models,
            probes: Sequence[Probed], opts: Options) -> dict:
    args, full_args = models.args, models.full_args
    machine = best_of(probes)
    context = opts.prompt_tokens + opts.gen_tokens // 2
    d = models.diffusion
    distinct = {family: _distinct(counts, args.num_experts, args.top_k_experts,
                                  args.canvas_length if family == "diffusion" else 1)
                for family, counts in distinct_counts.items()}
    mean_distinct = distinct["diffusion"]["mean"] if distinct.get("diffusion") else None
    flops_peak, flops_source = peak_flops(machine, d)
    bound = partial(roofline, bits_per_weight=d.resident_bits, kv_tokens=context, bandwidth=machine.bandwidth,
                    flops_per_second=flops_peak, distinct_experts=mean_distinct)
    this_run = bound(args)

    engine_reports = []
    for engine in engines:
        runs = [r for r in records if r["engine"] == engine.name]
        summary = summarize(runs)
        efficiency = engine_efficiency(engine, summary, args, context, mean_distinct, machine)
        if engine.kind == "ar":
            roof_tps = 1 / efficiency["step"]["roofline_seconds"]
        else:
            block_s = (summary["steps_per_block"]["median"] * efficiency["step"]["roofline_seconds"]
                       + efficiency["commit"]["roofline_seconds"])
            roof_tps = args.canvas_length / block_s
        engine_reports.append({
            "name": engine.name, "label": engine.label, "kind": engine.kind, "steps": engine.steps,
            "summary": summary,
            "distinct_experts_per_layer_per_step": distinct.get(engine.family),
            "efficiency": efficiency,
            # What the roofline allows this engine at its steps per block.
            "roofline_decode_tokens_per_second": roof_tps,
        })

    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": {**machine.to_dict(), "platform": platform.platform(), "power_mode": _power_mode(),
                    "cpu_count": os.cpu_count(),
                    "probes": [{"bandwidth": p.machine.bandwidth, "dense_flops": p.machine.dense_flops,
                                "quantized_flops": p.machine.quantized_flops, "load_average": p.load_average}
                               for p in probes]},
        "model": {
            **models.description,
            "layers": args.num_hidden_layers,
            "full_layers": full_args.num_hidden_layers,
            "args": asdict(args),
            "bits_per_weight": {"stored": d.stored_bits, "resident": d.resident_bits},
            "weight_paths": {"diffusion": d.weight_paths, "ar-gemma4": models.ar and models.ar.weight_paths},
            "cpu_expert_path": d.weight_paths["experts"] if mx.default_device() == mx.cpu else None,
        },
        "settings": {**asdict(replace(opts, steps=list(opts.steps))), "context_for_roofline": context,
                     "canvas_length": args.canvas_length},
        "roofline": {
            "bits_per_weight": d.resident_bits, "context": context, "bandwidth": machine.bandwidth,
            "flops_per_second": flops_peak, "flops_peak_source": flops_source,
            "distinct_experts": mean_distinct,
            "this_run": this_run.to_dict(),
            "full_model": bound(full_args).to_dict(),
        },
        "engines": engine_reports,
        "ratios": ratios(engines, records),
        "crossover_steps": {"measured": measured_crossover(engines, records, args.canvas_length),
                            "roofline": this_run.crossover_steps,
                            "roofline_full_model": bound(full_args).crossover_steps},
        "records": records,
    }


def run(opts: Options, progress: Callable[[str], None],
        measured: Callable[[List[dict]], None] = lambda records: None) -> dict:
    """The whole benchmark; ``measured(records)`` after each timed run."""
    opts = with_defaults(opts)
    check(opts)
    progress("building models" if opts.synthetic else "loading models")
    models = build_models(opts)
    if not probe_bits(models.args):
        progress(f"skipping the quantized matmul probes: hidden size {models.args.hidden_size} is not a multiple "
                 f"of their group size {PROBE_GROUP_SIZE}; quantized experts are held to the dense peak")
    progress("probing the machine")
    # Probed before and after the trials: a shared machine's bandwidth drifts, and the report shows by how much.
    before = probe_now(models.args)
    engines = make_engines(models, opts.steps)
    progress("warming up (one untimed run per engine, counting experts)")
    distinct_counts = warm_up(engines, models.args, opts.prompt_tokens, opts.seed)
    records = run_trials(engines, models.args, opts, progress, measured)
    progress("probing the machine again")
    result = analyse(engines, records, distinct_counts, models, [before, probe_now(models.args)], opts)
    if opts.batches:
        progress(f"batch sweep: {', '.join(map(str, opts.batches))} canvases at {min(opts.steps)} steps per block")
        sweep = batch_sweep(models.diffusion.model, models.tokenizer, opts.batches, opts.prompt_tokens,
                            opts.gen_tokens, min(opts.steps), opts.seed)
        result["batch_sweep"] = {"steps_per_block": min(opts.steps), "records": [r.to_dict() for r in sweep],
                                 "throughput_gain": throughput_gains(sweep)}
    if opts.vs:
        from mlx_diffgemma.bench import sidebyside

        progress(f"our engine step against {opts.vs}'s on the same weights, {opts.trials} interleaved rounds")
        result["vs"] = {"engine": opts.vs, **sidebyside.compare(models.diffusion.model, opts.trials,
                                                                 opts.prompt_tokens, opts.seed, progress)}
    return result


def check_outputs(json_path: Optional[str], plot_path: Optional[str]) -> None:
    """Refuse, before the first trial, an output that could not be written at
    the end: a missing or unwritable folder, a directory, a plot without
    matplotlib or in a format it does not write."""
    for flag, path in (("--json", json_path), ("--plot", plot_path)):
        if path is None:
            continue
        target = Path(path).expanduser()
        if target.is_dir():
            raise BenchError(f"{flag} {path} is a directory; give a file name")
        if not target.parent.is_dir():
            raise BenchError(f"{flag} {path}: no folder {target.parent}; create it or choose another path")
        existed = target.exists()
        try:
            with open(target, "a"):
                pass
        except OSError as e:
            raise BenchError(f"{flag} {path} cannot be written ({e.strerror}); choose another path") from None
        if not existed:
            target.unlink()
    if plot_path is not None:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise BenchError("--plot needs matplotlib, which is not installed: pip install matplotlib, "
                             "or drop --plot") from None

        formats = Figure().canvas.get_supported_filetypes()
        if Path(plot_path).suffix.lstrip(".").lower() not in formats:
            raise BenchError(f"--plot {plot_path}: matplotlib writes {', '.join('.' + f for f in sorted(formats))}; "
                             "give one of those suffixes")


def _write_json_atomically(document: dict, path: str) -> None:
    """Write ``path`` whole or not at all (a kill mid-write leaves the last complete one)."""
    target = Path(path).expanduser()
    partial_file = target.with_name(f".{target.name}.partial")
    partial_file.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(partial_file, target)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is."""


def _terminate(signum, frame):
    raise Terminated


def main(opts: Options, json_path: Optional[str] = None, plot_path: Optional[str] = None) -> int:
    from rich.console import Console

    from mlx_diffgemma.bench import report as render

    # Wide enough for the tables when the output goes to a file or a pipe.
    console, errors = Console(width=None if sys.stdout.isatty() else 160), Console(stderr=True, soft_wrap=True)
    opts = with_defaults(opts)
    kept = []

    def measured(records: List[dict]) -> None:
        # What was measured so far, kept on disk, so that an interrupted run loses nothing it timed.
        kept[:] = records
        if json_path:
            _write_json_atomically({"schema": SCHEMA, "complete": False, "command": " ".join(sys.argv),
                                    "settings": asdict(replace(opts, steps=list(opts.steps))),
                                    "records": records}, json_path)

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        check(opts)
        check_outputs(json_path, plot_path)
        result = run(opts, lambda line: errors.print(f"[dim]{line}[/dim]", highlight=False), measured)
    except BenchError as e:
        errors.print(f"mlxdg: {e}", highlight=False, markup=False)
        return 2
    except CheckpointError as e:  # --model or --ar-model
        errors.print(f"mlxdg: {e}", highlight=False, markup=False)
        return 1
    except KeyboardInterrupt as e:
        where = f"; they are in {json_path} (\"complete\": false)" if json_path and kept else ""
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        errors.print(f"mlxdg: {stopped} after {len(kept)} timed run{'s' * (len(kept) != 1)}{where}",
                     highlight=False, markup=False)
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    render.print_report(result, console)
    if json_path:
        _write_json_atomically(result, json_path)
        console.print(f"JSON written to {json_path}")
    if plot_path:
        console.print(render.write_plot(result, plot_path))
    return 0
