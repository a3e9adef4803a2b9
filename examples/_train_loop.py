"""The training loop both examples share: progress lines, the cross-rank loss and the final summary.

Kept beside the examples (not in the library) because it is example code: a user's own loop replaces it.
"""
import json
import os
import sys
import time

import torch


def init_ranks():
    """One process without a launcher; otherwise the launcher's ranks (gloo without CUDA)."""
    if "RANK" not in os.environ:
        from ds_offload.single_process import ensure_single_process_env
        ensure_single_process_env()
    import deepspeed
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend=None if cuda else "gloo", verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def train(engine, micro_loss, args, rank, world):
    """`micro_loss(step_index)` returns the loss of one micro-batch; the loop prints and returns the summary."""
    cuda = torch.cuda.is_available()
    if getattr(args, "deterministic", False):   # warn only where a kernel has no deterministic twin
        torch.use_deterministic_algorithms(True, warn_only=True)
    gas = engine.gradient_accumulation_steps()
    losses, times = [], []
    for step in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = torch.zeros((), device=engine.device)
        for micro in range(gas):
            loss = micro_loss(step * gas + micro)
            engine.backward(loss)
            engine.step()
            total += loss.detach().float() / gas
        torch.distributed.all_reduce(total)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(total.item() / world)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            mem = f", peak GPU {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB" if cuda else ""
            print(f"step {step + 1:>4}/{args.steps}  loss {losses[-1]:.5f}  {times[-1] * 1e3:8.1f} ms{mem}", flush=True)

    peaks, host = [None] * world, [None] * world
    torch.distributed.all_gather_object(peaks, torch.cuda.max_memory_allocated() if cuda else None)
    torch.distributed.all_gather_object(host, _host_peak_bytes())
    summary = _report(engine, args, losses, times, peaks, world, host) if rank == 0 else None
    shutdown(engine)
    return summary


def _host_peak_bytes():
    """This process's peak resident memory (VmHWM), None where /proc has no such line."""
    try:
        with open("/proc/self/status") as fh:
            line = next((l for l in fh if l.startswith("VmHWM:")), None)
        return int(line.split()[1]) * 1024 if line else None
    except OSError:
        return None


def shutdown(engine):
    """Every rank leaves together: stop the offload workers, then tear the process group down.

    Exiting with a live gloo group lets one rank's interpreter finish while its peer's transport
    threads still run, and that process aborts ("terminate called without an active exception").
    """
    engine.ds_offload.close()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _report(engine, args, losses, times, peaks, world, host=None):
    steady = times[1:] or times
    summary = {"final_loss": losses[-1], "losses": losses, "mean_step_s": sum(steady) / len(steady),
               "step_s": times, "peak_gpu_bytes_per_rank": peaks, "peak_host_bytes_per_rank": host,
               "world_size": world,
               "offload": engine.ds_offload.summary()}
    print("summary: final loss {:.5f}, {:.1f} ms/step (after the first), peak GPU per rank: {}".format(
        summary["final_loss"], summary["mean_step_s"] * 1e3,
        ", ".join("n/a: no GPU" if p is None else f"{p / 2**20:,.0f} MiB" for p in peaks)))
    print(summary["offload"])
    if args.losses_out:
        with open(args.losses_out, "w") as fh:
            json.dump(summary, fh, indent=2)
        print(f"losses written to {args.losses_out}")
    return summary


def run(main):
    """Run `main()`; a bad config is its list of problems and exit status 1, not a traceback on every rank."""
    from ds_offload import ConfigError
    try:
        main()
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(e, file=sys.stderr)
        sys.exit(1)
