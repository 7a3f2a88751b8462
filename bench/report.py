"""What `mlxdg bench` prints and writes: rich tables, JSON, and an optional plot.

Everything here reads the result dictionary of ``run.analyse``; nothing is
measured or computed anew, so the tables, the JSON and the plot always agree.
"""

import json
from typing import List, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlx_diffgemma.bench.engines import ANSWER_BUCKETS
from mlx_diffgemma.bench.roofline import Roofline

GB = 1e9


def _num(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _median(stat: Optional[dict], digits: int = 1, scale: float = 1.0) -> str:
    return "-" if stat is None else _num(stat["median"] / scale, digits)


def _ranged(stat: Optional[dict], digits: int = 2) -> str:
    """Median with the range over trials."""
    if stat is None:
        return "-"
    if len(stat["values"]) == 1:
        return _num(stat["median"], digits)
    return escape(f"{_num(stat['median'], digits)} [{_num(stat['min'], digits)}-{_num(stat['max'], digits)}]")


def _table(title: str, columns) -> Table:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    return table


def _probe_line(m: dict) -> str:
    per_probe = lambda key, scale: " / ".join(f"{p[key] / scale:,.1f}" for p in m["probes"])
    quantized = ", ".join(f"{bits}-bit " + " / ".join(f"{p['quantized_flops'][bits] / 1e9:,.0f}" for p in m["probes"])
                          for bits in m["quantized_flops"])
    return (f"[bold]Machine[/bold] {m['device']}, {m['memory_bytes'] / 2**30:.0f} GiB, {m['cpu_count']} CPUs; "
            f"probed before / after the trials: bandwidth {per_probe('bandwidth', GB)} GB/s, matmul GFLOP/s dense "
            f"{m['activation_dtype']} {per_probe('dense_flops', 1e9)}, {quantized}; load average "
            f"{per_probe('load_average', 1)} (this run included: far above the CPU count, other work shared the "
            "machine); the roofline "
            f"uses the higher of each; power mode: {m['power_mode'] or 'n/a'}; "
            + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))


def _header(result: dict, console: Console) -> None:
    model, s = result["model"], result["settings"]
    console.print(_probe_line(result["machine"]), highlight=False)
    bits = model["bits_per_weight"]
    console.print(f"[bold]Model[/bold] {model['source']} ({model['layers']} layers), AR Gemma 4: "
                  f"{model['ar_source'] or 'not run (give --ar-model)'}; quantization {model['quantization']}; "
                  f"{bits['stored']:.2f} bits per weight stored, {bits['resident']:.2f} as run", highlight=False)
    if model["cpu_expert_path"]:
        console.print(f"[bold]CPU expert path[/bold] {model['cpu_expert_path']} "
                      f"(all models: {json.dumps(model['weight_paths'])})", highlight=False)
    if model["scaled"]:
        console.print(f"[bold]Scaled[/bold] {model['scaled']}", highlight=False)
    console.print(f"[bold]Run[/bold] prompt {s['prompt_tokens']} tokens, {s['gen_tokens']} generated, canvas "
                  f"{s['canvas_length']}, {s['trials']} trials interleaved after one warm-up per engine; "
                  "fixed-step rows: adaptive stop and end of sequence off; medians \\[min-max] over trials",
                  highlight=False)


def _speed_table(result: dict) -> Table:
    table = _table("Engines: medians over trials \\[min-max]",
                   ["engine", "tokens", "prefill tok/s", "decode tok/s", "first output s", "ms/step", "ms/commit",
                    "steps/block", "tokens/forward", "peak GB"])
    for e in result["engines"]:
        s = e["summary"]
        table.add_row(
            e["label"], _median(s["generated_tokens"], 0), _median(s["prefill_tokens_per_second"]),
            _ranged(s["decode_tokens_per_second"]),
            _median(s["first_output_seconds"], 2), _median(s["step_ms"]), _median(s["commit_ms"]),
            _median(s["steps_per_block"]), _median(s["tokens_per_forward"], 2),
            _median(s["peak_memory_bytes"], 2, GB))
    return table


def _efficiency_table(result: dict) -> Table:
    table = _table("Efficiency of one step (an AR token, a denoising step): modelled bytes and FLOPs over the "
                   "median time, against the probed peaks",
                   ["engine", "experts/layer/step", "GB/step", "GB/s", "% BW probe", "GFLOP/s", "% FLOP/s probe",
                    "% of roofline", "roofline decode tok/s"])
    for e in result["engines"]:
        step, experts = e["efficiency"]["step"], e["distinct_experts_per_layer_per_step"]
        table.add_row(
            e["label"], "-" if experts is None else f"{experts['mean']:.1f} of {experts['num_experts']}",
            _num(step["modelled_bytes"] / GB, 3), _num(step["bandwidth"] / GB, 2),
            _num(step["bandwidth_percent_of_probe"]), _num(step["flops_per_second"] / 1e9),
            _num(step["flops_percent_of_probe"]), _num(step["percent_of_roofline"]),
            _num(e["roofline_decode_tokens_per_second"]))
    return table


