#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""bench.py: svq.py's benchmarks (`make bench`).

    python3 bench.py [run] [--compare OLD.json]   everything: copier and import
                                                  time here, devices in the VM
    python3 bench.py run --no-vm                  host part only
    python3 bench.py table FILE [--compare OLD]   print a results file again
    python3 bench.py profile                      cProfile of the copier loop
    python3 bench.py vm --out FILE                (inside the VM; run by `run`)

Device benchmarks run `svq.py run DEV --json` in one VM (vm/run), direct and
shadow mode interleaved, round after round, in two placements (the driver
pinned alone to one vCPU, svq and the device's threads to the other; or all
placed by the scheduler), and report median [min-max] of each, and
shadow/direct within each round, median over the rounds.  The
copier benchmark drives a ShadowVirtqueue in this process: a minimal driver
posts chains on a guest ring, svq.forward_avail() copies them to the shadow
ring, a minimal device stand-in completes them, svq.flush() returns them to
the guest used ring.
Results go to .cache/bench/bench-YYYYmmdd-HHMMSS.json.
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(ROOT, ".cache", "bench")
SVQ = os.path.join(ROOT, "svq.py")

# Targets of the issue (benchmark only, never timed tests).
TARGET_RATIO = 0.90
TARGET_COPIER = 1000000          # 2-descriptor round trips/s on one core
TARGET_IMPORT_MS = 50.0
TARGET_RSS_MIB = 30.0
QEMU_C_SVQ_RATIO = 0.86          # netperf 9006 -> 7731 Mbit/s
WARMUP_SECONDS = 0.5             # one discarded run per case and mode
# Many short rounds rather than a few long ones: in the rig, the spread of
# the per-round ratio hardly shrinks with a longer run (standard deviation
# 0.037 at 0.5 s, 0.033 at 2 s, net 64 B), so more rounds buy a steadier median.
ROUNDS, SECONDS = 15, 1.0

# id, device variable, device label, size, write
DEVICE_CASES = [
    ("net-64", "SVQ_NET_DEV", "vdpa_sim_net", 64, False),
    ("net-1500", "SVQ_NET_DEV", "vdpa_sim_net", 1500, False),
    ("net-1514", "SVQ_NET_DEV", "vdpa_sim_net", 1514, False),
    ("blk-4k-read", "SVQ_BLK_DEV", "vdpa_sim_blk", 4096, False),
    ("blk-4k-write", "SVQ_BLK_DEV", "vdpa_sim_blk", 4096, True),
    ("blk-64k-read", "SVQ_BLK_DEV", "vdpa_sim_blk", 65536, False),
    ("blk-64k-write", "SVQ_BLK_DEV", "vdpa_sim_blk", 65536, True),
    ("vduse-4k-read", "SVQ_VDUSE_DEV", "VDUSE blk", 4096, False),
    ("vduse-4k-write", "SVQ_VDUSE_DEV", "VDUSE blk", 4096, True),
    ("vduse-64k-read", "SVQ_VDUSE_DEV", "VDUSE blk", 65536, False),
    ("vduse-64k-write", "SVQ_VDUSE_DEV", "VDUSE blk", 65536, True),
]

# serve: the built-in driver as the frontend of `svq.py serve` over
# vhost-user (`svq.py run SOCKET --type T`), in passthrough and shadow mode,
# beside `svq.py run --direct` in the same round (pinned placement).
SERVE_CASES = ("net-64", "blk-4k-read", "blk-64k-read", "vduse-4k-read", "vduse-64k-read")
SERVE_MODES = ("direct", "serve-passthrough", "serve-shadow")
TARGET_PASSTHROUGH = (0.98, 1.02)       # serve passthrough / run --direct
# Switch time: serve in auto mode while the driver turns dirty logging on and
# off every LOG_TOGGLE_SECONDS for SWITCH_SECONDS, as migrations that start
# and fail do.
LOG_TOGGLE_SECONDS, SWITCH_SECONDS = 0.25, 6.0
SWITCH_RE = re.compile(r"switched to (shadow|passthrough) in ([0-9.]+) ms \(([^;]+);")


def note(msg):
    sys.stderr.write("bench: %s\n" % msg)
    sys.stderr.flush()


def median(xs):
    return statistics.median(xs) if xs else None


# ============================================================================
# Machine description
# ============================================================================

def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine():
    cpu = re.search(r"^model name\s*:\s*(.*)$", _read("/proc/cpuinfo"), re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.M)
    return {
        "cpu": cpu.group(1).strip() if cpu else platform.processor() or "?",
        "cpus": os.cpu_count(),
        "memory_mib": int(mem.group(1)) // 1024 if mem else None,
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
    }


def git_commit():
    try:
        rev = subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                      stderr=subprocess.DEVNULL, universal_newlines=True).strip()
        dirty = subprocess.call(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "svq.py"],
                                stderr=subprocess.DEVNULL)
        return rev + ("+svq.py-modified" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# ============================================================================
# Device benchmarks (inside the VM)
# ============================================================================

JSON_BEGIN, JSON_END = "----- bench.py vm results -----", "----- end of results -----"
_STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def proc_status_kib(pid):
    out = {}
    for line in _read("/proc/%d/status" % pid).splitlines():
        k, _, v = line.partition(":")
        if k in _STATUS_KEYS:
            out[k] = int(v.split()[0])
    return out


# Where each party runs.  "pinned": the driver (the guest's vCPU) alone on
# CPU 0; svq and the device's own threads on CPU 1, in direct and shadow mode
# alike.  "free": the scheduler places everything.
PLACEMENTS = ("pinned", "free")
DRIVER_CPU, HOST_CPU = 0, 1


def vdpa_name(dev):
    """The vdpa device behind /dev/vhost-vdpa-N (vdpa0, vduse0, ...), or None."""
    base = "/sys/bus/vdpa/devices"
    try:
        names = os.listdir(base)
    except OSError:
        return None
    node = os.path.basename(dev)
    return next((n for n in names if os.path.exists(os.path.join(base, n, node))), None)


def device_pids(dev):
    """{pid: comm} of what does the device's work: vdpa_sim's kthread worker
    ("vDPA sim worker: <name>"), or the process that holds the VDUSE device
    /dev/vduse/<name> open (qemu-storage-daemon).  Empty for hardware."""
    name = vdpa_name(dev)
    out = {}
    if name is None:
        return out
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        comm = _read("/proc/%s/comm" % pid).strip()
        if comm == "vDPA sim worker: " + name:
            out[int(pid)] = comm
            continue
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%s/fd/%s" % (pid, fd)) == "/dev/vduse/" + name:
                    out[int(pid)] = comm
                    break
            except OSError:
                pass
    return out


def cpu_seconds(pids):
    """User + system CPU seconds of these processes, all their threads (and
    threads that have ended) included."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        stat = _read("/proc/%d/stat" % pid)
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 12:
            total += int(fields[11]) + int(fields[12])      # utime, stime
    return total / tick


def place(placement, pids):
    """Put every thread of the device processes `pids` where `placement` says;
    returns the (driver, svq) CPUs to give svq.BuiltinRun (None: not pinned).
    Threads they start later inherit the CPUs of the thread that starts them."""
    cpus = None if placement == "free" else (DRIVER_CPU, HOST_CPU)
    mask = set(range(os.cpu_count() or 1)) if cpus is None else {HOST_CPU}
    for pid in pids:
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), mask)
            except OSError as e:        # a thread that has just ended
                note("sched_setaffinity(%s of %d): %s" % (tid, pid, e.strerror))
    return cpus


def svq_run(dev, seconds, size, write, direct, cpus=None, device=(), **kw):
    """One `svq.py run`, in this process (svq.BuiltinRun, as the CLI runs it):
    no interpreter start-up between runs, so rounds can be many and long.
    `device`: the pids that do the device's work, whose CPU time is counted.
    `kw`: more of BuiltinRun's arguments (device_type for a vhost-user socket)."""
    import svq
    dev_cpu0 = cpu_seconds(device)
    try:
        run = svq.BuiltinRun(dev, direct=direct, seconds=seconds, size=size, write=write,
                             cpus=cpus, **kw)
        try:
            run.run()
            s = run.summary()
        finally:
            run.close()
    except svq.SvqError as e:
        return {"rc": 2, "failure": str(e)}
    res = {"rc": 0}
    for k in ("requests", "bytes", "seconds", "requests_per_second", "mbit_per_second",
              "errors", "kicks", "calls", "parked", "latency_us", "cpu_seconds",
              "chain_walks", "layout", "cpus", "log_toggle_ms", "dirty_pages"):
        res[k] = s.get(k)
    if device:
        res["cpu_seconds"]["device"] = round(cpu_seconds(device) - dev_cpu0, 3)
    if s.get("errors"):
        res["error_messages"] = s.get("error_messages", [])[:3]
    return res


class Serve:
    """`svq.py serve DEV --mode MODE` in a process of its own for the whole
    benchmark: it opens the device only while a frontend is connected (its
    worker), so direct runs go on between its runs."""

    def __init__(self, dev, mode, folder):
        self.dev, self.mode = dev, mode
        self.path = os.path.join(folder, "%s-%s.sock" % (os.path.basename(dev), mode))
        self.log_path = self.path + ".log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen([sys.executable, SVQ, "serve", dev, "--socket", self.path,
                                      "--mode", mode], stderr=self.log, cwd=ROOT)
        end = time.monotonic() + 120
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("serve %s --mode %s did not start: %s" % (dev, mode, self.text()))
            time.sleep(0.05)

    def text(self, since=0):
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            f.seek(since)
            return f.read()

    def offset(self):
        return os.path.getsize(self.log_path)

    def cpu(self):
        """CPU seconds of serve and of the workers it has reaped."""
        tick = os.sysconf("SC_CLK_TCK")
        stat = _read("/proc/%d/stat" % self.proc.pid)
        fields = stat[stat.rfind(")") + 2:].split()
        return sum(int(x) for x in fields[11:15]) / tick    # utime stime cutime cstime

    def wait_idle(self, timeout=5.0):
        """Until the last connection's worker has exited and been reaped."""
        end = time.monotonic() + timeout
        pid = self.proc.pid
        while time.monotonic() < end:
            if not _read("/proc/%d/task/%d/children" % (pid, pid)).split():
                return True
            time.sleep(0.02)
        return False

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def serve_run(srv, kind, seconds, size, write, cpus, device, **kw):
    """One run of the built-in driver through `srv`; svq's CPU is serve's.
    What serve logged meanwhile is in "serve_log" (the tail only, unless
    the run failed)."""
    srv.wait_idle()
    cpu0 = srv.cpu()
    since = srv.offset()
    r = svq_run(srv.path, seconds, size, write, False, cpus, device, device_type=kind, **kw)
    if not srv.wait_idle():
        note("serve %s: the worker did not exit" % srv.path)
    if "cpu_seconds" in r:
        r["cpu_seconds"]["svq"] = round(srv.cpu() - cpu0, 3)
    text = srv.text(since)
    r["serve_log"] = text if "failure" in r or r.get("errors") else text[-400:]
    return r


