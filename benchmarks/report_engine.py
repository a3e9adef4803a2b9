"""The engine-path sections of BENCHMARKS.md (the headline): every mode through `ds_offload.initialize` beside
plain DeepSpeed of the same config and the peers, the bytes each mode should free, and every target of the
engine-native optimizer, weight offload and activation issues as met / not met.

Why a module of its own: these tables are computed from one (shape, ZeRO stage) process group at a time, so
ratios and deltas compare cases that ran on the same machine, in the same process, minutes apart.
"""
import json
import math
import os

GiB = 2**30
HERE = os.path.dirname(os.path.abspath(__file__))
PARITY = 1e-3   # the issues' loss criterion (max delta over a 50-step run with deterministic kernels)

# Step-time targets against plain DeepSpeed of the same config.
OPT_STEP = {0.25: 1.05, 0.5: 1.15, 1.0: 1.5}                                      # engine-native optimizer issue
WEIGHTS_STEP = {"w8": 1.30, "w8_acts": 2.0}                                         # weight offload issue
ACT_STEP = {"reference": {4: 1.15, 8: 2.1, 15: 3.8}, "wide": {2: 1.10, 4: 1.6, 7: 2.4}}   # activation issue


def fmt(x, nd=3):
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN"
    return f"{x:.{nd}f}"


SHAPE_ORDER = ("reference", "reference-fresh", "llama", "llama-fresh", "wide", "tiny", "tiny-fresh", "llama-tiny")


def groups(R):
    """[(shape, stage)] of the engine-path groups present: the reference GPT first, then the Llama, the wide GPT."""
    out = set()
    for r in R.recs:
        p = r.get("process")
        if p and p.startswith("eng_z"):
            out.add((r["shape"], int(p[len("eng_z"):])))
    rank = {s: i for i, s in enumerate(SHAPE_ORDER)}
    return sorted(out, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1]))


def members(R, shape, stage):
    return [r for r in R.recs if r["shape"] == shape and r.get("process") == f"eng_z{stage}"]


def layer_bytes(R, shape, stage):
    x = R.ok(shape, f"eng_z{stage}_plain")
    return (x or {}).get("saved_bytes_per_layer")


def bound_bytes(R, r):
    """Bytes the case should free against plain DeepSpeed: 12 per optimizer element on the CPU (fp32 master and
    both moments), 16 per offloaded weight (bf16 weight and gradient, fp32 master, moments), and the bytes the
    offloaded layers save for backward (measured on the plain run)."""
    x = r.get("result") or {}
    p = r.get("params") or {}
    stage = p.get("stage")
    lb = layer_bytes(R, r["shape"], stage) if stage else None
    n = p.get("n") or 0
    total, known = 0, False
    if x.get("optimizer_cpu_numel"):
        total, known = total + 12 * x["optimizer_cpu_numel"], True
    if x.get("weights_offloaded_params"):
        total, known = total + 16 * x["weights_offloaded_params"], True
    acts = r["mode"] in ("act", "act_peer") or (r["mode"] in ("weights", "combined") and
                                                 (p.get("acts") or r["mode"] == "combined"))
    if acts and n and lb:
        total, known = total + sum(lb[:n]), True
    return total if known else None


def max_delta(a, b):
    la, lb = (a or {}).get("losses") or [], (b or {}).get("losses") or []
    if not la or len(la) != len(lb):
        return None
    return max(abs(x - y) for x, y in zip(la, lb))


def plain_of(R, shape, stage):
    """The reference of a group's ratios: the faster of its two plain DeepSpeed runs (the conservative choice:
    their step times differ by a few percent, which is the timing noise of the ratios), and the second run's
    peak when there is one (it ran, like every case after the first, with what the first left allocated, and
    the peaks of both are measured from there; taking it does not credit that remainder to our cases)."""
    first, again = (R.ok(shape, f"eng_z{stage}_{c}") for c in ("plain", "plain_again"))
    runs = [x for x in (first, again) if x and "step_s" in x]
    if not runs:
        return None
    peak_from = again if again and again.get("peak_alloc_gib") is not None else runs[0]
    return dict(runs[0], step_s=min(x["step_s"] for x in runs), peak_alloc_gib=peak_from.get("peak_alloc_gib"))


