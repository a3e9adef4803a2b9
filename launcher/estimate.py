"""`ds-offload estimate`: GPU and CPU memory per rank, without offload and with a config; advice; what fits."""
import json
import sys
import warnings

import click

from . import CONTEXT

_DEFAULT_MEASURED = "__doctor_default__"


def _row(label, mem):
    from .plan import fmt_bytes
    cells = [fmt_bytes(mem.params), fmt_bytes(mem.grads), fmt_bytes(mem.optimizer), fmt_bytes(mem.activations),
             fmt_bytes(mem.total)]
    return f"  {label:<26}" + "".join(f"{c:>13}" for c in cells)


def _header():
    return f"  {'':<26}" + "".join(f"{h:>13}" for h in ("params", "grads", "optimizer", "activations", "peak"))


def _count(n):
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _local_gpu_bytes():
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
    except Exception:
        pass
    return None


@click.command(context_settings=CONTEXT)
@click.option("--model", "model_text", default="tiny-gpt", show_default=True,
              help="tiny-gpt | small-gpt | reference-gpt | wide-gpt | PATH/config.json of a transformers model | "
                   "params=1.3B,layers=24,hidden=2048[,heads=..,vocab=..,ffn=..,kv_heads=..,gated=1].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="DeepSpeed config with a cpu_offloading block (default: none, i.e. no offload).")
@click.option("--micro-batch", type=click.IntRange(min=1), default=None,
              help="Micro-batch per GPU (default: the config's train_micro_batch_size_per_gpu, else 1).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None,
              help="Sequence length (default: the model's own, else 2048).")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel ranks (ZeRO partitions over them).")
@click.option("--precision", type=click.Choice(["auto", "autocast", "bf16", "fp16", "fp32"]), default="auto",
              show_default=True, help="auto reads the config: torch_autocast -> autocast, bf16/fp16 -> the model "
                                      "cast to it, else fp32.")
@click.option("--gpu-memory", default=None, metavar="SIZE",
              help="Answer 'what fits' for this GPU memory (e.g. 80GiB, 141GB); default: this machine's GPU.")
@click.option("--reserve", default="1GiB", show_default=True, metavar="SIZE",
              help="Memory kept free for the CUDA context and fragmentation in 'what fits'.")
@click.option("--pipeline-stages", type=click.IntRange(min=1), default=1, show_default=True,
              help="Pipeline-parallel stages you need (for the advice).")
@click.option("--measured", default=None, is_flag=False, flag_value=_DEFAULT_MEASURED, metavar="[PATH]",
              help="Predict the step-time cost from `ds-offload doctor`'s saved measurements (default file if "
                   "no PATH).")
@click.option("--loop", type=click.Choice(["deepspeed", "torch"]), default="deepspeed", show_default=True,
              help="deepspeed: ds_offload.initialize (DeepSpeed's wrappers own the fp32 masters); torch: a plain "
                   "loop with HybridDeviceOptimizer / ActivationOffloader (with bf16 parameters the optimizer owns "
                   "the masters, so offloading frees them too).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def estimate(model_text, config_path, micro_batch, seq_len, gpus, precision, gpu_memory, reserve, pipeline_stages,
             measured, loop, as_json):
    """Per-rank GPU and CPU memory (params, grads, optimizer state, activations) without offload and with
    the config, the quick-decision advice, what fits a given GPU, and (--measured) the step-time cost.

    Activations are counted tensor by tensor (what autograd saves per layer); not counted: CUDA context,
    allocator fragmentation, communication buckets.
    """
    from ds_offload.config import OffloadConfig, load_config
    from ds_offload.errors import ConfigError
    from ds_offload.memory import estimate as memory_estimate, parse_model

    from .plan import QUICK_DECISION, advice, fmt_bytes, parse_size, step_time_cost, what_fits

    try:
        spec = parse_model(model_text)
    except (ValueError, OSError) as e:
        raise click.BadParameter(str(e), param_hint="--model")
    config = OffloadConfig()
    if config_path:
        try:
            with warnings.catch_warnings():  # warnings are `validate`'s to print; the estimate needs no errors
                warnings.simplefilter("ignore")
                config = load_config(config_path, model_layers=spec.layers)
        except ConfigError as e:
            click.echo(f"{config_path}: {len(e.errors)} problem(s):", err=True)
            for p, m in e.errors:
                click.echo(f"  - {p}: {m}", err=True)
            sys.exit(1)
    mb = micro_batch or int(config.deepspeed.get("train_micro_batch_size_per_gpu") or 1)
    prec = None if precision == "auto" else precision
    est = memory_estimate(spec, config, micro_batch=mb, seq_len=seq_len, gpus=gpus, precision=prec, loop=loop)

    gpu_bytes = parse_size(gpu_memory) if gpu_memory else _local_gpu_bytes()
    fits = None
    if gpu_bytes:
        fits = what_fits(spec, config, gpu_bytes, mb, seq_len=est.seq_len, gpus=gpus, precision=est.precision,
                         reserve=parse_size(reserve), loop=loop)
    rows = advice(est, config, pipeline_stages=pipeline_stages, fits=fits)

    cost = None
    if measured:
        from .doctor import default_measurements_path
        path = default_measurements_path() if measured == _DEFAULT_MEASURED else measured
        try:
            with open(path) as fh:
                data = json.load(fh)
        except OSError:
            raise click.UsageError(f"no measurements at {path}: run `ds-offload doctor` on the training machine "
                                   "first (it saves them there), or pass --measured PATH.")
        cost = step_time_cost(est, data)

    if as_json:
        out = est.as_dict()
        out.update(what_fits=fits, advice=[{"situation": s, "recommendation": r} for _, s, r in rows],
                   step_time_cost=cost, gpu_memory_bytes=gpu_bytes)
        click.echo(json.dumps(out, indent=2, default=str))
        return

    m = spec
    click.echo(f"model {m.name}: {_count(m.params)} params ({m.params:,}), {m.layers} layers, hidden {m.hidden}, "
               f"{m.heads} heads, vocab {m.vocab}")
    click.echo(f"micro-batch {mb}, seq {est.seq_len}, {gpus} rank(s), ZeRO stage {est.zero_stage}, "
               f"precision {est.precision}")
    extra = (f" (offloadable {fmt_bytes(est.layer_activation_offloadable)}; the rest are autocast's bf16 weight "
             "copies)") if est.precision == "autocast" else ""
    click.echo(f"activations per layer: {fmt_bytes(est.layer_activation)}{extra}; head and loss: "
               f"{fmt_bytes(est.baseline_gpu.activations - est.layer_activation * spec.layers)}")
    click.echo("\nper rank" + (f", config {config_path}" if config_path else ", no config (no offload)") + ":")
    click.echo(_header())
    click.echo(_row("GPU, without offload", est.baseline_gpu))
    click.echo(_row("GPU, with the config", est.offload_gpu))
    click.echo(_row("CPU, with the config", est.offload_cpu))
    click.echo("  (gradients are freed between steps: the peak counts the larger of gradients and activations)")
    saved = est.baseline_gpu.total - est.offload_gpu.total
    click.echo(f"  GPU saved: {fmt_bytes(saved)} ({saved / est.baseline_gpu.total:.0%}); CPU added: "
               f"{fmt_bytes(est.offload_cpu.total)} per rank (pinned where the config pins)")
    for n in est.notes:
        click.echo(f"  note: {n}")

    if fits:
        click.echo(f"\nwhat fits in {fmt_bytes(gpu_bytes)} (keeping {reserve} free):")
        if fits["baseline_fits"]:
            click.echo("  it fits without offload: no offloading needed.")
    if fits and not fits["baseline_fits"]:
        f = fits["optimizer_fraction"]
        click.echo("  optimizer offload alone: " + (f"optimizer_offload_fraction >= {f:.2f}" if f is not None
                                                      else "does not fit even at 1.0"))
        k = fits["activation_layers"]
        w = fits.get("weight_layers")
        click.echo("  weight offload alone: " + (f"cpu_offloading_num_layers >= {w} with cpu_offloading_weights"
                                                 if w is not None else "not enough (or not ZeRO-1/2)"))
        click.echo("  activation offload alone: " + (f"cpu_offloading_num_layers >= {k}" if k is not None
                                                       else f"does not fit even at {max(spec.layers - 1, 0)} layers"))
        if fits["config_layers"]:
            f1 = fits["fraction_with_config_layers"]
            click.echo(f"  with the config's {fits['config_layers']} offloaded layer(s): " +
                       (f"optimizer_offload_fraction >= {f1:.2f}" if f1 is not None else "does not fit at any fraction"))
        f2 = fits["fraction_with_all_activation_layers"]
        click.echo(f"  both, {max(spec.layers - 1, 0)} layers' activations offloaded: " +
                   (f"optimizer_offload_fraction >= {f2:.2f}" if f2 is not None else "does not fit: reduce the "
                    "micro-batch, add ranks (ZeRO) or pipeline stages"))
    if not fits:
        click.echo("\n(no GPU here: pass --gpu-memory SIZE to see what fits)")

    click.echo("\nquick decision (from the Megatron Bridge guidance):")
    applied = {r[0] for r in rows}
    for key, situation, rec in QUICK_DECISION:
        mark = "->" if key in applied else "  "
        click.echo(f"  {mark} {situation}: {rec}")
    if not applied and not fits:
        click.echo("  (none flagged for this case; pass --gpu-memory to judge the memory pressure)")
    elif not applied:
        click.echo("  (none applies: no offload setting fits this GPU; reduce the micro-batch or sequence, add "
                   "data-parallel ranks (ZeRO-2/3 shard gradients and states), or use pipeline stages)")

    if cost is not None:
        click.echo("\nstep-time cost from measurements:")
        if not cost:
            click.echo("  nothing offloaded by this config: no added time.")
        def s(x):
            return "n/a" if x is None else f"{x * 1e3:.0f} ms"
        o = cost.get("optimizer")
        if o:
            click.echo(f"  optimizer: {o['offloaded_elements'] / 1e6:.1f} M elements on the CPU; CPU Adam {s(o['cpu_adam_s'])}, "
                       f"copies {s(o['transfer_s'])} -> about +{s(o['added_s'])} per step")
            if o["cpu_adam_s"] is None:
                click.echo("  (no CPU Adam measurement: run `ds-offload doctor` without --quick)")
        wc = cost.get("weights")
        if wc:
            click.echo(f"  weights: {wc['offloaded_params'] / 1e6:.1f} M parameters stepped on the CPU after backward"
                       + (f", CPU Adam {s(wc['cpu_adam_s'])} per step, not hidden" if wc["cpu_adam_s"] is not None
                          else " (no CPU Adam measurement: run `ds-offload doctor` without --quick)"))
        a = cost.get("activations")
        if a:
            if a.get("added_s_upper_bound") is None:
                click.echo(f"  activations: {fmt_bytes(a['bytes_per_step'])} each way per step; no GPU copy bandwidth "
                           "was measured (doctor ran without a GPU)")
            else:
                click.echo(f"  activations: {fmt_bytes(a['bytes_per_step'])} each way per step: at most "
                           f"+{a['added_s_upper_bound'] * 1e3:.0f} ms per step, less where a layer's compute outlasts "
                           f"its {a['per_layer_copy_s'] * 1e3:.1f} ms copy")
        click.echo("  (measured reference: Qwen3-30B-A3B ran ~1.9x slower at fraction 0.25 and ~4.2x at 1.0; "
                   "overlap_cpu_optimizer_d2h_h2d gained ~7%)")