def serve_bench(devs, procs, cases, rounds, seconds, folder, t0):
    """serve passthrough and shadow beside run --direct, round after round,
    pinned; then the switch time in auto mode.  Returns (runs, switches)."""
    kinds = {"SVQ_NET_DEV": "net", "SVQ_BLK_DEV": "blk", "SVQ_VDUSE_DEV": "blk"}
    used = sorted({c[1] for c in cases})
    servers = {}
    runs, switches = [], {}
    try:
        for var in used:
            for mode in ("passthrough", "shadow", "auto"):
                servers[var, mode] = Serve(devs[var], mode, folder)
        every = [pid for p in procs.values() for pid in p] + [s.proc.pid for s in servers.values()]
        cpus = place("pinned", every)
        for cid, var, _, size, write in cases:         # warm-up, discarded
            for mode in ("serve-passthrough", "serve-shadow"):
                r = serve_run(servers[var, mode[6:]], kinds[var], WARMUP_SECONDS, size, write,
                              cpus, procs[var])
                if "failure" in r or r.get("errors"):
                    note("warm-up %s %s: %s" % (cid, mode, r.get("failure") or r.get("error_messages")))
        total, done = rounds * len(cases) * len(SERVE_MODES), 0
        for rnd in range(rounds):
            modes = SERVE_MODES[rnd % 3:] + SERVE_MODES[:rnd % 3]   # each mode first in turn
            for cid, var, _, size, write in cases:
                for mode in modes:
                    if mode == "direct":
                        r = svq_run(devs[var], seconds, size, write, True, cpus, procs[var])
                    else:
                        r = serve_run(servers[var, mode[6:]], kinds[var], seconds, size, write,
                                      cpus, procs[var])
                    r.update(case=cid, mode=mode, round=rnd, placement="pinned")
                    runs.append(r)
                    done += 1
                    if "failure" in r or r.get("errors"):
                        note("serve round %d %s %s: %s" % (rnd, cid, mode,
                                                           r.get("failure") or r.get("error_messages")))
                    note("[%3d/%d %4.0fs] serve round %d %-16s %-17s %10s req/s" % (
                        done, total, time.monotonic() - t0, rnd + 1, cid, mode,
                        r.get("requests_per_second")))
        for var in used:
            cid, _, _, size, write = next(c for c in cases if c[1] == var)
            since = servers[var, "auto"].offset()
            r = serve_run(servers[var, "auto"], kinds[var], SWITCH_SECONDS, size, write, cpus,
                          procs[var], log_toggle=LOG_TOGGLE_SECONDS)
            found = SWITCH_RE.findall(servers[var, "auto"].text(since))    # the whole log
            r["switch_ms"] = {to: [float(ms) for t, ms, _ in found if t == to]
                              for to in ("shadow", "passthrough")}
            r["switch_how"] = sorted({how for _, _, how in found})
            r["case"] = cid
            switches[var] = r
            note("switches on %s: %d to shadow, %d to passthrough (%s)" % (
                devs[var], len(r["switch_ms"]["shadow"]), len(r["switch_ms"]["passthrough"]),
                ", ".join(r["switch_how"]) or r.get("failure") or "none"))
    finally:
        for srv in servers.values():
            srv.stop()
        place("free", [pid for p in procs.values() for pid in p])
    return runs, switches


def measure_rss(argv, warmup, seconds):
    """Peak of (VmRSS - RssShmem) over a run, sampled every 50 ms after warmup."""
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    best = None
    t0 = time.monotonic()
    try:
        while p.poll() is None and time.monotonic() - t0 < seconds + 30:
            time.sleep(0.05)
            if time.monotonic() - t0 < warmup:
                continue
            st = proc_status_kib(p.pid)
            if "VmRSS" in st and "RssShmem" in st:
                own = st["VmRSS"] - st["RssShmem"]
                if best is None or own > best["own_kib"]:
                    best = dict(st, own_kib=own)
    finally:
        if p.poll() is None:
            p.terminate()
        _, err = p.communicate()
    if best is None:
        return {"failure": err.decode(errors="replace")[-400:]}
    best["rc"] = p.returncode
    return best


def cmd_vm(args):
    """Runs inside the VM: all device benchmarks, then memory; writes JSON."""
    devs = {}
    for var in ("SVQ_NET_DEV", "SVQ_BLK_DEV", "SVQ_VDUSE_DEV"):
        if os.environ.get(var):
            devs[var] = os.environ[var]
    cases = [c for c in DEVICE_CASES if c[1] in devs and
             (not args.only or any(c[0].startswith(o) for o in args.only.split(",")))]
    placements = PLACEMENTS if args.placement == "both" else (args.placement,)
    if (os.cpu_count() or 1) < 2 and "pinned" in placements:
        note("one CPU: nothing to pin, every run is placed freely")
        placements = ("free",)
    out = {"machine": machine(), "rounds": args.rounds, "seconds": args.seconds,
           "devices": devs, "runs": [], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "placements": list(placements), "cpus": {"driver": DRIVER_CPU, "host": HOST_CPU}}
    # The device's own work: vdpa_sim's kthread workers, qemu-storage-daemon.
    procs = {var: device_pids(dev) for var, dev in devs.items()}
    every = [pid for p in procs.values() for pid in p]
    out["device_processes"] = {var: sorted(p.values()) for var, p in procs.items()}
    t0 = time.monotonic()
    # Warm-up, discarded: the first run of each case in a process is the
    # slowest (new code paths to translate under TCG, caches); without this
    # the first round's first mode pays for it.
    cpus = place(placements[0], every)
    for cid, var, _, size, write in cases:
        for mode in ("direct", "shadow"):
            r = svq_run(devs[var], WARMUP_SECONDS, size, write, mode == "direct", cpus)
            if "failure" in r or r.get("errors"):
                note("warm-up %s %s: %s" % (cid, mode, r.get("failure") or r.get("error_messages")))
    note("warm-up done (%.0f s)" % (time.monotonic() - t0))
    out["warmup_seconds"] = WARMUP_SECONDS
    total = args.rounds * len(cases) * 2 * len(placements)
    done = 0
    for rnd in range(args.rounds):
        # Alternate which mode (and placement) goes first so that neither
        # always runs second.
        modes = ("direct", "shadow") if rnd % 2 == 0 else ("shadow", "direct")
        order = placements if rnd % 2 == 0 else placements[::-1]
        for cid, var, _, size, write in cases:
            for placement in order:
                cpus = place(placement, every)
                for mode in modes:
                    r = svq_run(devs[var], args.seconds, size, write, mode == "direct", cpus,
                                procs[var])
                    r.update(case=cid, mode=mode, round=rnd, placement=placement)
                    out["runs"].append(r)
                    done += 1
                    if "failure" in r or r.get("errors"):
                        note("round %d %s %s: %s" % (rnd, cid, mode,
                                                     r.get("failure") or r.get("error_messages")))
                    note("[%3d/%d %4.0fs] round %d %-16s %-6s %-6s %10s req/s" % (
                        done, total, time.monotonic() - t0, rnd + 1, cid, placement, mode,
                        r.get("requests_per_second")))
    place("free", every)
    scases = [c for c in cases if c[0] in SERVE_CASES]
    if scases and args.serve_rounds:
        folder = tempfile.mkdtemp(prefix="svqbench")
        try:
            out["serve_runs"], out["switches"] = serve_bench(
                devs, procs, scases, args.serve_rounds, args.seconds, folder, t0)
        except (RuntimeError, OSError) as e:
            note("serve benchmarks: %s" % e)
            out["serve_failure"] = str(e)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        out["serve_rounds"] = args.serve_rounds
    # Resident memory of svq.py run beyond the guest memory (shared) it maps.
    mem = {}
    py = sys.executable
    if "SVQ_NET_DEV" in devs:
        for mode in ("shadow", "direct"):
            argv = [py, SVQ, "run", devs["SVQ_NET_DEV"], "--json", "--seconds", "3"]
            if mode == "direct":
                argv.append("--direct")
            mem["net-" + mode] = measure_rss(argv, 1.0, 3)
    if "SVQ_BLK_DEV" in devs:
        mem["blk-64k-write-shadow"] = measure_rss(
            [py, SVQ, "run", devs["SVQ_BLK_DEV"], "--json", "--seconds", "3",
             "--size", "65536", "--write"], 1.0, 3)
    mem["python-import-svq"] = measure_rss(
        [py, "-c", "import sys, time; sys.path.insert(0, %r); import svq; time.sleep(1.5)"
         % ROOT], 1.0, 1.5)
    mem["python-bare"] = measure_rss([py, "-c", "import time; time.sleep(1.5)"], 1.0, 1.5)
    out["memory"] = mem
    out["elapsed"] = round(time.monotonic() - t0, 1)
    # On stdout between markers (the host reads it from the console), and in
    # SVQ_OUT as well (vm/run may prune the run folder of a long run).
    sys.stdout.write("%s\n%s\n%s\n" % (JSON_BEGIN, json.dumps(out, indent=0), JSON_END))
    sys.stdout.flush()
    try:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        note("device results in %s (%.0f s)" % (args.out, out["elapsed"]))
    except OSError as e:
        note("could not write %s: %s" % (args.out, e))
    return 0