def table(R, shape, stage):
    plain = plain_of(R, shape, stage)
    first, again = R.ok(shape, f"eng_z{stage}_plain"), R.ok(shape, f"eng_z{stage}_plain_again")
    noise = max_delta(first, again)
    spread = (abs(first["step_s"] - again["step_s"]) / min(first["step_s"], again["step_s"])
              if first and again else None)
    lines = [f"Noise floor (two plain DeepSpeed runs of this process, max |Δ loss| over the steps): "
             f"**{fmt(noise, 5)}**; their step times differ by {fmt(spread * 100 if spread is not None else None, 1)}% "
             "(`× plain` is against the faster).", "",
             "| case | what | step s | × plain | peak GiB | saved GiB | bound GiB | saved/bound | host RSS +GiB | "
             "pinned GiB | max \\|Δ loss\\| | final loss |", "|" + "---|" * 12]
    for r in members(R, shape, stage):
        name = f"**{r['case']}**" if r["group"] == "ours" else r["case"]
        x = r.get("result") if r.get("status") == "ok" else None
        if not x or "step_s" not in x:
            why = (r.get("error") or "no result").replace("|", "\\|").replace("\n", " ")[:150]
            lines.append(f"| {name} | {r['label']} | {r.get('status')}: {why} |" + " |" * 9)
            continue
        b = bound_bytes(R, r)
        saved = plain["peak_alloc_gib"] - x["peak_alloc_gib"] if plain and "peak_alloc_gib" in x else None
        label = r["label"]
        if x.get("speculated_steps") is not None:  # how often the CPU step during backward stood
            label += (f"; {x['speculated_steps']} of {x.get('warm', 0) + x.get('steps', 0)} steps stepped during "
                      f"backward, {x.get('rollbacks', 0)} taken back")
            t = x.get("speculation_trial") or {}
            if t.get("choice") is not None:
                label += (f"; its timing trial: {fmt(t.get('with_s'))} s per step with, {fmt(t.get('without_s'))} s "
                          f"without, {'kept' if t['choice'] else 'turned off'}")
        if x.get("weights_speculative"):  # the weight-offloaded layers' CPU steps during backward
            label += (f"; layers stepped during backward in {x.get('weights_speculated_steps', 0)} of "
                      f"{x.get('warm', 0) + x.get('steps', 0)} steps, {x.get('weights_rollbacks', 0)} taken back; "
                      f"their CPU time {fmt(x.get('weights_cpu_step_s'))} s per step, host waited "
                      f"{fmt(x.get('weights_wait_s'))} s for it")
            t = x.get("weights_trial") or {}
            if t.get("choice") is not None:
                label += (f"; its timing trial: {fmt(t.get('with_s'))} s per step with, {fmt(t.get('without_s'))} s "
                          f"without, {'kept' if t['choice'] else 'turned off'}")
        lines.append("| " + " | ".join([
            name, label, fmt(x["step_s"], 4),
            fmt(x["step_s"] / plain["step_s"], 2) + "x" if plain else "–",
            fmt(x.get("peak_alloc_gib"), 2), fmt(saved, 2), fmt(b / GiB if b else None, 2),
            f"{saved * GiB / b:.0%}" if b and saved is not None else "–",
            fmt(x.get("cpu_rss_growth_gib"), 1), fmt(x.get("pinned_gib"), 1),
            fmt(max_delta(x, plain), 5) if r["case"] != f"eng_z{stage}_plain" else "–", fmt(x["loss"], 4)]) + " |")
    return lines


def _verdict(ok):
    return "**met**" if ok else "**not met**"


def _step_target(R, shape, stage, case, lim, what):
    x, plain = R.ok(shape, case), plain_of(R, shape, stage)
    if not x or not plain:
        r = R.by.get((shape, case))
        return f"- {shape} ZeRO-{stage}, {what}: step <= {lim}x — **not measured** ({(r or {}).get('status', 'not in this run')})"
    ratio = x["step_s"] / plain["step_s"]
    return f"- {shape} ZeRO-{stage}, {what}: step {ratio:.3f}x (target <= {lim}x: {_verdict(ratio <= lim)})"