def _labels(result: dict) -> dict:
    return {e["name"]: e["label"] for e in result["engines"]}


# Ratios whose reading differs: for rates more is better, for times and memory less is.
RATIO_TABLES = (
    ("Diffusion / AR throughput, trial by trial: higher is better (>1: diffusion faster)",
     (("decode tok/s", "decode_tokens_per_second"), ("end-to-end tok/s", "end_to_end_tokens_per_second"))),
    ("Diffusion / AR time and memory, trial by trial: lower is better (<1: diffusion sooner or smaller)",
     (("first output time", "first_output_seconds"), ("peak memory", "peak_memory_bytes"))),
)


def _ratios_tables(result: dict) -> List[Table]:
    labels = _labels(result)
    tables = []
    for title, columns in RATIO_TABLES:
        table = _table(title, ["diffusion", "versus"] + [name for name, _ in columns])
        for r in result["ratios"]:
            table.add_row(labels[r["diffusion"]], labels[r["ar"]], *(_ranged(r[key]) for _, key in columns))
        tables.append(table)
    return tables


def _roofline_table(result: dict) -> Table:
    roof = result["roofline"]
    table = _table(f"Roofline: {roof['bandwidth'] / GB:,.1f} GB/s, {roof['flops_per_second'] / 1e9:,.0f} GFLOP/s "
                   f"({roof['flops_peak_source']}), {roof['bits_per_weight']:.2f} bits per weight, context "
                   f"{roof['context']}, {_num(roof['distinct_experts'])} distinct experts per step",
                   ["model", "AR tok/s bound", "step ms bound", "step bound by", "commit ms bound", "s*"])
    for name, key in (("as benchmarked", "this_run"), ("full model", "full_model")):
        r = roof[key]
        table.add_row(name, _num(r["ar_tokens_per_second"]), _num(r["step_ms"]), r["step_bound"],
                      _num(r["commit_ms"]), _num(r["crossover_steps"]))
    return table


def _crossover_line(result: dict) -> str:
    cross, labels = result["crossover_steps"], _labels(result)
    measured = "; ".join(f"versus {labels[name]} {_ranged(stat, 1)}" for name, stat in cross["measured"].items())
    return (f"[bold]Crossover s*[/bold] (diffusion decodes faster below s* steps per block): measured {measured}; "
            f"roofline {_num(cross['roofline'])} as benchmarked, {_num(cross['roofline_full_model'])} full model")


def _answers_table(result: dict) -> Table:
    table = _table("Short answers: seconds until an answer of n tokens is complete (prefill included)",
                   ["engine"] + [f"{low}-{high} tok" for low, high in ANSWER_BUCKETS])
    for e in result["engines"]:
        answers = e["summary"]["answer_seconds"]
        table.add_row(e["label"], *(_median(answers[str(high)], 2) for _, high in ANSWER_BUCKETS))
    return table


ANSWERS_NOTE = ("Each column is timed at its longest answer (5, 20, 64, 256 tokens) inside the EOS-free runs above: "
                "for AR the time of that token, for diffusion the time its block was committed, which is when a "
                "real answer of that length would end (a diffusion answer is complete only with its whole block). "
                "'-' means the run made fewer tokens.")


def _batch_table(result: dict) -> Table:
    sweep = result["batch_sweep"]
    table = _table(f"Batch sweep: canvases per forward pass ({sweep['steps_per_block']} steps per block, "
                   "EOS and early stop off)", ["canvases", "total tok/s", "gain vs 1", "latency per request s",
                                               "logits at once", "peak memory GB"])
    for record in sweep["records"]:
        gain = sweep["throughput_gain"][record["batch"]]
        table.add_row(str(record["batch"]), _num(record["tokens_per_second"]), f"{gain:.2f}x",
                      _num(record["request_latency_s"], 2), str(record["logits_canvases"]),
                      _num(record["peak_memory_gb"], 2))
    return table


