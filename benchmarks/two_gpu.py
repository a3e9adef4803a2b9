"""The two-GPU run: every offload mode through `ds-offload launch --num_gpus 2`, against `--num_gpus 1` at the
same global batch and against plain DeepSpeed on 2 GPUs, per-rank memory against `ds-offload estimate --gpus 2`,
and each rank's CPU Adam throughput with and without core binding.

    python benchmarks/two_gpu.py --out DIR                      # a host with 2 GPUs (NCCL; NVLS stays off)
    python benchmarks/two_gpu.py --out DIR --only 'gpt/z2/*'    # globs over example/zN/mode/gpus (e.g. gpt/z2/w8/2)
    python benchmarks/two_gpu.py --cpu --out DIR                # the same matrix on CPU ranks (gloo), tiny models
    python benchmarks/two_gpu.py --report-only --out DIR        # TWO_GPU.md from DIR/two_gpu.json
    python benchmarks/two_gpu.py --list [--cpu]

Why launches and not one process: data parallelism is the launcher's job, and the launcher is what users run.
Each launch trains `examples/train_gpt.py` (reference GPT) or `examples/train_hf.py` (the 852M transformers
Llama of the benchmark) for --steps steps with deterministic kernels, each rank taking its slice of one global
batch; the 1-GPU run takes the whole global batch as its micro-batch. Records go to DIR/two_gpu.json as each
launch ends; a launch over the budget is recorded as skipped.
"""
import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]

import engine_cases as E  # noqa: E402
import harness as H  # noqa: E402

GLOBAL = {"gpt": 8, "hf": 4}                 # global batch (sequences per step) of each example
MODES = ("plain", "act4", "opt50", "opt100", "w8", "combined")
PARITY = 1e-3


def blocks(cpu):
    n_w, n_a = (2, 2) if cpu else (8, 4)
    return {"plain": None, "act4": E.act_block(n_a), "opt50": E.opt_block(0.5), "opt100": E.opt_block(1.0),
            "w8": E.weights_block(n_w), "combined": E.combined_block(n_a)}


def runs(cpu):
    """Every launch of the matrix: (example, stage, mode, gpus, bind)."""
    out = []
    for ex in ("gpt", "hf"):
        for stage in (1, 2):
            for mode in MODES:
                for gpus in (2, 1):
                    out.append((ex, stage, mode, gpus, False))
            out.append((ex, stage, "plain_again", 2, False))       # the noise floor of two plain 2-GPU runs
            for mode in ("opt50", "opt100"):
                out.append((ex, stage, mode, 2, True))             # --bind_cores_to_rank
    return out


def key(r):
    ex, stage, mode, gpus, bind = r
    return f"{ex}/z{stage}/{mode}{'_bind' if bind else ''}/{gpus}"


def llama_config(path):
    cfg = dict(H.shapes()["llama"]["hf"], model_type="llama", max_position_embeddings=2048, tie_word_embeddings=False)
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    return path


def ds_config(ex, stage, mode, gpus, cpu):
    block = blocks(cpu)["plain" if mode == "plain_again" else mode]
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL[ex] // gpus, "gradient_accumulation_steps": 1,
           "gradient_clipping": 1.0, "bf16": {"enabled": True}, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": H.LR, "weight_decay": H.WD, "betas": list(H.BETAS),
                                                     "eps": H.EPS}}, "steps_per_print": 10**9}
    if block:
        cfg["cpu_offloading"] = block
    return cfg


def estimate_gib(ex, cfg, gpus, hf_config):
    """ds-offload estimate's GPU figure per rank for this launch (the memory model, not a measurement)."""
    import warnings
    from ds_offload.config import load_config
    from ds_offload.memory import estimate, spec_from_gpt, spec_from_hf_config
    from ds_offload.models import GPT_SHAPES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = spec_from_hf_config(hf_config) if ex == "hf" else spec_from_gpt(GPT_SHAPES["reference-gpt"])
        e = estimate(spec, load_config(cfg), micro_batch=cfg["train_micro_batch_size_per_gpu"], seq_len=2048,
                     gpus=gpus, loop="deepspeed")
    return round(e.offload_gpu.total / 2**30, 3)