def _memory_target(R, shape, stage, case, what, frac=0.9):
    r = R.by.get((shape, case))
    x, plain = R.ok(shape, case), plain_of(R, shape, stage)
    b = bound_bytes(R, r) if r and x else None
    if not x or not plain or not b:
        return f"- {shape} ZeRO-{stage}, {what}: peak drop >= {frac:.0%} of the bound — **not measured**"
    saved = (plain["peak_alloc_gib"] - x["peak_alloc_gib"]) * GiB
    return (f"- {shape} ZeRO-{stage}, {what}: peak lower by {saved / GiB:.2f} GiB = {saved / b:.0%} of "
            f"{b / GiB:.2f} GiB (target >= {frac:.0%}: {_verdict(saved >= frac * b)})")


def _parity_line(R, shape, stage, case, what):
    x, plain, again = (R.ok(shape, c) for c in (case, f"eng_z{stage}_plain", f"eng_z{stage}_plain_again"))
    if not x or not plain:
        return f"- {shape} ZeRO-{stage}, {what}: loss parity — **not measured**"
    d, noise = max_delta(x, plain), max_delta(plain, again)
    return (f"- {shape} ZeRO-{stage}, {what}: max |Δ loss| {fmt(d, 5)} over {len(x['losses'])} steps "
            f"(noise floor {fmt(noise, 5)}; bf16 kernels as DeepSpeed picks them, not deterministic)")


def parity50():
    """The 50-step deterministic parity run (benchmarks/parity50.py), when its results are in the tree."""
    path = os.path.join(HERE, "results", "parity50", "results.jsonl")
    if not os.path.exists(path):
        return []
    rows = [json.loads(line) for line in open(path) if line.strip()]
    runs = [f"`{r['run']}` {r['max_loss_delta']:.1e}" for r in rows if r.get("max_loss_delta") is not None]
    noise = next((r["noise_floor"] for r in rows if r.get("noise_floor") is not None), None)
    device = next((r["device"] for r in rows if r.get("device")), "GPU")
    if not runs:
        return []
    return [f"- 50 steps with deterministic kernels (`benchmarks/parity50.py`, results/parity50: reference GPT, "
            f"ZeRO-1, an earlier run on an {device}): max |Δ loss| " + ", ".join(runs)
            + f" against a noise floor of {fmt(noise, 6) if noise is not None else '–'} (criterion < {PARITY})."]


def targets(R):
    L = []
    gs = groups(R)
    L += ["### Engine-native hybrid optimizer (fp32 masters, moments and gradients of f on the CPU)", ""]
    for shape, stage in gs:
        if shape not in ("reference", "llama", "reference-fresh", "llama-fresh"):
            continue
        if not any((shape, f"eng_z{stage}_opt_f{int(f * 100)}") in R.by for f in OPT_STEP):
            continue  # a run of other cases of this group (their lines would all read "not measured")
        for f, lim in OPT_STEP.items():
            c = f"eng_z{stage}_opt_f{int(f * 100)}"
            L.append(_step_target(R, shape, stage, c, lim, f"f={f}"))
            L.append(_memory_target(R, shape, stage, c, f"f={f}"))
        x = R.ok(shape, f"eng_z{stage}_opt_f100")
        peer = R.ok(shape, f"eng_z{stage}_ds_offload_opt") or R.ok(shape, "eng_z2_ds_offload_opt")
        if x and peer:
            L.append(f"- {shape} ZeRO-{stage}, f=1.0 peak {x['peak_alloc_gib']:.2f} GiB against DeepSpeed ZeRO-2 "
                     f"offload_optimizer's {peer['peak_alloc_gib']:.2f} GiB (target: no higher: "
                     f"{_verdict(x['peak_alloc_gib'] <= peer['peak_alloc_gib'] + 0.01)})")
        L.append(_parity_line(R, shape, stage, f"eng_z{stage}_opt_f50", "f=0.5"))
    L += [""] + parity50() + ["", "### Weight offload of the first N layers", ""]
    for shape, stage in gs:
        if shape not in ("reference", "reference-fresh") or \
                not any((shape, f"eng_z{stage}_{key}") in R.by for key in WEIGHTS_STEP):
            continue
        for key, lim in WEIGHTS_STEP.items():
            c = f"eng_z{stage}_{key}"
            what = "weights N=8" + (" + activations" if key.endswith("acts") else "")
            L.append(_step_target(R, shape, stage, c, lim, what))
            L.append(_memory_target(R, shape, stage, c, what))
        L.append(_parity_line(R, shape, stage, f"eng_z{stage}_w8", "weights N=8"))
    L += ["", "### Activation offload of the first N layers (through the engine)", ""]
    for shape, stage in gs:
        for n, lim in ACT_STEP.get(shape, {}).items():
            c = f"eng_z{stage}_act{n}"
            L.append(_step_target(R, shape, stage, c, lim, f"activations N={n}"))
            L.append(_memory_target(R, shape, stage, c, f"activations N={n}"))
    return L


