"""GPU benchmark of ds_offload against its peers, results as JSON, and BENCHMARKS.md + a plot generated from them.

    python benchmarks/run.py --out DIR            # the engine path (default suite): tier 1 of the matrix, ~20 min;
                                                  # split it over device calls with --shapes / --only
    python benchmarks/run.py --suite loop --out DIR   # the plain-loop cases, one process each (budget 525 s)
    python benchmarks/run.py --quick --out DIR    # plain-loop subset on the reference shape, ~2 min
    python benchmarks/run.py --tiny --out DIR     # CPU smoke test on tiny shapes (CUDA-only cases skipped)
    python benchmarks/run.py --list [--quick]     # what would run, with time estimates and tiers
    python benchmarks/run.py --report-only [--merge A/results.json B/results.json] [--out DIR]
                                                  # regenerate BENCHMARKS.md and the plot (merging runs)

The engine suite (engine_cases.py) runs one process per (shape, ZeRO stage): a case group whose members run one
after another, each building and closing its own engine; each member's record comes back as it ends.
Cases run in priority tiers (1: the targets' cases, baselines, limits and the main peers; 2: variants, ZeRO-3,
the engine path; 3: extra diagnostics); a case whose estimate no longer fits the run's --budget is recorded as
skipped, so the full run ends on time. `--tiers 2,3` runs the rest in a second call; merge the two results.json.
Each case has its own timeout; a failing case records its error and the run goes on. DeepSpeed's CPU Adam op is
built once, in the background, into TORCH_EXTENSIONS_DIR (default: a per-user directory,
~/.cache/ds_offload/bench_torch_extensions, else $TMPDIR/ds_offload-ext-<uid>).

Files written under DIR (8 at most, flat): results.json (environment + every case), results.jsonl (one line
per case as it finishes), BENCHMARKS.md, plot.png, build.log. With the default DIR (benchmarks/results) the
report is also written to the repository's BENCHMARKS.md. BENCH_GIT_COMMIT (and BENCH_GIT_DIRTY=1 for a tree with
changes) names the commit when the tree was copied without its .git or with a stale one; it wins over git.
"""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import signal
import stat
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (HERE, REPO):
    if p not in sys.path:
        sys.path.insert(0, p)

DEFAULT_OUT = os.path.join(HERE, "results")
BUDGETS = {"full": 525, "quick": 130, "tiny": 400, "engine": 1200, "engine-tiny": 900}


# ---------------------------------------------------------------------------------------------- worker


def run_members(spec):
    """A case group: its members one after another in this process, one MEMBER line each as it ends (so a
    crash or a timeout later in the group loses only what had not finished)."""
    import importlib
    import traceback
    import harness as H
    for m in spec["members"]:
        H.begin_member()
        t0 = time.perf_counter()
        try:
            mod, fn = m["fn"].split(":")
            res = getattr(importlib.import_module(mod), fn)(spec["shape"], spec["warm"], spec["steps"], **m["params"])
            out = {"status": "ok", "result": res}
        except H.Skip as e:
            out = {"status": "skipped", "error": str(e)[:600]}
        except Exception as e:
            out = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:600]}",
                   "traceback": traceback.format_exc()[-2500:]}
        out["worker_s"] = round(time.perf_counter() - t0, 2)
        print("MEMBER " + json.dumps(dict(out, name=m["name"])), flush=True)
    return {"members": len(spec["members"])}


def worker(spec):
    import importlib
    import traceback
    spec = json.loads(spec)
    t0 = time.perf_counter()
    timing = {"start_s": round(time.time() - float(os.environ.get("BENCH_T0", time.time())), 2)}
    try:
        import torch
        timing["import_torch_s"] = round(time.perf_counter() - t0, 2)
        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")
            timing["cuda_init_s"] = round(time.perf_counter() - t0 - timing["import_torch_s"], 2)
    except Exception:
        pass
    try:
        if spec.get("members"):
            res = run_members(spec)
        else:
            mod, fn = spec["fn"].split(":")
            f = getattr(importlib.import_module(mod), fn)
            res = f(spec["shape"], spec["warm"], spec["steps"], **spec.get("params", {}))
        out = {"status": "ok", "result": res}
    except Exception as e:
        out = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:600]}",
               "traceback": traceback.format_exc()[-2500:]}
    out["worker_s"] = round(time.perf_counter() - t0, 2)
    out["timing"] = timing
    try:
        import torch
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name()
    except Exception:
        pass
    print("RESULT " + json.dumps(out), flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)   # skip slow teardown (NCCL, helper threads of the optimizers)