def run_vm(args):
    """Host side: one vm/run for all device benchmarks; returns the VM's JSON."""
    env = dict(os.environ)
    env.setdefault("SVQ_VM_TIMEOUT", "2400")
    name = "bench-vm-%d.json" % os.getpid()
    inner = ("exec %s bench.py vm --rounds %d --serve-rounds %d --seconds %s --placement %s "
             "--out \"$SVQ_OUT/%s\"%s"
             % ("python3", args.rounds, args.serve_rounds, args.seconds, args.placement, name,
                " --only %s" % args.only if args.only else ""))
    argv = [sys.executable, os.path.join(ROOT, "vm", "run"), "sh", "-c", inner]
    note("device benchmarks in the VM: %d rounds x %s s x 2 modes, placement %s"
         % (args.rounds, args.seconds, args.placement))
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                         env=env, universal_newlines=True, errors="replace")
    out_dir = None
    lines = None
    for line in p.stdout:
        if line.strip() == JSON_BEGIN:
            lines = []
            continue
        if lines is not None and line.strip() == JSON_END:
            text, lines = "".join(lines), None
            continue
        if lines is not None:
            lines.append(line)
            continue
        sys.stderr.write(line)
        m = re.search(r"SVQ_OUT on the host: (\S+)", line)
        if m:
            out_dir = m.group(1)
    rc = p.wait()
    data = None
    try:
        data = json.loads(text)
    except (NameError, ValueError):
        if out_dir:
            try:
                with open(os.path.join(out_dir, name)) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                pass
    if data is None:
        note("vm/run exit %d; no device results" % rc)
    elif rc != 0:
        note("vm/run exit %d; using the results it printed" % rc)
    return data


def ratios(row):
    """(paired, of_medians): the median of the per-round shadow/direct ratios,
    and shadow median / direct median.  Results files before the paired ratio
    became the headline kept the ratio of medians in "ratio"."""
    per = row.get("round_ratios") or []
    of_medians = row.get("ratio_of_medians", row.get("ratio"))
    return (round(median(per), 3) if per else of_medians), of_medians


def _mode_summary(runs, mode):
    """(summary, failed runs) of the runs of one mode: median [min-max] of
    requests/s and Mbit/s, integrity errors, and each process's CPU per
    request (median over the rounds)."""
    mine = [r for r in runs if r["mode"] == mode]
    ok = [r for r in mine if "failure" not in r and r.get("requests")]
    out = {"n": len(ok), "errors": sum(r.get("errors") or 0 for r in ok)}
    for key, field in (("rps", "requests_per_second"), ("mbit", "mbit_per_second")):
        xs = [r[field] for r in ok]
        out.update({key: median(xs), key + "_min": min(xs) if xs else None,
                    key + "_max": max(xs) if xs else None})
    for who in ("driver", "svq", "device"):
        us = [r["cpu_seconds"][who] * 1e6 / r["requests"] for r in ok
              if (r.get("cpu_seconds") or {}).get(who) is not None]
        out["cpu_us_" + who] = median(us)
    return out, len(mine) - len(ok)


def _round_ratios(runs, rounds, mode, base="direct"):
    """mode/base within each round (the two runs side by side, so a slow
    spell of the host falls on both); rounds with a failed run left out."""
    per = []
    for rnd in range(rounds):
        pair = {r["mode"]: r.get("requests_per_second") for r in runs
                if r["round"] == rnd and "failure" not in r}
        if pair.get(base) and pair.get(mode):
            per.append(pair[mode] / pair[base])
    return [round(x, 3) for x in per], (round(median(per), 3) if per else None)


def summarize_devices(vm, placement=None):
    """One row per case, of the runs with `placement` (None: all; results
    files from before placements were recorded hold only free runs)."""
    rows = []
    for cid, var, label, size, write in DEVICE_CASES:
        runs = [r for r in vm["runs"] if r["case"] == cid
                and placement in (None, r.get("placement", "free"))]
        if not runs:
            continue
        row = {"case": cid, "device": label, "size": size, "write": write, "failed_runs": 0}
        for mode in ("direct", "shadow"):
            row[mode], failed = _mode_summary(runs, mode)
            row["failed_runs"] += failed
        d, s = row["direct"]["rps"], row["shadow"]["rps"]
        row["ratio_of_medians"] = round(s / d, 3) if d and s else None
        # The ratio: shadow/direct within each round, median over the rounds.
        row["round_ratios"], row["ratio"] = _round_ratios(runs, vm["rounds"], "shadow")
        rows.append(row)
    return rows


def summarize_serve(vm):
    """One row per serve case: each mode's median [min-max], and serve's
    modes against run --direct within each round, median over the rounds."""
    rows = []
    runs = vm.get("serve_runs") or []
    for cid, var, label, size, write in DEVICE_CASES:
        mine = [r for r in runs if r["case"] == cid]
        if not mine:
            continue
        row = {"case": cid, "device": label, "size": size, "write": write, "failed_runs": 0}
        for mode in SERVE_MODES:
            row[mode], failed = _mode_summary(mine, mode)
            row["failed_runs"] += failed
        for mode in SERVE_MODES[1:]:
            row[mode]["round_ratios"], row[mode]["ratio"] = _round_ratios(
                mine, vm.get("serve_rounds") or 0, mode)
        rows.append(row)
    return rows


def summarize_switches(vm):
    rows = []
    for var, r in sorted((vm.get("switches") or {}).items()):
        case = next(c for c in DEVICE_CASES if c[0] == r.get("case"))
        ms = r.get("switch_ms") or {}
        acks = r.get("log_toggle_ms") or {}
        rows.append({"device": case[2], "case": r.get("case"), "failure": r.get("failure"),
                     "errors": r.get("errors"), "how": r.get("switch_how") or [],
                     "requests_per_second": r.get("requests_per_second"),
                     "to_shadow": ms.get("shadow") or [], "to_passthrough": ms.get("passthrough") or [],
                     "ack_on": acks.get("on") or [], "ack_off": acks.get("off") or []})
    return rows


def _ms(xs):
    if not xs:
        return "-"
    return "%.1f [%.1f-%.1f]" % (median(xs), min(xs), max(xs))