def not_run(R):
    """Cases of the full engine matrix without a record in these results."""
    import engine_cases as E
    have = {(r["shape"], r["case"]) for r in R.recs}
    out = []
    for g in E.registry():
        miss = [m.name for m in g.members if (g.shape, m.name) not in have]
        if miss:
            out.append(f"- `{g.shape}/{g.name}` (tier {g.tier}): {len(miss)} of {len(g.members)} cases not in these "
                       "results")
    return out


def sections(R):
    gs = groups(R)
    if not gs:
        return []
    L = ["## The engine path: `ds_offload.initialize` against plain DeepSpeed of the same config", "",
         "Each (shape, ZeRO stage) ran in one process: plain DeepSpeed (bf16, AdamW, `gradient_clipping: 1.0`) "
         "first, our modes, plain DeepSpeed again (the noise floor), then the peers on the same engine config. "
         "Every case builds its own model (seed 0; the same batch every step, or for a `-fresh` shape a new batch "
         "every step) and engine and closes both before the "
         "next one; its peak is measured from what the previous case left allocated. `× plain`: step time over the "
         "faster plain run's. `saved`: the second plain run's peak minus the case's (both measured from what the first "
         "case left allocated). `bound`: what the mode should free — 12 B per "
         "optimizer element on the CPU, 16 B per offloaded weight, and the bytes the offloaded layers save for "
         "backward (counted on the plain run). `host RSS +GiB`: the process's resident memory growth during the case "
         "(everything it holds on the host); `pinned`: bytes in use in PyTorch's caching host allocator at the end of "
         "the case (the activation copies, torch's pinned tensors; the optimizer's and the weights' shared buffers, "
         "pinned with cudaHostRegister, are in the RSS growth, not here). **Bold**: ds_offload.", ""]
    for shape, stage in gs:
        try:
            import report as Rep
            desc = Rep.shape_desc(shape.replace("-fresh", ""))
        except Exception:
            desc = shape
        if shape.endswith("-fresh"):
            desc += "; **a new batch every step**"
        L += [f"### `{shape}` ({desc}), ZeRO-{stage}", ""] + table(R, shape, stage) + [""]
    L += ["## Targets", ""] + targets(R) + [""]
    miss = not_run(R)
    if miss:
        L += ["Cases of the full engine matrix not in these results:", ""] + miss + [""]
    return L


def write_plot(R, path):
    """Step time against GPU peak, one panel per (shape, stage), engine-path cases and peers."""
    gs = groups(R)
    if not gs:
        return "no engine-path results"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"plot not drawn: {e}"
    cols = min(2, len(gs))
    rows = (len(gs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 5.5 * rows), squeeze=False)
    style = {"ours": dict(c="tab:red", marker="o", s=55, zorder=3), "peer": dict(c="tab:blue", marker="s", s=40),
             "baseline": dict(c="black", marker="*", s=140, zorder=4)}
    for k, (shape, stage) in enumerate(gs):
        ax = axes[k // cols][k % cols]
        for r in members(R, shape, stage):
            x = r.get("result") if r.get("status") == "ok" else None
            if not x or "step_s" not in x or x.get("peak_alloc_gib") is None:
                continue
            st = style.get(r["group"], style["peer"])
            ax.scatter(x["peak_alloc_gib"], x["step_s"], **st)
            ax.annotate(r["case"].replace(f"eng_z{stage}_", ""), (x["peak_alloc_gib"], x["step_s"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points", color=st["c"])
        ax.set_title(f"{shape}, ZeRO-{stage}", fontsize=10)
        ax.set_xlabel("peak GPU memory allocated (GiB)")
        ax.set_ylabel("step time (s, median)")
        ax.grid(alpha=0.3)
    for k in range(len(gs), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"ds_offload.initialize vs plain DeepSpeed and peers — {R.env.get('gpu') or 'CPU'} — "
                 f"{R.env.get('date', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