def launch(r, args, work, port):
    ex, stage, mode, gpus, bind = r
    cfg = ds_config(ex, stage, mode, gpus, args.cpu)
    cfg_path = os.path.join(work, f"{key(r).replace('/', '_')}.json")
    out = cfg_path[:-5] + ".losses.json"
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    script = os.path.join(REPO, "examples", "train_gpt.py" if ex == "gpt" else "train_hf.py")
    model = (["--model", "tiny" if args.cpu else "reference"] if ex == "gpt" else
             [] if args.cpu else ["--model-config", args.hf_config, "--seq-len", "2048"])
    cmd = ([sys.executable, "-m", "ds_offload_cli.cli", "launch", "--num_gpus", str(gpus), "--master_port", str(port)]
           + (["--bind_cores_to_rank"] if bind else []) + [script, "--deepspeed_config", cfg_path, "--steps",
                                                           str(args.steps), "--losses-out", out, "--deterministic"]
           + model)
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    rec = dict(key=key(r), example=ex, stage=stage, mode=mode, gpus=gpus, bind=bind, cmd=" ".join(cmd[2:]))
    try:
        for attempt in (1, 2):  # a launch that died without its results is tried once more, and says so
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=REPO)
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            if os.path.exists(out):
                break
            failed = dict(error=f"exit {p.returncode}", log_tail=(p.stdout + p.stderr)[-2500:])
            if attempt == 2:
                return dict(rec, status="error", first_try=rec.get("first_try"), **failed)
            rec["first_try"] = failed
        res = json.load(open(out))
        if p.returncode != 0:  # the results were written; the crash came after them, at teardown
            rec["exit_after_results"] = dict(code=p.returncode, log_tail=(p.stdout + p.stderr)[-1000:])
    except subprocess.TimeoutExpired:
        return dict(rec, status="timeout", error=f"no result within {args.timeout} s")
    try:
        res["estimate_gib_per_rank"] = estimate_gib(ex, cfg, gpus, args.hf_config)
    except Exception as e:   # the estimate is a comparison, not a reason to lose the run
        res["estimate_error"] = f"{type(e).__name__}: {e}"[:300]
    return dict(rec, status="ok", result=res)


def cpuadam_ranks(n, ranks, bind):
    """Each of `ranks` processes steps DeepSpeed's CPU Adam on n parameters at the same time (what two ranks'
    CPU shares do); with `bind`, each process is pinned to its own slice of the cores, as --bind_cores_to_rank
    does. M params/s per rank."""
    code = r'''
import os, sys, time, torch
r, ranks, n, bind = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
cores = sorted(os.sched_getaffinity(0))
if bind:
    share = len(cores) // ranks
    os.sched_setaffinity(0, cores[r * share:(r + 1) * share])
    torch.set_num_threads(share)
from deepspeed.ops.adam import DeepSpeedCPUAdam
p = [torch.nn.Parameter(torch.randn(n))]
p[0].grad = torch.randn(n)
o = DeepSpeedCPUAdam(p, lr=1e-4)
o.step()
open(sys.argv[5], "w").write("ready")
while not os.path.exists(sys.argv[6]):
    time.sleep(0.01)
t = time.perf_counter()
for _ in range(3):
    o.step()
print("MPARAMS", round(3 * n / (time.perf_counter() - t) / 1e6), "THREADS", torch.get_num_threads())
'''
    with tempfile.TemporaryDirectory() as d:
        go = os.path.join(d, "go")
        ps = [subprocess.Popen([sys.executable, "-c", code, str(r), str(ranks), str(n), "1" if bind else "0",
                                os.path.join(d, f"ready{r}"), go], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for r in range(ranks)]
        deadline = time.time() + 600
        while not all(os.path.exists(os.path.join(d, f"ready{r}")) for r in range(ranks)):
            if time.time() > deadline or any(p.poll() not in (None, 0) for p in ps):
                break
            time.sleep(0.05)
        open(go, "w").close()      # every rank starts its timed steps together
        outs = [p.communicate(timeout=600) for p in ps]
    rates = []
    for (so, se), p in zip(outs, ps):
        line = next((l for l in so.splitlines() if l.startswith("MPARAMS")), None)
        rates.append(dict(mparam_per_s=int(line.split()[1]), threads=int(line.split()[3])) if line else
                     dict(error=(se or so)[-400:]))
    return rates


# ---------------------------------------------------------------------------------------------- report


def _get(recs, ex, stage, mode, gpus, bind=False):
    r = recs.get(f"{ex}/z{stage}/{mode}{'_bind' if bind else ''}/{gpus}")
    return (r or {}).get("result") if (r or {}).get("status") == "ok" else None


def _delta(a, b):
    if not a or not b or len(a["losses"]) != len(b["losses"]):
        return None
    return max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))


def _gib(x):
    return "–" if x is None else f"{x / 2**30:.2f}"