def format_serve(rows, switches, vm):
    L = ["", "serve (vhost-user): the built-in driver as serve's frontend (`svq.py run SOCKET "
         "--type T`), beside `svq.py run --direct` in each round;",
         "%d rounds of %s s, pinned (driver on vCPU %d; serve, its worker and the device's threads "
         "on vCPU %d); ratio = within each round, median [min-max]."
         % (vm.get("serve_rounds") or 0, vm["seconds"], DRIVER_CPU, HOST_CPU), "",
         "| benchmark | unit | direct | serve passthrough | serve shadow | passthrough/direct "
         "| shadow/direct | CPU us/req: driver direct, serve shadow's svq |",
         "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        unit, key, digits = device_metric(row)
        cells = []
        for mode in SERVE_MODES:
            m = row[mode]
            cells.append(_cell(_scaled(m, "mbit", 1 / 8) if key == "mbit" else m, key, digits))
        rat = []
        for mode in SERVE_MODES[1:]:
            per = row[mode]["round_ratios"]
            rat.append("%.3f [%.2f-%.2f]" % (row[mode]["ratio"], min(per), max(per)) if per else "-")
        flags = []
        if row["failed_runs"]:
            flags.append("%d failed runs" % row["failed_runs"])
        if any(row[m]["errors"] for m in SERVE_MODES):
            flags.append("integrity errors")
        L.append("| %s | %s | %s | %s | %s | %s | %s | %s -> %s, svq %s%s |" % (
            _case_label(row), unit, cells[0], cells[1], cells[2], rat[0], rat[1],
            _fmt(row["direct"]["cpu_us_driver"]), _fmt(row["serve-shadow"]["cpu_us_driver"]),
            _fmt(row["serve-shadow"]["cpu_us_svq"]), "; " + ", ".join(flags) if flags else ""))
    if switches:
        L += ["", "Switch time: serve --mode auto while the driver turns dirty logging on and off "
              "every %g s for %g s (as migrations that start and fail do);" % (
                  LOG_TOGGLE_SECONDS, SWITCH_SECONDS),
              "serve's log: device stopped taking requests -> device running again, in ms, "
              "median [min-max]; ack = SET_FEATURES sent -> its REPLY_ACK, as the frontend sees it.",
              "", "| device | to shadow | to passthrough | switches | how | ack on | ack off | "
              "req/s meanwhile | integrity errors |", "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
        for w in switches:
            L.append("| %s | %s | %s | %d | %s | %s | %s | %s | %s |" % (
                w["device"], _ms(w["to_shadow"]), _ms(w["to_passthrough"]),
                len(w["to_shadow"]) + len(w["to_passthrough"]), ", ".join(w["how"]) or "-",
                _ms(w["ack_on"]), _ms(w["ack_off"]), _fmt(w["requests_per_second"]),
                w["failure"] or w["errors"]))
    return L


# ============================================================================
# Copier benchmark (host, no device)
# ============================================================================

class Copier:
    """A guest split ring with a minimal driver, a ShadowVirtqueue, and a
    device stand-in completing chains synchronously.  shadow=False completes
    the guest ring itself (driver + device only: the baseline).  The driver
    posts the same chains again and again; with rewrite=True it changes one
    length in each chain it posts, so that its descriptor table differs on
    every batch (as a Linux guest's does).  copied=True makes the shadow use
    QEMU's copied layout instead of mirroring."""

    GUEST_BASE = 0x100000
    IOVA_OFFSET = 0x40000000
    BUF = 1500
    HDR = 12

    def __init__(self, chain, batch, shadow=True, notify=True, num=256, rewrite=False, copied=False,
                 translate=False):
        import svq
        self.svq_mod = svq
        self.chain, self.batch, self.shadow, self.notify, self.num = chain, batch, shadow, notify, num
        self.rewrite = rewrite
        self.nheads = 1 << ((num // chain).bit_length() - 1)   # a power of two
        if batch > self.nheads:
            raise ValueError("batch %d > %d chains" % (batch, self.nheads))
        total, doff, aoff, uoff = svq.SplitRing.layout(num)
        ring_bytes = svq.page_align_up(total)
        buf_base = self.GUEST_BASE + ring_bytes
        mem_size = ring_bytes + svq.page_align_up(self.nheads * 2048)
        self.mem = mem = svq.GuestMemory.anonymous([(self.GUEST_BASE, mem_size)])
        for r in mem.regions:
            # As run and serve map guest memory: IOVA = GPA (translate=True:
            # elsewhere, so that every buffer is translated).
            r.iova = r.gpa + (self.IOVA_OFFSET if translate else 0)
        view = mem.view(self.GUEST_BASE, total)
        self.gring = svq.SplitRing(num, view[doff:aoff], view[aoff:uoff], view[uoff:total])
        self.used_gpa = self.GUEST_BASE + uoff
        # The chains are posted once; each round trip reposts them by head.
        D = svq._DESC
        self.heads = []
        for h in range(self.nheads):
            gpa = buf_base + h * 2048
            first = h * chain
            if chain == 1:      # one writable buffer (net RX)
                D.pack_into(self.gring.desc, first * 16, gpa, self.BUF, svq.VRING_DESC_F_WRITE, 0)
            else:               # readable header, then writable buffers (blk read)
                D.pack_into(self.gring.desc, first * 16, gpa, self.HDR,
                            svq.VRING_DESC_F_NEXT, first + 1)
                for k in range(1, chain):
                    last = k == chain - 1
                    D.pack_into(self.gring.desc, (first + k) * 16, gpa + 64 + (k - 1) * 512,
                                self.BUF if chain == 2 else 512,
                                svq.VRING_DESC_F_WRITE | (0 if last else svq.VRING_DESC_F_NEXT),
                                0 if last else first + k + 1)
            self.heads.append(first)
        self.used_len = self.BUF if chain <= 2 else 512 * (chain - 1)
        self.fds = []
        guest_features = (1 << svq.VIRTIO_RING_F_EVENT_IDX) | (1 << svq.VIRTIO_RING_F_INDIRECT_DESC)
        device_features = 0     # like vdpa_sim: no event index on the device side
        if shadow:
            self.smem = svq.SharedMemory(total)
            sm = self.smem.mv
            self.sring = svq.SplitRing(num, sm[doff:aoff], sm[aoff:uoff], sm[uoff:total])
            fds = [svq.eventfd() for _ in range(4)]
            self.fds = fds
            self.log = svq.DirtyLog(mem.size >> svq.PAGE_SHIFT)
            self.q = svq.ShadowVirtqueue(
                0, mem, self.gring, self.sring, (0x1000, 0x2000, 0x3000),
                guest_features, device_features, fds[0], fds[1], fds[2], fds[3],
                log=self.log, log_used_gpa=self.used_gpa, mirror=not copied)
            dev_ring = self.sring
        else:
            self.smem = None
            self.q = None
            dev_ring = self.gring
        self.dev_ring = dev_ring
        self.views = []
        if not notify:
            # A polling device: it asks for no kicks.
            dev_ring.used16[0] = svq.VRING_USED_F_NO_NOTIFY

    def close(self):
        for fd in self.fds:
            os.close(fd)
        for v in self.views:
            v.release()
        for ring in (self.gring, getattr(self, "sring", None)):
            if ring is not None:
                ring.release()
        self.q = self.gring = self.sring = self.dev_ring = None
        if self.smem is not None:
            self.smem.close()
        self.mem.close()

    def make_loop(self):
        """The measured loop, as a closure over locals: run(n_batches)."""
        USED = struct.Struct("<II")
        pack_used, unpack_used = USED.pack_into, USED.unpack_from
        g = self.gring
        gavail16, gused, gused16 = g.avail16, g.used, g.used16
        used_event_i = g.used_event_i
        davail16, dused, dused16 = self.dev_ring.avail16, self.dev_ring.used, self.dev_ring.used16
        mask = self.num - 1
        hmask = self.nheads - 1
        heads = self.heads
        batch = self.batch
        used_len = self.used_len
        notify = self.notify
        q = self.q
        forward = q.forward_avail if q is not None else None
        flush = q.flush if q is not None else None
        state = {"aidx": 0, "dev_last": 0, "drv_used": 0, "bad": 0}
        # rewrite: the length word of each chain's last descriptor.
        glen32 = g.desc.cast("I") if self.rewrite else None
        if glen32 is not None:
            self.views.append(glen32)   # released by close(): the closure outlives it
        len_word = [(h + self.chain - 1) * 4 + 2 for h in heads]
        base_len = self.BUF if self.chain <= 2 else 512
        nheads = self.nheads

        def run(n):
            aidx, dev_last, drv_used = state["aidx"], state["dev_last"], state["drv_used"]
            bad = 0
            for _ in range(n):
                # Driver: post `batch` chains and publish the avail index.
                if glen32 is not None:
                    flip = base_len + (aidx // nheads & 1)   # each repost differs
                    for k in range(aidx, aidx + batch):
                        glen32[len_word[k & hmask]] = flip
                for k in range(aidx, aidx + batch):
                    gavail16[2 + (k & mask)] = heads[k & hmask]
                aidx = (aidx + batch) & 0xffff
                gavail16[1] = aidx
                if forward is not None:
                    forward()
                # Device stand-in: complete everything available, in order.
                end = davail16[1]
                i = dev_last
                while i != end:
                    pack_used(dused, 4 + (i & mask) * 8, davail16[2 + (i & mask)], used_len)
                    i = (i + 1) & 0xffff
                dev_last = i
                dused16[1] = i
                if flush is not None:
                    flush()
                # Driver: consume the used entries, check them, re-arm calls.
                uend = gused16[1]
                while drv_used != uend:
                    head, length = unpack_used(gused, 4 + (drv_used & mask) * 8)
                    if head != heads[drv_used & hmask] or length != used_len:
                        bad += 1
                    drv_used = (drv_used + 1) & 0xffff
                gavail16[used_event_i] = drv_used if notify else (drv_used + 0x8000) & 0xffff
            state.update(aidx=aidx, dev_last=dev_last, drv_used=drv_used)
            state["bad"] += bad
            if drv_used != aidx:
                raise RuntimeError("copier lost requests: %d posted, %d returned" % (aidx, drv_used))
        return run, state


def copier_case(chain, batch, shadow=True, notify=True, seconds=0.25, reps=5, variant=""):
    """Median over reps of a timed run: round trips/s (wall), CPU us/request,
    eventfd writes per request done by svq."""
    c = Copier(chain, batch, shadow, notify, rewrite=variant == "rewritten",
               copied=variant == "copied")
    try:
        run, state = c.make_loop()
        run(max(1, 2048 // batch))                      # warm up
        # Calibrate: batches per timed chunk of about 20 ms.
        n = max(1, 256 // batch)
        while True:
            t = time.perf_counter()
            run(n)
            if time.perf_counter() - t > 0.02:
                break
            n *= 2
        rates, cpus = [], []
        stats = c.q.stats if c.q is not None else None
        k0 = (stats.device_kicks, stats.guest_calls) if stats else (0, 0)
        walks0 = stats.walks if stats else 0
        reqs_total = 0
        for _ in range(reps):
            reqs = 0
            w0, c0 = time.perf_counter(), time.process_time()
            while time.perf_counter() - w0 < seconds:
                run(n)
                reqs += n * batch
            w1, c1 = time.perf_counter(), time.process_time()
            rates.append(reqs / (w1 - w0))
            cpus.append((c1 - c0) / reqs * 1e6)
            reqs_total += reqs
        if state["bad"]:
            raise RuntimeError("copier returned %d wrong used entries" % state["bad"])
        res = {"chain": chain, "batch": batch, "mode": "shadow" if shadow else "baseline",
               "notify": notify, "variant": variant, "round_trips_per_s": median(rates),
               "rate_min": min(rates), "rate_max": max(rates),
               "cpu_us_per_req": median(cpus), "requests": reqs_total}
        if stats:
            res["device_kicks_per_req"] = (stats.device_kicks - k0[0]) / reqs_total
            res["guest_calls_per_req"] = (stats.guest_calls - k0[1]) / reqs_total
            res["dirty_pages"] = c.log.count()
            res["chain_walks_per_req"] = (stats.walks - walks0) / reqs_total
        return res
    finally:
        c.close()


def ring_copier_case(packed, batch=64, seconds=0.25, reps=5, num=256, copied=False):
    """Split against packed guest rings, each driven by svq.py's own driver
    class (SplitDriver from its free list, as a kernel driver: the shadow
    walks every chain; PackedDriver), through a ShadowVirtqueue to a split
    shadow ring completed by a stand-in device.  svq's time is measured
    directly: the wall time inside forward_avail() and flush().  Returns
    round trips/s, total CPU and svq's time per request."""
    import svq
    GUEST = 0x100000
    ring_bytes = svq.page_align_up(max(svq.SplitRing.layout(num)[0], svq.PackedRing.layout(num)[0]))
    mem = svq.GuestMemory.anonymous([(GUEST, ring_bytes + num * 2048)])
    for r in mem.regions:
        r.iova = r.gpa
    feats = (1 << svq.VIRTIO_RING_F_EVENT_IDX) | ((1 << svq.VIRTIO_F_RING_PACKED) if packed else 0)
    fds = [svq.eventfd() for _ in range(4)]
    drv = svq.driver_queue(0, mem, num, GUEST, feats, fds[0], fds[1])
    total, doff, aoff, uoff = svq.SplitRing.layout(num)
    smem = svq.SharedMemory(total)
    sring = svq.SplitRing(num, smem.mv[doff:aoff], smem.mv[aoff:uoff], smem.mv[uoff:total])
    log = svq.DirtyLog(mem.size >> svq.PAGE_SHIFT)
    q = svq.ShadowVirtqueue(0, mem, drv.ring, sring, (0x1000, 0x2000, 0x3000), feats, 0,
                            fds[0], fds[1], fds[2], fds[3], log=log, log_used_gpa=drv.used_gpa,
                            guest_gpas=(drv.desc_gpa, drv.used_gpa) if packed else None,
                            mirror=not copied)
    chains = [[(GUEST + ring_bytes + k * 2048, 12, False),
               (GUEST + ring_bytes + k * 2048 + 64, 1500, True)] for k in range(batch)]
    davail16, dused, dused16, mask = sring.avail16, sring.used, sring.used16, num - 1
    pack_used = struct.Struct("<II").pack_into
    st = {"dev_last": 0, "svq": 0.0}
    clock = time.perf_counter

    def run(n):
        dev_last, t_svq = st["dev_last"], 0.0
        for _ in range(n):
            for k in range(batch):
                drv.add(chains[k], k)
            drv.publish()
            t0 = clock()
            q.forward_avail()
            t1 = clock()
            end = davail16[1]
            i = dev_last
            while i != end:
                pack_used(dused, 4 + (i & mask) * 8, davail16[2 + (i & mask)], 1500)
                i = (i + 1) & 0xffff
            dev_last = i
            dused16[1] = i
            t2 = clock()
            q.flush()
            t_svq += t1 - t0 + clock() - t2
            got = 0
            while drv.get_used() is not None:
                got += 1
            if got != batch:
                raise RuntimeError("ring copier: %d of %d came back" % (got, batch))
        st["dev_last"] = dev_last
        st["svq"] += t_svq
    try:
        run(64)
        rates, cpus, svqs = [], [], []
        for _ in range(reps):
            reqs, st["svq"] = 0, 0.0
            w0, c0 = time.perf_counter(), time.process_time()
            while time.perf_counter() - w0 < seconds:
                run(8)
                reqs += 8 * batch
            w1, c1 = time.perf_counter(), time.process_time()
            rates.append(reqs / (w1 - w0))
            cpus.append((c1 - c0) / reqs * 1e6)
            svqs.append(st["svq"] / reqs * 1e6)
        return {"ring": "packed" if packed else "split", "chain": 2, "batch": batch,
                "round_trips_per_s": median(rates), "rate_min": min(rates),
                "rate_max": max(rates), "cpu_us_per_req": median(cpus),
                "svq_us_per_req": median(svqs), "dirty_pages": log.count(),
                "layout": "copied" if packed or not q.mirror else "mirrored",
                "walks_per_req": q.stats.walks / max(q.stats.requests, 1)}
    finally:
        q.release()
        drv.release()
        smem.close()
        mem.close()
        for fd in fds:
            os.close(fd)


COPIER_CASES = [
    # chain, batch, notify, variant ("": the same chains again and again,
    # mirrored; "rewritten": the driver changes its table every batch;
    # "copied": QEMU's layout, a free list of shadow descriptors)
    (1, 64, True, ""), (2, 64, True, ""), (1, 1, True, ""), (2, 1, True, ""),
    (2, 64, False, ""), (3, 64, True, ""), (2, 64, True, "rewritten"), (2, 64, True, "copied"),
]


RING_COPIER_CASES = [(False, False), (False, True), (True, False)]     # (packed, copied)


def ring_copier_bench(seconds=0.25, reps=5):
    note("ring copier: svq.py's own drivers on split and packed guest rings (host, one core)")
    out = []
    for packed, copied in RING_COPIER_CASES:
        r = ring_copier_case(packed, seconds=seconds, reps=reps, copied=copied)
        out.append(r)
        note("  %-6s %-8s %8.0f round trips/s  svq %.2f us/req  (total CPU %.2f us/req)" % (
            r["ring"], r["layout"], r["round_trips_per_s"], r["svq_us_per_req"],
            r["cpu_us_per_req"]))
    return out


def copier_bench(seconds=0.25, reps=5):
    note("copier benchmark (host, one core)")
    rows = []
    for chain, batch, notify, variant in COPIER_CASES:
        b = copier_case(chain, batch, shadow=False, notify=notify, seconds=seconds, reps=reps,
                        variant=variant)
        s = copier_case(chain, batch, shadow=True, notify=notify, seconds=seconds, reps=reps,
                        variant=variant)
        s["baseline_round_trips_per_s"] = b["round_trips_per_s"]
        s["baseline_cpu_us_per_req"] = b["cpu_us_per_req"]
        # What the shadow virtqueue itself costs: shadow minus baseline loop.
        s["svq_cpu_us_per_req"] = s["cpu_us_per_req"] - b["cpu_us_per_req"]
        s["id"] = "%ddesc-b%d%s%s" % (chain, batch, "" if notify else "-polled",
                                      "-" + variant if variant else "")
        rows.append(s)
        note("  %-14s %9.0f round trips/s  %.2f us CPU/req (svq %.2f)  baseline %9.0f/s"
             % (s["id"], s["round_trips_per_s"], s["cpu_us_per_req"],
                s["svq_cpu_us_per_req"], b["round_trips_per_s"]))
    return rows


def load_svq(path):
    """Make `import svq` load `path` (to try a changed svq.py on the copier)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("svq", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["svq"] = mod
    spec.loader.exec_module(mod)
    note("copier uses %s" % path)
    return mod


def cmd_timeline(args):
    """(Inside the VM) Where one round of requests spends its time, direct
    and shadow: the driver's and svq's handlers are time-stamped, and the
    rounds (driver handler to driver handler) split into phases."""
    cid, var, _, size, write = [c for c in DEVICE_CASES if c[0] == args.case][0]
    dev = os.environ.get(var)
    if not dev:
        note("%s is not set: run this inside the VM (python3 vm/run python3 bench.py "
             "timeline)" % var)
        return 2
    import svq
    events = []                         # (start, end, what)

    def stamp(cls, name, what):
        fn = getattr(cls, name)

        def timed(self, *a):
            t = time.monotonic()
            try:
                return fn(self, *a)
            finally:
                events.append((t, time.monotonic(), what))
        setattr(cls, name, timed)
    stamp(svq.Driver, "handle_call", "driver")
    stamp(svq.ShadowVirtqueue, "handle_guest_kick", "kick")
    stamp(svq.ShadowVirtqueue, "handle_device_call", "call")
    stamp(svq.ShadowVirtqueue, "_call_guest", "guest call")
    guest_process = svq.BuiltinRun._guest_process
    child_out = "/tmp/bench-timeline-%d.json" % os.getpid()

    def traced_guest(self, wfd):
        try:
            guest_process(self, wfd)
        finally:                        # the child ends in os._exit: save first
            with open(child_out, "w") as f:
                json.dump(events, f)
    svq.BuiltinRun._guest_process = traced_guest
    device = device_pids(dev)
    cpus = place(args.placement, device)
    for direct in (True, False, True, False):
        del events[:]
        res = svq_run(dev, args.seconds, size, write, direct, cpus, device)
        if "failure" in res or not res.get("requests"):
            note("%s %s: %s" % (cid, "direct" if direct else "shadow",
                                res.get("failure") or "no request completed"))
            return 1
        with open(child_out) as f:
            evs = sorted([tuple(e) for e in json.load(f)] + events)
        os.unlink(child_out)
        print("%s %s: %s req/s, CPU us/req %s" % (
            cid, "direct" if direct else "shadow", res.get("requests_per_second"),
            {k: round(v * 1e6 / res["requests"], 1) for k, v in (res.get("cpu_seconds") or {}).items()
             if v is not None}))
        _print_phases(evs, direct)
    return 0


def _print_phases(evs, direct):
    """Median microseconds of each phase of a round; a round runs from the end
    of one driver handler (it has refilled and kicked) to the start of the
    next (the first completions have reached it)."""
    drv = [(a, b) for a, b, w in evs if w == "driver"]
    phases = {}

    def add(name, v):
        phases.setdefault(name, []).append(v * 1e6)
    for (s0, e0), (s1, e1) in zip(drv, drv[1:]):
        add("driver busy (handler)", e0 - s0)
        add("driver waiting", s1 - e0)
        if direct:
            continue
        inside = [(a, b, w) for a, b, w in evs if e0 <= a < s1 and w != "driver"]
        kick = next(((a, b) for a, b, w in inside if w == "kick"), None)
        call = next(((a, b) for a, b, w in inside if w == "call" and kick and a >= kick[1]), None)
        pub = next((a for a, b, w in inside if w == "guest call" and call and a >= call[0]), None)
        if kick and call and pub is not None:
            add("  guest kick -> svq wakes", kick[0] - e0)
            add("  svq forwards, kicks device", kick[1] - kick[0])
            add("  device -> first device call", call[0] - kick[1])
            add("  svq moves entries, calls guest", pub - call[0])
            add("  guest call -> driver runs", s1 - pub)
    for name, v in phases.items():
        print("  %-32s %8.0f us  (%d rounds)" % (name, median(v), len(v)))


def cmd_profile(args):
    import cProfile
    import pstats
    sys.path.insert(0, ROOT)
    if args.svq:
        load_svq(args.svq)
    c = Copier(args.chain, args.batch, True, not args.polled,
               rewrite=args.variant == "rewritten", copied=args.variant == "copied")
    try:
        run, _ = c.make_loop()
        run(100)
        n = max(1, 200000 // args.batch)
        prof = cProfile.Profile()
        prof.enable()
        run(n)
        prof.disable()
    finally:
        c.close()
    st = pstats.Stats(prof, stream=sys.stdout)
    print("cProfile: %d round trips of %d-descriptor chains, batch %d%s%s"
          % (n * args.batch, args.chain, args.batch, ", polled" if args.polled else "",
             ", " + args.variant if args.variant else ""))
    st.strip_dirs().sort_stats(args.sort).print_stats(args.top)
    return 0


# ============================================================================
# import time
# ============================================================================

def _import_runs(reps, where, flags, env):
    code = ("import sys, time; sys.path.insert(0, %r); t = time.perf_counter(); "
            "import svq; print(time.perf_counter() - t)" % where)
    times, walls = [], []
    for _ in range(reps):
        t = time.perf_counter()
        out = subprocess.check_output([sys.executable] + flags + ["-c", code], env=env,
                                      universal_newlines=True)
        walls.append(time.perf_counter() - t)
        times.append(float(out.strip()) * 1000)
    return times, walls


def import_time(reps=11):
    """`import svq` in a fresh interpreter, two ways, each from a copy of
    svq.py in a folder of its own: compiled from source (the headline: a copy
    on a read-only rescue image, or a first run, has no .pyc to load; -B
    writes none), and from the .pyc that a first import left there."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as pyc:
        for d in (src, pyc):
            shutil.copy(SVQ, d)
        times, walls = _import_runs(reps, src, ["-B"], env)
        _import_runs(1, pyc, [], env)                       # writes the .pyc
        if not os.path.isdir(os.path.join(pyc, "__pycache__")):
            raise RuntimeError("no .pyc was written in %s" % pyc)
        cached, _ = _import_runs(reps, pyc, [], env)
        bare = []
        for _ in range(reps):
            t = time.perf_counter()
            subprocess.check_call([sys.executable, "-c", "pass"], env=env)
            bare.append(time.perf_counter() - t)
        # -X importtime: svq.py's own part (self time of the svq module).
        self_us = None
        p = subprocess.run([sys.executable, "-B", "-X", "importtime", "-c",
                            "import sys; sys.path.insert(0, %r); import svq" % src], env=env,
                           stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, universal_newlines=True)
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s*(\d+)\s*\|\s*(\d+)\s*\|\s*svq$", line)
        if m:
            self_us = int(m.group(1))
    return {"import_ms": median(times), "import_ms_min": min(times), "import_ms_max": max(times),
            "import_cached_ms": median(cached), "import_cached_ms_min": min(cached),
            "import_cached_ms_max": max(cached),
            "svq_module_self_ms": self_us / 1000 if self_us is not None else None,
            "process_ms": median(walls) * 1000, "bare_python_ms": median(bare) * 1000,
            "reps": reps}


# ============================================================================
# Table, comparison
# ============================================================================

def _fmt(x, digits=0):
    if x is None:
        return "-"
    if digits == 0:
        return "{:,.0f}".format(x)
    return "{:,.{}f}".format(x, digits)


def _cell(m, key, digits=0):
    if not m or m.get(key) is None:
        return "-"
    return "%s [%s-%s]" % (_fmt(m[key], digits), _fmt(m[key + "_min"], digits),
                           _fmt(m[key + "_max"], digits))


def _case_label(row):
    if row["case"].startswith("net"):
        return "%s %d B frames" % (row["device"], row["size"])
    size = "4 KiB" if row["size"] == 4096 else "64 KiB" if row["size"] == 65536 else "%d B" % row["size"]
    return "%s %s %s" % (row["device"], size, "write+readback" if row["write"] else "read")


def device_metric(row):
    """(unit, key, digits, scale) of the main metric of a device row."""
    if row["case"].startswith("net"):
        return "frames/s", "rps", 0
    if row["size"] >= 65536:
        return "MB/s", "mbit", 1
    return "IOPS", "rps", 0


def _scaled(m, key, factor):
    if not m or m.get(key) is None:
        return m
    out = dict(m)
    for k in (key, key + "_min", key + "_max"):
        out[k] = m[k] * factor
    return out


def format_table(res):
    L = []
    mach = res["machine"]
    L.append("svq.py %s benchmarks, %s" % (res.get("svq_version") or "", res["date"]))
    L.append("Host: %s, %d CPUs, %s MiB, Linux %s, Python %s; commit %s" % (
        mach["cpu"], mach["cpus"], mach["memory_mib"], mach["kernel"], mach["python"],
        res.get("commit")))
    vm = res.get("vm")
    if res.get("devices"):
        vmm = vm["machine"]
        L.append("")
        L.append("Device benchmarks: VM rig (Linux %s, QEMU %s, %d vCPUs), "
                 "%d rounds of %s s per mode, direct and shadow interleaved;"
                 % (vmm["kernel"], vm.get("accel", "TCG"), vmm["cpus"], vm["rounds"], vm["seconds"]))
        L.append("median [min-max] of the rounds; shadow/direct = the ratio within each round "
                 "(the two runs side by side), median [min-max] over the rounds")
        L.append("(target >= %.2f; QEMU's C SVQ: %.2f); of medians = shadow median / direct median."
                 % (TARGET_RATIO, QEMU_C_SVQ_RATIO))
        L.append(_placement_line(res.get("placement", "free"), vm))
        L.append("")
        L.append("| benchmark | unit | direct | shadow | shadow/direct | of medians | also |")
        L.append("|---|---|---:|---:|---:|---:|---|")
        for row in res["devices"]:
            unit, key, digits = device_metric(row)
            d, s = row["direct"], row["shadow"]
            if key == "mbit":       # MB/s
                d, s = _scaled(d, "mbit", 1 / 8), _scaled(s, "mbit", 1 / 8)
            if row["case"].startswith("net"):
                also = "Mbit/s %s -> %s" % (_fmt(row["direct"]["mbit"], 1), _fmt(row["shadow"]["mbit"], 1))
            elif key == "mbit":
                also = "IOPS %s -> %s" % (_fmt(row["direct"]["rps"]), _fmt(row["shadow"]["rps"]))
            else:
                also = "MB/s %s -> %s" % (_fmt(_mb(row["direct"]), 1), _fmt(_mb(row["shadow"]), 1))
            cpu = s.get("cpu_us_svq") if s else None
            if cpu is not None:
                also += "; CPU us/req: driver %s -> %s, svq %s" % (
                    _fmt(d.get("cpu_us_driver") if d else None), _fmt(s.get("cpu_us_driver")),
                    _fmt(cpu))
                if s.get("cpu_us_device") is not None:
                    also += ", device %s -> %s" % (_fmt(d.get("cpu_us_device") if d else None),
                                                   _fmt(s.get("cpu_us_device")))
            flags = []
            if row.get("failed_runs"):
                flags.append("%d failed runs" % row["failed_runs"])
            if d and d.get("errors") or s and s.get("errors"):
                flags.append("integrity errors")
            paired, of_medians = ratios(row)
            per = row.get("round_ratios") or []
            ratio = "%.2f [%.2f-%.2f]" % (paired, min(per), max(per)) if per else _fmt(paired, 2)
            if flags:
                ratio += " (%s)" % ", ".join(flags)
            L.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                _case_label(row), unit, _cell(d, key, digits), _cell(s, key, digits), ratio,
                _fmt(of_medians, 2), also))
        L.append("")
        L.append("Blk \"write+readback\": svq.py run --write writes each block and reads it back "
                 "to verify; requests count both.")
        for other, rows in sorted((res.get("devices_by_placement") or {}).items()):
            L.extend(_placement_table(res["placement"], res["devices"], other, rows))
    if res.get("serve") or res.get("switches"):
        L.extend(format_serve(res.get("serve") or [], res.get("switches") or [], vm))
    cop = res.get("copier")
    if cop:
        L.append("")
        L.append("Copier (host, one core, no device): guest avail -> shadow ring -> device "
                 "stand-in -> shadow used -> guest used;")
        L.append("baseline = the same driver and stand-in on the guest ring, without svq; "
                 "svq CPU = shadow minus baseline.")
        L.append("")
        L.append("Mirrored layout unless said; \"table rewritten\": the driver changes its "
                 "descriptor table every batch, so each chain is walked again.")
        L.append("")
        L.append("| chains | batch | round trips/s | CPU us/req | svq CPU us/req | baseline round trips/s | "
                 "eventfd writes/req | walks/req |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        labels = {"": "", "rewritten": ", table rewritten", "copied": ", copied layout"}
        for r in cop:
            walks = r.get("chain_walks_per_req")
            L.append("| %d-desc%s%s | %d | %s [%s-%s] | %.2f | %.2f | %s | %.3f | %s |" % (
                r["chain"], "" if r["notify"] else ", polled", labels.get(r.get("variant", ""), ""),
                r["batch"], _fmt(r["round_trips_per_s"]), _fmt(r["rate_min"]), _fmt(r["rate_max"]),
                r["cpu_us_per_req"], r["svq_cpu_us_per_req"], _fmt(r["baseline_round_trips_per_s"]),
                r["device_kicks_per_req"] + r["guest_calls_per_req"],
                "-" if walks is None else "%.2f" % walks))
    rc = res.get("ring_copier")
    if rc:
        L.append("")
        L.append("Split against packed guest rings (host, one core): svq.py's own driver classes "
                 "(SplitDriver from its free list, PackedDriver), 2-descriptor chains, batch 64,")
        L.append("through the shadow to a split shadow ring and a device stand-in; svq = the time "
                 "inside forward_avail() and flush(), measured directly.")
        L.append("")
        L.append("| guest ring | layout | round trips/s | svq us/req | total CPU us/req | walks/req |")
        L.append("|---|---|---:|---:|---:|---:|")
        for r in rc:
            L.append("| %s | %s | %s [%s-%s] | %.2f | %.2f | %.2f |" % (
                r["ring"], r["layout"], _fmt(r["round_trips_per_s"]), _fmt(r["rate_min"]),
                _fmt(r["rate_max"]), r["svq_us_per_req"], r["cpu_us_per_req"], r["walks_per_req"]))
    imp = res.get("import")
    mem = (vm or {}).get("memory") or {}
    if imp or mem:
        L.append("")
        L.append("| footprint | value | target |")
        L.append("|---|---:|---:|")
        if imp:
            L.append("| `import svq`, compiled from source (fresh interpreter, no .pyc; median of %d) "
                     "| %.1f ms [%.1f-%.1f] | < %.0f ms |"
                     % (imp["reps"], imp["import_ms"], imp["import_ms_min"], imp["import_ms_max"],
                        TARGET_IMPORT_MS))
            if imp.get("import_cached_ms") is not None:
                L.append("| `import svq` from a cached .pyc | %.1f ms [%.1f-%.1f] | |"
                         % (imp["import_cached_ms"], imp["import_cached_ms_min"],
                            imp["import_cached_ms_max"]))
            L.append("| python3 -c pass / -c 'import svq' process | %.0f ms / %.0f ms | |"
                     % (imp["bare_python_ms"], imp["process_ms"]))
        for key, label in (("net-shadow", "svq.py run net, shadow"),
                           ("net-direct", "svq.py run net, direct"),
                           ("blk-64k-write-shadow", "svq.py run blk 64 KiB --write, shadow"),
                           ("python-import-svq", "python3 after import svq, idle"),
                           ("python-bare", "python3, nothing imported, idle")):
            m = mem.get(key)
            if not m or "own_kib" not in m:
                continue
            L.append("| RSS %s: VmRSS - RssShmem (VmRSS, RssShmem) | %.1f MiB (%.1f, %.1f) | %s |"
                     % (label, m["own_kib"] / 1024, m["VmRSS"] / 1024, m["RssShmem"] / 1024,
                        "< %.0f MiB" % TARGET_RSS_MIB if key.startswith("net-shadow") else ""))
    L.append("")
    L.extend(targets(res))
    return "\n".join(L)


def _placement_line(placement, vm):
    if placement == "free":
        return "Placement: free (the scheduler places the driver, svq and the device's threads)."
    cpus = vm.get("cpus") or {"driver": DRIVER_CPU, "host": HOST_CPU}
    return ("Placement: pinned, in both modes: the driver (the guest's vCPU) alone on vCPU %d; "
            "svq and the device's threads (%s) on vCPU %d."
            % (cpus["driver"], ", ".join(sorted({c for p in (vm.get("device_processes") or {}).values()
                                                for c in p})) or "none found",
               cpus["host"]))


def _placement_table(head, head_rows, other, rows):
    """The same benchmarks in another placement, from the same rounds."""
    L = ["", "The same rounds, placement %s beside %s (each round ran both):" % (other, head), "",
         "| benchmark | shadow/direct, %s | shadow/direct, %s | direct, %s -> %s | "
         "shadow, %s -> %s |" % (other, head, other, head, other, head),
         "|---|---:|---:|---:|---:|"]
    by_case = {r["case"]: r for r in rows}
    for row in head_rows:
        o = by_case.get(row["case"])
        if not o:
            continue
        _, key, digits = device_metric(row)
        scale = 1 / 8 if key == "mbit" else 1          # MB/s, as in the main table
        cells = ["%s -> %s" % (_fmt(_scaled(o[mode], key, scale).get(key), digits),
                               _fmt(_scaled(row[mode], key, scale).get(key), digits))
                 for mode in ("direct", "shadow")]
        L.append("| %s | %s | %s | %s | %s |" % (
            _case_label(row), _fmt(ratios(o)[0], 2), _fmt(ratios(row)[0], 2), cells[0], cells[1]))
    return L


def _mb(m):
    return m["mbit"] / 8 if m and m.get("mbit") is not None else None


def targets(res):
    out = ["Targets:"]
    tables = [(res.get("placement"), res.get("devices") or [])]
    tables += sorted((res.get("devices_by_placement") or {}).items())
    for placement, rows in tables:
        if not rows:
            continue
        paired = [(r["case"], ratios(r)[0]) for r in rows]
        missed = [(c, v) for c, v in paired if v is not None and v < TARGET_RATIO]
        out.append("  shadow/direct >= %.2f%s: %d of %d met%s" % (
            TARGET_RATIO, ", placement %s" % placement if placement else "",
            len(rows) - len(missed), len(rows),
            "; missed: " + ", ".join("%s %.3f" % cv for cv in missed) if missed else ""))
    srows = res.get("serve") or []
    if srows:
        lo, hi = TARGET_PASSTHROUGH
        got = [(r["case"], r["serve-passthrough"]["ratio"]) for r in srows]
        missed = [(c, v) for c, v in got if v is None or not lo <= v <= hi]
        out.append("  serve passthrough/direct %.2f-%.2f: %d of %d met%s" % (
            lo, hi, len(got) - len(missed), len(got),
            "; missed: " + ", ".join("%s %s" % (c, _fmt(v, 3)) for c, v in missed) if missed else ""))
    # Every layout of the 2-descriptor, batch-64 case: the cached mirrored
    # one is svq.py's own driver's; real drivers rewrite their table (Linux's
    # virtio_net, testpmd) or take the copied layout (Linux's virtio_blk).
    names = {"": "mirrored, cached", "rewritten": "table rewritten", "copied": "copied layout"}
    for r in res.get("copier") or []:
        if r["chain"] == 2 and r["batch"] == 64 and r["notify"]:
            v = r["round_trips_per_s"]
            out.append("  copier 2-desc >= %s/s, %s: %s/s (%s; %.0f%% of target)" % (
                _fmt(TARGET_COPIER), names.get(r.get("variant") or "", r.get("variant")), _fmt(v),
                "met" if v >= TARGET_COPIER else "missed", v / TARGET_COPIER * 100))
    imp = res.get("import")
    if imp:
        out.append("  import svq < %.0f ms: %.1f ms (%s)" % (
            TARGET_IMPORT_MS, imp["import_ms"], "met" if imp["import_ms"] < TARGET_IMPORT_MS else "missed"))
    m = ((res.get("vm") or {}).get("memory") or {}).get("net-shadow")
    if m and "own_kib" in m:
        v = m["own_kib"] / 1024
        out.append("  svq.py own RSS < %.0f MiB: %.1f MiB (%s)" % (
            TARGET_RSS_MIB, v, "met" if v < TARGET_RSS_MIB else "missed"))
    return out


def metrics(res):
    """Flat {name: (value, higher_is_better)} for comparing two results files."""
    m = {}
    for r in res.get("devices") or []:
        for mode in ("direct", "shadow"):
            if r[mode]["rps"] is not None:
                m["%s %s req/s" % (r["case"], mode)] = (r[mode]["rps"], True)
        paired, of_medians = ratios(r)
        if paired is not None:
            m["%s shadow/direct" % r["case"]] = (paired, True)
        if of_medians is not None:
            m["%s shadow/direct of medians" % r["case"]] = (of_medians, True)
    for r in res.get("serve") or []:
        for mode in SERVE_MODES[1:]:
            if r[mode].get("ratio") is not None:
                m["%s %s/direct" % (r["case"], mode)] = (r[mode]["ratio"], True)
    for r in res.get("ring_copier") or []:
        m["ring copier %s %s svq us/req" % (r["ring"], r["layout"])] = (r["svq_us_per_req"], False)
    for r in res.get("copier") or []:
        m["copier %s round trips/s" % r["id"]] = (r["round_trips_per_s"], True)
        m["copier %s svq us/req" % r["id"]] = (r["svq_cpu_us_per_req"], False)
    if res.get("import"):
        m["import svq ms"] = (res["import"]["import_ms"], False)
    for k, v in ((res.get("vm") or {}).get("memory") or {}).items():
        if "own_kib" in v:
            m["RSS %s MiB" % k] = (v["own_kib"] / 1024, False)
    return m


def format_compare(new, old, old_path):
    a, b = metrics(old), metrics(new)
    L = ["", "Change against %s (%s, commit %s):" % (old_path, old.get("date"), old.get("commit")),
         "| metric | before | now | change |", "|---|---:|---:|---:|"]
    for k, (v, better_up) in b.items():
        if k not in a:
            continue
        o = a[k][0]
        if not o:
            continue
        ch = (v - o) / abs(o) * 100
        good = (ch > 0) == better_up
        mark = "" if abs(ch) < 3 else (" (better)" if good else " (worse)")
        digits = 0 if abs(v) >= 100 else 2
        L.append("| %s | %s | %s | %+.1f%%%s |" % (k, _fmt(o, digits), _fmt(v, digits), ch, mark))
    return "\n".join(L)


# ============================================================================
# Commands
# ============================================================================

def svq_version():
    m = re.search(r'^__version__ = "([^"]+)"', _read(SVQ), re.M)
    return m.group(1) if m else None


def cmd_run(args):
    t0 = time.monotonic()
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
           "commit": git_commit(), "svq_version": svq_version(),
           "settings": {"rounds": args.rounds, "seconds": args.seconds}}
    sys.path.insert(0, ROOT)
    if args.svq:
        load_svq(args.svq)
        res["copier_svq"] = args.svq
    res["copier"] = copier_bench(seconds=args.copier_seconds)
    res["ring_copier"] = ring_copier_bench(seconds=args.copier_seconds)
    note("import time")
    res["import"] = import_time()
    if not args.no_vm:
        vm = run_vm(args)
        if vm is not None:
            accel = _read(os.path.join(ROOT, ".cache", "vm", "accel")).strip()
            vm["accel"] = os.environ.get("SVQ_VM_ACCEL") or accel.upper() or "?"
            res["vm"] = vm
            placements = vm.get("placements") or ["free"]
            res["placement"] = placements[0]
            res["devices"] = summarize_devices(vm, placements[0])
            for other in placements[1:]:
                res.setdefault("devices_by_placement", {})[other] = summarize_devices(vm, other)
            res["serve"] = summarize_serve(vm)
            res["switches"] = summarize_switches(vm)
    res["elapsed_seconds"] = round(time.monotonic() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(format_table(res))
    if args.compare:
        with open(args.compare) as f:
            print(format_compare(res, json.load(f), args.compare))
    print("\nResults: %s (%.0f s)" % (os.path.relpath(path, ROOT), res["elapsed_seconds"]))
    if not args.no_vm and "devices" not in res:
        return 1
    return 0


def cmd_table(args):
    with open(args.file) as f:
        res = json.load(f)
    print(format_table(res))
    if args.compare:
        with open(args.compare) as f:
            print(format_compare(res, json.load(f), args.compare))
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="bench.py", description="svq.py benchmarks")
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="all benchmarks (default)")
    r.add_argument("--rounds", type=int, default=ROUNDS, help="device rounds (default %d)" % ROUNDS)
    r.add_argument("--seconds", type=float, default=SECONDS,
                   help="seconds per device run (default %g)" % SECONDS)
    r.add_argument("--serve-rounds", type=int, default=ROUNDS,
                   help="rounds of serve passthrough and shadow beside direct (default %d; 0: "
                   "none)" % ROUNDS)
    r.add_argument("--copier-seconds", type=float, default=0.25)
    r.add_argument("--only", help="device cases whose id starts with one of these (comma list)")
    r.add_argument("--placement", choices=PLACEMENTS + ("both",), default="both",
                   help="pinned: driver on vCPU %d, svq and the device's threads on vCPU %d, "
                   "both modes; free: the scheduler's choice; both (default): each round in "
                   "both, the table from pinned, free beside it" % (DRIVER_CPU, HOST_CPU))
    r.add_argument("--no-vm", action="store_true", help="host benchmarks only")
    r.add_argument("--out", default=OUT_DIR, help="results folder (default .cache/bench)")
    r.add_argument("--compare", metavar="OLD.json", help="print the change against a results file")
    r.add_argument("--svq", metavar="FILE", help="copier: benchmark this svq.py instead (device "
                   "runs always use ./svq.py)")
    v = sub.add_parser("vm", help="(inside the VM) device benchmarks")
    v.add_argument("--rounds", type=int, default=ROUNDS)
    v.add_argument("--serve-rounds", type=int, default=ROUNDS)
    v.add_argument("--seconds", type=float, default=SECONDS)
    v.add_argument("--only")
    v.add_argument("--placement", choices=PLACEMENTS + ("both",), default="both")
    v.add_argument("--out", required=True)
    t = sub.add_parser("table", help="print a results file")
    t.add_argument("file")
    t.add_argument("--compare", metavar="OLD.json")
    m = sub.add_parser("timeline", help="(inside the VM) phases of a round of requests, "
                       "direct and shadow")
    m.add_argument("--case", default="blk-4k-read", choices=[c[0] for c in DEVICE_CASES])
    m.add_argument("--seconds", type=float, default=2.0)
    m.add_argument("--placement", choices=PLACEMENTS, default="pinned")
    f = sub.add_parser("profile", help="cProfile of the copier loop")
    f.add_argument("--chain", type=int, default=2)
    f.add_argument("--batch", type=int, default=64)
    f.add_argument("--polled", action="store_true")
    f.add_argument("--variant", choices=("", "rewritten", "copied"), default="",
                   help="as the copier's cases: table rewritten every batch, or QEMU's layout")
    f.add_argument("--sort", default="tottime")
    f.add_argument("--top", type=int, default=20)
    f.add_argument("--svq", metavar="FILE", help="profile this svq.py instead")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")
    args = build_parser().parse_args(argv)
    return {"run": cmd_run, "vm": cmd_vm, "table": cmd_table, "profile": cmd_profile,
            "timeline": cmd_timeline}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