# ---------------------------------------------------------------------------------------------- parent


def sh(argv):
    """stdout of a command given as an argument list (no shell), or "" if it cannot run."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""


def default_ext_dir():
    """A per-user TORCH_EXTENSIONS_DIR for the benchmark's op build: under the user's cache directory, else a
    private (0o700, the user's own, not a link) directory in the temp dir named after the uid."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(cache, "ds_offload", "bench_torch_extensions")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = os.path.join(tempfile.gettempdir(), f"ds_offload-ext-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise SystemExit(f"[bench] {path} is not a private directory of yours; set TORCH_EXTENSIONS_DIR")
    return path


def environment():
    from importlib import metadata

    def ver(name):
        try:
            return metadata.version(name)
        except Exception:
            return None
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    # BENCH_GIT_COMMIT wins: a copied working tree may carry a stale .git that names another commit
    commit, dirty = os.environ.get("BENCH_GIT_COMMIT", ""), os.environ.get("BENCH_GIT_DIRTY", "")
    if not (7 <= len(commit) <= 40 and all(ch in "0123456789abcdef" for ch in commit.lower())):  # a short hash too
        commit = sh(["git", "-C", REPO, "rev-parse", "HEAD"])
        dirty = sh(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])
    if len(commit) != 40:   # no usable .git and nothing from the caller
        commit = "unknown"
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":")[1].strip()
    except OSError:
        pass
    import torch
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit, "dirty": bool(dirty), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": ver("deepspeed"),
        "megatron_core": ver("megatron-core") or ver("megatron_core"), "torchao": ver("torchao"),
        "transformers": ver("transformers"),
        "gpu": sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]) or None,
        "cpu": cpu, "cpu_cores": os.cpu_count(), "host_memory": mem, "host": platform.node(),
    }


class DSBuild:
    """DeepSpeed's CPU Adam op is JIT-built (~40 s on 16 cores): build it once, in the background, into one
    TORCH_EXTENSIONS_DIR that every case process shares."""

    def __init__(self, ext_dir, log_path):
        self.ext_dir, self.log_path = ext_dir, log_path
        self.proc, self.t0, self.result = None, None, None

    def start(self):
        os.makedirs(self.ext_dir, exist_ok=True)
        self.t0 = time.perf_counter()
        code = ("import threading, time; t=time.perf_counter(); from deepspeed.ops.op_builder import CPUAdamBuilder; "
                "from ds_offload.optimizer import ds_op; gil_free=threading.Thread(target=ds_op.gil_free_op); "
                "gil_free.start(); CPUAdamBuilder().load(); gil_free.join(); "  # the two builds side by side
                "print('GIL-free build:', ds_op.gil_free_op() is not None); "
                "print('CPU Adam ops ready in %.1f s' % (time.perf_counter()-t))")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=os.environ.copy(), start_new_session=True)

    def done(self):
        if self.result is None and self.proc is not None and self.proc.poll() is not None:
            self.log.close()
            self.result = dict(ok=self.proc.returncode == 0, seconds=round(time.perf_counter() - self.t0, 1),
                               tail=_tail(open(self.log_path).read(), 1500))
        return self.result is not None

    def wait(self, timeout):
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.done()


def _tail(s, n):
    return s[-n:] if s else ""


def _base(case):
    return dict(case=case.name, shape=case.shape, group=case.group, mode=case.mode, label=case.label,
                params=case.params, loss_ref=case.loss_ref, wall_s=0)


def run_group(case, args, port, timeout):
    """Records of a case group's members, from the MEMBER lines of its one process."""
    rec = run_case(case, args, port, timeout)
    got = {}
    for line in rec.pop("stdout_lines", []):
        if line.startswith("MEMBER "):
            m = json.loads(line[len("MEMBER "):])
            got[m.pop("name")] = m
    out = []
    for m in case.members:
        r = dict(_base(m), process=case.name, wall_s=None)
        if m.name in got:
            r.update(got[m.name])
            r["wall_s"] = r.get("worker_s")
            if r["status"] == "error":
                r["log_tail"] = rec.get("log_tail", "")[-1500:]
        else:
            r.update(status="error" if rec["status"] != "timeout" else "timeout",
                     error=f"the group's process ended before this case ({rec['status']}: {rec.get('error', '')})"[:400],
                     log_tail=rec.get("log_tail", "")[-1500:])
        out.append(r)
    return out