def _vs_table(result: dict) -> Table:
    vs = result["vs"]
    medians = vs["median_seconds"]
    base = medians["ours: forward, no self-conditioning"]
    theirs = medians.get(f"{vs['engine']}: engine step")
    table = _table(f"Against {vs['engine']} on the same weights: seconds per pass, medians of {vs['rounds']} "
                   "interleaved rounds", ["", "median s", "x our bare forward", f"{vs['engine']} step / this"])
    for name, seconds in medians.items():
        speedup = f"{theirs / seconds:.2f}x" if theirs and "engine step" in name else ""
        table.add_row(name, _num(seconds, 3), f"{seconds / base:.2f}", speedup)
    return table


def print_report(result: dict, console: Console) -> None:
    _header(result, console)
    console.print(_speed_table(result))
    console.print(_efficiency_table(result))
    for table in _ratios_tables(result):
        console.print(table)
    console.print(_roofline_table(result))
    console.print(_crossover_line(result), highlight=False)
    console.print(_answers_table(result))
    console.print(ANSWERS_NOTE, style="dim", highlight=False)
    if "batch_sweep" in result:
        console.print(_batch_table(result))
    if "vs" in result:
        console.print(_vs_table(result))


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def _plot_batch_sweep(ax, sweep: dict) -> None:
    """Total tok/s and latency per request against canvases per forward pass."""
    records = sweep["records"]
    canvases = [r["batch"] for r in records]
    ax.plot(canvases, [r["tokens_per_second"] for r in records], "o-", label="total tok/s")
    ax.set(xlabel="canvases per forward pass", ylabel="total tokens/s", ylim=(0, None),
           title=f"Batch sweep ({sweep['steps_per_block']} steps per block)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(canvases, [str(c) for c in canvases])
    ax.minorticks_off()
    latency = ax.twinx()
    latency.plot(canvases, [r["request_latency_s"] for r in records], "s--", color="C1", label="latency per request")
    latency.set(ylabel="seconds per request", ylim=(0, None))
    lines = ax.get_lines() + latency.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize="small", loc="upper center",
              bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)


def write_plot(result: dict, path: str) -> str:
    """Decode tok/s against steps per block, with the AR rates and the roofline;
    returns the line to print (also when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "--plot skipped: matplotlib is not installed (pip install matplotlib)"
    canvas = result["settings"]["canvas_length"]
    roof = Roofline(**result["roofline"]["this_run"])
    diffusion = [e for e in result["engines"] if e["kind"] == "diffusion"]
    fixed = [e for e in diffusion if e["steps"] is not None]
    measured = result["crossover_steps"]["measured"]
    # Wide enough to show where the curves cross.
    top = max([e["summary"]["steps_per_block"]["median"] for e in diffusion] + [roof.crossover_steps, 2]
              + [stat["median"] for stat in measured.values() if stat])

    sweep = result.get("batch_sweep")
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(13 if sweep else 8, 6.5), squeeze=False)
    ax = axes[0][0]
    tps = [e["summary"]["decode_tokens_per_second"] for e in fixed]
    ax.errorbar([e["steps"] for e in fixed], [t["median"] for t in tps],
                yerr=[[t["median"] - t["min"] for t in tps], [t["max"] - t["median"] for t in tps]],
                fmt="o-", label="diffusion, fixed steps (measured)")
    for e in diffusion:
        if e["steps"] is None:
            ax.plot(e["summary"]["steps_per_block"]["median"], e["summary"]["decode_tokens_per_second"]["median"],
                    "s", label="diffusion, adaptive stop (measured)")
    steps = [1 + i * (top - 1) / 99 for i in range(100)]
    ax.plot(steps, [roof.diffusion_tokens_per_second(s, canvas) for s in steps], "--", label="diffusion roofline")
    ax.axhline(roof.ar_tokens_per_second, linestyle=":", color="gray", label="AR roofline (same weights)")
    ax.axvline(roof.crossover_steps, linestyle=":", color="gray")
    for color, e in enumerate((e for e in result["engines"] if e["kind"] == "ar"), start=3):
        ax.axhline(e["summary"]["decode_tokens_per_second"]["median"], color=f"C{color}",
                   label=f"{e['label']} (measured; s* dotted)")
        ax.axvline(measured[e["name"]]["median"], linestyle=":", color=f"C{color}")
    ax.set(xlabel="denoising steps per block", ylabel="decode tokens/s", yscale="log",
           title=f"{result['model']['source']} on {result['machine']['device']}")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    # Minor ticks get labels only where the axis spans little more than a decade, and then only a
    # few of them (2, 3, 5): every minor tick labelled piles the labels onto each other.
    ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))
    # Below the axes, so that it never hides a curve.
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if sweep:
        _plot_batch_sweep(axes[0][1], sweep)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"plot written to {path}"