def markdown(data):
    recs = {r["key"]: r for r in data.get("runs", [])}
    env = data.get("env", {})
    L = [f"Two-rank data parallelism through `ds-offload launch` on {env.get('gpu') or 'CPU ranks (gloo)'} "
         f"({env.get('date')}, commit `{str(env.get('commit'))[:9]}`): {env.get('steps')} steps with deterministic "
         "kernels, global batch fixed (the 1-GPU run takes it whole). Δ: max |loss(2 GPUs) - loss(1 GPU)| over the "
         f"steps (criterion < {PARITY}); noise: the same between two plain 2-GPU runs. Peaks per rank against "
         "`ds-offload estimate --gpus 2`.", ""]
    for ex in ("gpt", "hf"):
        for stage in (1, 2):
            if not any(r.startswith(f"{ex}/z{stage}/") for r in recs):
                continue
            p2 = _get(recs, ex, stage, "plain", 2)
            noise = _delta(p2, _get(recs, ex, stage, "plain_again", 2))
            L += [f"### `{ex}` ZeRO-{stage} (noise floor {noise if noise is None else f'{noise:.2e}'})", "",
                  "| mode | 1 GPU step s | 2 GPU step s | × plain (2 GPUs) | Δ loss 2 vs 1 | GPU peak per rank GiB | "
                  "estimate GiB | host peak per rank GiB |", "|---|---|---|---|---|---|---|---|"]
            for mode in MODES:
                for bind in (False, True):
                    two, one = _get(recs, ex, stage, mode, 2, bind), _get(recs, ex, stage, mode, 1)
                    r2 = recs.get(f"{ex}/z{stage}/{mode}{'_bind' if bind else ''}/2")
                    if r2 is None and bind:
                        continue
                    name = mode + (" (--bind_cores_to_rank)" if bind else "")
                    if not two:
                        L.append(f"| {name} | – | {(r2 or {}).get('status', 'not run')}: "
                                 f"{((r2 or {}).get('error') or '')[:80]} | | | | | |")
                        continue
                    d = _delta(two, one) if not bind else None
                    L.append("| " + " | ".join([
                        name, f"{one['mean_step_s']:.4f}" if one and not bind else "–", f"{two['mean_step_s']:.4f}",
                        f"{two['mean_step_s'] / p2['mean_step_s']:.2f}x" if p2 else "–",
                        "–" if d is None else f"{d:.2e}" + ("" if d < PARITY else " ⚠"),
                        " / ".join(_gib(b) for b in two["peak_gpu_bytes_per_rank"] or []),
                        str(two.get("estimate_gib_per_rank", "–")),
                        " / ".join(_gib(b) for b in two.get("peak_host_bytes_per_rank") or [])]) + " |")
            L.append("")
    ca = data.get("cpuadam")
    if ca:
        L += ["### CPU Adam per rank (DeepSpeed's op, all ranks stepping at once)", "",
              "| setting | M params/s per rank (threads) |", "|---|---|"]
        for name, rates in ca.items():
            L.append(f"| {name} | " + ", ".join(f"{x['mparam_per_s']} ({x['threads']})" if "mparam_per_s" in x else
                                               f"error: {x.get('error', '')[:60]}" for x in rates) + " |")
        L.append("")
    return L


# ---------------------------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="CPU ranks (gloo) and tiny models: the smoke test")
    ap.add_argument("--only", default=None, help="comma list of globs over example/zN/mode/gpus")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budget", type=float, default=570, help="seconds; launches past it are recorded as skipped")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per launch")
    ap.add_argument("--cpuadam-n", type=int, default=None, help="parameters per rank of the CPU Adam probe, run "
                    "after the launches (0: no probe)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "two_gpu.json")
    if args.report_only:
        data = json.load(open(path))
        open(os.path.join(out, "TWO_GPU.md"), "w").write("\n".join(["# Two GPUs", ""] + markdown(data)))
        return 0
    sel = [r for r in runs(args.cpu) if not args.only or any(fnmatch.fnmatch(key(r), g) for g in args.only.split(","))]
    if args.list:
        print("\n".join(key(r) for r in sel) + f"\n{len(sel)} launches")
        return 0
    import run as RUN
    env = RUN.environment()
    env.update(steps=args.steps, cpu=args.cpu, argv=" ".join(sys.argv[1:]))
    data = {"env": env, "runs": [], "cpuadam": {}}
    args.hf_config = llama_config(os.path.join(out, "llama_852m.json")) if not args.cpu else None
    t0 = time.perf_counter()

    def save():
        with open(path, "w") as fh:
            json.dump(data, fh, indent=1)
    with tempfile.TemporaryDirectory() as work:
        for i, r in enumerate(sel):
            if time.perf_counter() - t0 > args.budget:
                rec = dict(key=key(r), status="skipped", error=f"over the budget ({args.budget:.0f} s)")
            else:
                rec = launch(r, args, work, 29600 + i)
            data["runs"].append(rec)
            save()
            res = rec.get("result") or {}
            print(f"[two_gpu] {time.perf_counter() - t0:6.1f}s {rec['key']:24s} {rec['status']:7s} "
                  + (f"loss {res.get('final_loss'):.5f}, {res.get('mean_step_s', 0) * 1e3:.0f} ms/step"
                     if rec["status"] == "ok" else (rec.get("error") or "")), flush=True)
    # after the launches (they come first in the budget): each rank's CPU Adam, the ranks stepping at once
    n = args.cpuadam_n or (2_000_000 if args.cpu else 200_000_000)
    for name, ranks, bind in (("1 rank, all cores", 1, False), ("2 ranks, unbound", 2, False),
                              ("2 ranks, bound to half the cores each", 2, True)):
        if args.cpuadam_n == 0:
            break
        data["cpuadam"][name] = cpuadam_ranks(n, ranks, bind)
        save()
        print(f"[two_gpu] CPU Adam {name}: {data['cpuadam'][name]}", flush=True)
    open(os.path.join(out, "TWO_GPU.md"), "w").write("\n".join(["# Two GPUs", ""] + markdown(data)))
    print(f"[two_gpu] wrote {path} and TWO_GPU.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