def run_case(case, args, port, timeout):
    spec = dict(fn=case.fn, shape=case.shape, warm=args.warm, steps=args.steps, params=case.params)
    if case.members:
        spec["members"] = [dict(name=m.name, fn=m.fn, params=m.params) for m in case.members]
    env = os.environ.copy()
    env["BENCH_PORT"] = str(port)
    env["MASTER_PORT"] = str(port)
    env["BENCH_T0"] = repr(time.time())
    env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.perf_counter()
    # Output goes to files, not pipes: a helper process the case leaves behind (an optimizer's CPU worker)
    # could keep a pipe open after the case's own process is gone. The case's whole process group is
    # killed once its process exits or runs out of time.
    import tempfile
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                             stdout=fo, stderr=fe, text=True, env=env, cwd=REPO, start_new_session=True)
        status, pending, deadline = None, "", time.perf_counter() + timeout
        # progress of a group, read through a descriptor of its own (the child shares fo's file offset)
        peek = open(f"/proc/self/fd/{fo.fileno()}") if case.members and os.path.exists("/proc/self/fd") else None
        while p.poll() is None:          # a group reports each member as it ends
            if time.perf_counter() > deadline:
                status = "timeout"
                break
            time.sleep(1.0)
            if peek is not None:
                pending += peek.read()
                done = pending.rfind("\n") + 1
                lines, pending = pending[:done].splitlines(), pending[done:]
                for line in lines:
                    if line.startswith("MEMBER "):
                        m = json.loads(line[len("MEMBER "):])
                        r = m.get("result") or {}
                        print(f"[bench]   {case.shape}/{m['name']:28s} {m['status']:7s} {m.get('worker_s', 0):5.1f}s  "
                              + (f"step {r.get('step_s')} s, peak {r.get('peak_alloc_gib')} GiB, loss {r.get('loss')}"
                                 if "step_s" in r else (m.get("error") or "")[:200]), flush=True)
        if peek is not None:
            peek.close()
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    wall = round(time.perf_counter() - t0, 1)
    rec = dict(case=case.name, shape=case.shape, group=case.group, mode=case.mode, label=case.label,
               params=case.params, loss_ref=case.loss_ref, wall_s=wall)
    line = next((l for l in reversed(out.splitlines()) if l.startswith("RESULT ")), None)
    if status == "timeout":
        rec.update(status="timeout", error=f"no result within {timeout} s (per-case timeout)")
    elif line is None:
        rec.update(status="error", error=f"worker exited with code {p.returncode} and no result")
    else:
        rec.update(json.loads(line[len("RESULT "):]))
    if rec["status"] != "ok" or case.members:
        rec["log_tail"] = _tail(err, 2500) + ("\n[stdout] " + _tail(out, 800) if out else "")
    if case.members:
        rec["stdout_lines"] = out.splitlines()
    return rec


def merge_results(paths):
    """One results dict from several runs (e.g. one per shape or tier, from separate device calls)."""
    data = {"env": {}, "results": []}
    index = {}
    loaded = [json.load(open(p)) for p in paths]
    # the newest run's environment heads the merge (an older run merged for its other cases does not)
    newest = max(range(len(loaded)), key=lambda i: str(loaded[i].get("env", {}).get("date", "")))
    loaded.insert(0, loaded.pop(newest))
    paths = [paths[newest]] + [p for i, p in enumerate(paths) if i != newest]
    for d in loaded:
        env = dict(d.get("env", {}))
        for r in d.get("results", []):   # where each record came from
            r.setdefault("run", {"date": env.get("date"), "commit": env.get("commit")})
        if not data["env"]:
            data["env"] = env
        else:
            data["env"]["total_s"] = round((data["env"].get("total_s") or 0) + (env.get("total_s") or 0), 1)
            data["env"]["shapes"] = list(dict.fromkeys(data["env"].get("shapes", []) + env.get("shapes", [])))
            data["env"].setdefault("merged_from", []).append({key: env.get(key) for key in ("date", "gpu", "commit", "argv")})
        if len(str(data["env"].get("commit", ""))) != 40 and len(str(env.get("commit", ""))) == 40:
            data["env"]["commit"], data["env"]["dirty"] = env["commit"], env.get("dirty")
        for r in d.get("results", []):
            key = (r["shape"], r["case"])
            if key in index and r.get("status") in ("skipped",) and data["results"][index[key]].get("status") != "skipped":
                continue        # a skip in a later run does not hide a result of an earlier one
            if key in index and str(r["run"]["date"]) < str(data["results"][index[key]]["run"]["date"]):
                continue        # the newer run's record of a case wins, whatever the order of the files
            if key in index:
                data["results"][index[key]] = r
            else:
                index[key] = len(data["results"])
                data["results"].append(r)
    data["env"]["argv"] = "merged: " + " + ".join(os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths)
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--suite", choices=("engine", "loop"), default="engine",
                    help="engine (default): every mode through ds_offload.initialize beside plain DeepSpeed and the "
                    "peers, one process per (shape, ZeRO stage); loop: the plain-loop cases, one process each")
    ap.add_argument("--quick", action="store_true", help="a subset of the plain-loop cases (~2 min)")
    ap.add_argument("--tiny", action="store_true", help="tiny GPT shape; runs on CPU (smoke test)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="results folder (e.g. $OUT)")
    ap.add_argument("--md", default=None, help="where BENCHMARKS.md goes (default: OUT/BENCHMARKS.md, and the "
                    "repository's BENCHMARKS.md when OUT is the default folder)")
    ap.add_argument("--shapes", default=None, help="comma list of shapes (reference,wide,tiny)")
    ap.add_argument("--only", default=None, help="comma list of globs over case name, shape/name, group or mode")
    ap.add_argument("--skip", default=None, help="comma list of globs to leave out")
    ap.add_argument("--tiers", default=None, help="comma list of priority tiers to run (1: what the targets and "
                    "the main peers need; 2: variants, ZeRO-3, the engine path; 3: extra diagnostics)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                    help="with --report-only: merge several runs' results.json (later runs win per case)")
    ap.add_argument("--budget", type=float, default=None, help="total seconds for the cases; later cases whose "
                    "estimate no longer fits are recorded as skipped")
    ap.add_argument("--warm", type=int, default=None, help="warm-up steps per case (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default 5, at least 5)")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every per-case timeout")
    ap.add_argument("--report-only", action="store_true", help="regenerate the report from OUT/results.json")
    ap.add_argument("--list", action="store_true", help="list the selected cases and exit")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    import cases as C
    import report as R
    out = os.path.abspath(args.out)
    md_paths = [args.md] if args.md else [os.path.join(out, "BENCHMARKS.md")]
    if not args.md and out == os.path.abspath(DEFAULT_OUT):
        md_paths.append(os.path.join(REPO, "BENCHMARKS.md"))
    if args.report_only:
        os.makedirs(out, exist_ok=True)
        data = merge_results(args.merge) if args.merge else json.load(open(os.path.join(out, "results.json")))
        if args.merge:
            with open(os.path.join(out, "results.json"), "w") as f:
                json.dump(data, f, indent=1)
        for p in md_paths:
            R.write_report(data, p, os.path.join(out, "plot.png"))
        print("wrote", ", ".join(md_paths))
        return 0

    import torch
    cuda = torch.cuda.is_available()
    engine = args.suite == "engine" and not args.quick
    mode = ("engine-tiny" if args.tiny else "engine") if engine else "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.shapes:
        shapes = args.shapes.split(",")
    elif engine:
        shapes = ["tiny", "llama-tiny"] if args.tiny else ["reference", "llama", "wide"]
    else:
        shapes = ["tiny"] if args.tiny else ["reference"] if args.quick else ["reference", "wide"]
    args.warm = 2 if args.warm is None else args.warm
    args.steps = 5 if args.steps is None else args.steps
    budget = args.budget or BUDGETS[mode]
    if engine:
        import engine_cases as E
        limits = [c for c in C.registry(shapes[:1]) if c.group == "limits" and c.name in ("pcie", "cpuadam")]
        everything = limits + E.registry(shapes)
    else:
        everything = C.registry(shapes)
    sel = C.select(everything, quick=args.quick,
                   only=args.only.split(",") if args.only else None,
                   skip=args.skip.split(",") if args.skip else None,
                   tiers={int(t) for t in args.tiers.split(",")} if args.tiers else None)
    if args.list:
        for c in sel:
            print(f"{c.key:32s} {c.group:8s} est {c.est_s:3d}s timeout {c.budget_s:3d}s  {c.label}")
            for m in c.members or ():
                print(f"    {m.name:28s} {m.group:8s} est {m.est_s:3d}s  {m.label}")
        print(f"{len(sel)} processes, {sum(len(c.members or [c]) for c in sel)} cases, estimated "
              f"{sum(c.est_s for c in sel)} s (budget {budget:.0f} s)")
        return 0

    os.makedirs(out, exist_ok=True)
    env = environment()
    env.update(mode=mode, shapes=shapes, warm=args.warm, steps=args.steps, budget_s=budget,
               argv=" ".join(sys.argv[1:]))
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = default_ext_dir()
    env["torch_extensions_dir"] = os.environ["TORCH_EXTENSIONS_DIR"]
    data = {"env": env, "results": []}
    jsonl = open(os.path.join(out, "results.jsonl"), "w")

    def save(rec):
        data["results"].append(rec)
        jsonl.write(json.dumps(rec) + "\n")
        jsonl.flush()
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(data, f, indent=1)

    build = None
    if any(c.needs_ds_build for c in sel):
        build = DSBuild(os.environ["TORCH_EXTENSIONS_DIR"], os.path.join(out, "build.log"))
        build.start()
    t_start = time.perf_counter()
    queue, deferred = list(sel), []
    port = 29500 + os.getpid() % 500
    n_done = 0
    print(f"[bench] {mode}: {len(sel)} cases on {env['gpu'] or 'CPU'}, budget {budget:.0f} s, "
          f"{args.warm} warm-up + {args.steps} timed steps", flush=True)
    while queue or deferred:
        if build and build.done() and deferred:
            case = deferred.pop(0)
        elif queue:
            case = queue.pop(0)
            if build and case.needs_ds_build and not build.done():
                deferred.append(case)
                continue
        else:                                     # only cases waiting for the build are left
            build.wait(timeout=max(1.0, min(300.0, budget - (time.perf_counter() - t_start))))
            if build.result is None:
                build.result = dict(ok=False, seconds=None, tail="killed: no time left in the budget")
            case = deferred.pop(0)
        elapsed = time.perf_counter() - t_start

        def skip(why):
            for m in case.members or [case]:
                save(dict(_base(m), status="skipped", error=why, **({"process": case.name} if case.members else {})))

        if case.cuda_only and not cuda:
            skip("needs CUDA (no GPU on this machine)")
            continue
        if case.needs_ds_build and build and build.result and not build.result["ok"] and case.fn != "cases:cpuadam":
            skip("DeepSpeed CPU Adam build failed (see build.log)")
            continue
        if elapsed + case.est_s > budget:
            skip(f"over the run's budget ({budget:.0f} s) at {elapsed:.0f} s")
            print(f"[bench] {case.key}: skipped (budget)", flush=True)
            continue
        n_done += 1
        port += 1
        # a case may not run far past the run's budget either (a hang near the end must not sink the run)
        timeout = int(min(case.budget_s * args.timeout_scale, max(30.0, budget - elapsed + 45)))
        if case.members:
            runnable = [m for m in case.members if cuda or not m.cuda_only]
            for m in case.members:
                if m not in runnable:
                    save(dict(_base(m), status="skipped", error="needs CUDA (no GPU on this machine)", process=case.name))
            case = dataclasses.replace(case, members=runnable)
            print(f"[bench] {elapsed:6.1f}s {case.key}: {len(case.members)} cases in one process", flush=True)
            recs = run_group(case, args, port, timeout=timeout)
        else:
            recs = [run_case(case, args, port, timeout=timeout)]
        for rec in recs:
            save(rec)
            r = rec.get("result", {})
            msg = (f"step {r.get('step_s')} s, peak {r.get('peak_alloc_gib')} GiB, loss {r.get('loss')}"
                   if rec["status"] == "ok" and "step_s" in r else
                   json.dumps({k: v for k, v in r.items() if k not in ("traceback",)})[:300] if rec["status"] == "ok"
                   else rec.get("error"))
            print(f"[bench] {elapsed:6.1f}s {rec['shape'] + '/' + rec['case']:30s} {rec['status']:7s} "
                  f"{rec['wall_s'] or 0:5.1f}s  {msg}", flush=True)
    if build:
        build.wait(timeout=1)
        data["env"]["ds_build"] = build.result
    data["env"]["total_s"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(data, f, indent=1)
    jsonl.close()
    for p in md_paths:
        R.write_report(data, p, os.path.join(out, "plot.png"))
    print(f"[bench] done in {data['env']['total_s']} s; wrote {', '.join(md_paths)} and {out}/results.json",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
