"""Benchmark `steps`: end-to-end training-step time over rate-limited links (needs root and CAP_NET_ADMIN).

Each rank runs in its own network namespace (hcns0 ... hcnsN-1) with one veth link (hcvI, 10.77.0.I+1/24) to a
Linux bridge (hcbr0, 10.77.0.254) that lives in a namespace of its own (hcnsbr), so nothing is added to the
machine's own network. ``tc`` limits every link in both directions with a token bucket (tbf) at the given
rate: on the rank's side of the veth (what the rank sends) and on the bridge's side (what it receives), as a
NIC on a switch port. The ranks are started with Horovod's Gloo controller and the same environment-variable
rendezvous as ``horovodrun --gloo`` uses; the rendezvous server listens in the bridge's namespace. Each rank
looks like a separate host (its own HOROVOD_HOSTNAME, local size 1), so every byte between ranks crosses two
shaped links; ``tc -s`` byte counters and a dense probe allreduce (it cannot beat the rate) check that it does.

For every (ranks, rate), one launch runs every configuration one after the other on a fresh copy of the same
MLP (``steps_worker.py``): median step time (slowest rank per step) over timed steps after warm-up, its
speed-up over dense allreduce (dense time / configuration time), its speed-up over the strongest baseline
("vs best of dense/fp16": the faster of dense allreduce and Horovod fp16, divided by the configuration's time),
bytes handed to Horovod and bytes that left the rank's interface, per rank and step. The network is torn down
after each launch, on exit, and leftovers of a crashed run are removed first.

**Efficiency against the ideal**, per configuration row::

    ideal (s)   = compute-only step (s) + bytes the rank sends per step / link rate (tc rate / 8, bytes/s)
    efficiency  = ideal / measured median step time

The compute-only step is measured in the same launch (same model, no Horovod in the step, all ranks computing
at once; it is shown as its own row, "compute only (no communication)", efficiency 1 by definition). The bytes
are the **wire** bytes when the interface counters gave them: ``tx_bytes`` of the rank's veth over the timed
steps (IP/TCP headers and the per-step barrier included), of the rank that sent the most (the step time is
the slowest rank's, e.g. DoubleSqueeze's root broadcasts). Otherwise (no counters) the **handed** bytes:
what rank 0 gave to Horovod's collectives per step (``stats()["bytes_sent"]``, or 4 / 2 B per element for
dense / fp16). Handed bytes are not what a collective sends: a ring allreduce of B bytes on n ranks sends
2(n-1)/n·B per rank, an allgather (n-1) payloads; so the efficiency from the handed bytes is also reported
(``efficiency_handed``) beside the wire one, which is the one used (``efficiency_basis`` says which).
"""
import atexit
import fcntl
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..experiments.common import ROOT, relpath, save

WORKER = "scripts.benchmarks.steps_worker"   # run as a module from ROOT
PREFIX = "hcns"                 # every namespace this benchmark makes starts with it
BRIDGE_NS, BRIDGE, BRIDGE_IP = "hcnsbr", "hcbr0", "10.77.0.254"
LOCK = Path(tempfile.gettempdir()) / "hvd_compress_steps.lock"
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts

# The configurations, in the order they run and are shown. The keys "transport", "dense_below" and "bucket_mb"
# (when set) are handed to hc.Compression() as keyword arguments (steps_worker.PASSTHROUGH), e.g.
# {"dense_below": 1024, "bucket_mb": 64}; the worker skips a configuration with a note while Compression does not
# accept one of them (TypeError). Names are kept across runs so that results stay comparable.
CONFIGS = [
    {"name": "dense", "kind": "dense", "label": "dense allreduce (fp32)"},
    {"name": "fp16", "kind": "fp16", "label": "Horovod fp16"},
    {"name": "topk1%+EF", "kind": "hc", "spec": "topk:0.01", "error_feedback": True,
     "label": "Top-k 1% + error feedback"},
    {"name": "randk1% shared", "kind": "hc", "spec": "randk:0.01,shared", "label": "shared Rand-k 1% (allreduce)"},
    {"name": "DoubleSqueeze topk1% root", "kind": "hc", "spec": "topk:0.01", "error_feedback": True,
     "server": "topk:0.01", "label": "DoubleSqueeze Top-k 1% (root)"},
    {"name": "sharded topk1%+EF", "kind": "hc", "spec": "topk:0.01", "error_feedback": True,
     "transport": "sharded", "label": "Top-k 1% + EF, sharded transport"},
    {"name": "auto topk1%+EF", "kind": "hc", "spec": "topk:0.01", "error_feedback": True, "transport": "auto",
     "label": "Top-k 1% + EF, transport auto (Compression measures the link)"},
    {"name": "auto topk1%+EF, rate given", "kind": "hc", "spec": "topk:0.01", "error_feedback": True,
     "transport": "auto", "pass_bandwidth": True, "label": "Top-k 1% + EF, transport auto (link_gbps = tc rate)"},
    {"name": "dense again", "kind": "dense", "label": "dense allreduce, measured again last (the launch's noise)"},
]
PLANS = {
    True: {"sizes": [2], "rates_gbit": [1], "width": 1024, "layers": 2, "batch": 4, "warmup": 2, "steps": 5,
           "probe_repeats": 2, "configs": ["dense", "fp16", "topk1%+EF"], "timeout_s": 150},
    False: {"sizes": [2, 4], "rates_gbit": [1, 10], "width": 2048, "layers": 6, "batch": 4, "warmup": 1,
            "steps": 15, "probe_repeats": 2, "configs": [c["name"] for c in CONFIGS], "timeout_s": 600},
}
COMPUTE_ONLY = "compute only (no communication)"   # its own row in every table, efficiency 1 by definition
BASELINES = ("dense", "fp16")   # "vs best of dense/fp16": the faster of the two in the same launch
# The targets (full run only): speed-up over dense (and efficiency) of one configuration at (ranks, rate)
TARGETS = [
    {"name": "1 Gbit/s, 2 ranks: Top-k 1% + EF >= 4x faster than dense and efficiency >= 0.8",
     "points": [(2, 1)], "config": "topk1%+EF", "min_speedup": 4.0, "min_efficiency": 0.8},
    {"name": "1 Gbit/s, 4 ranks: Top-k 1% + EF >= 2.5x faster than dense",
     "points": [(4, 1)], "config": "topk1%+EF", "min_speedup": 2.5},
    {"name": "10 Gbit/s: auto topk1%+EF >= 0.95x dense at 2 and at 4 ranks",
     "points": [(2, 10), (4, 10)], "config": "auto topk1%+EF", "min_speedup": 0.95},
]
NEEDS_ROOT = ("the steps benchmark needs root (CAP_NET_ADMIN) and `ip netns` / `tc` (iproute2): it builds "
              "network namespaces, veth links and a bridge, and limits them with tc")


# ---- shell helpers -------------------------------------------------------------------------------------------

def sh(*cmd, check=True):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def our_namespaces():
    try:
        listing = sh("ip", "netns", "list", check=False)
    except FileNotFoundError:
        return []
    return [line.split()[0] for line in listing.splitlines() if line.split() and line.split()[0].startswith(PREFIX)]


def teardown():
    """Removes every namespace this benchmark makes (and with them their veths and the bridge), first killing
    what still runs inside them (ranks of a run that crashed). Safe to call any time."""
    for ns in our_namespaces():
        for pid in sh("ip", "netns", "pids", ns, check=False).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", ns, check=False)
    if NETNS_ETC.is_dir():
        for folder in NETNS_ETC.glob(f"{PREFIX}*"):
            shutil.rmtree(folder, ignore_errors=True)
        try:
            NETNS_ETC.rmdir()   # only when empty (it did not exist before, or holds nothing else)
        except OSError:
            pass
    return our_namespaces()


def qdisc_bytes(ns, dev):
    out = sh("tc", "-n", ns, "-s", "qdisc", "show", "dev", dev)
    match = re.search(r"Sent (\d+) bytes", out)
    return int(match.group(1)) if match else None


# ---- the network ---------------------------------------------------------------------------------------------

class Network:
    """n namespaces, each with one veth to a bridge in its own namespace, every veth end shaped by tbf."""

    def __init__(self, n, rate_bps):
        self.n, self.rate_bps = n, rate_bps

    def up(self):
        sh("ip", "netns", "add", BRIDGE_NS)
        sh("ip", "-n", BRIDGE_NS, "link", "set", "lo", "up")
        sh("ip", "-n", BRIDGE_NS, "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "-n", BRIDGE_NS, "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
        sh("ip", "-n", BRIDGE_NS, "link", "set", BRIDGE, "up")
        for i in range(self.n):
            ns = f"{PREFIX}{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # Horovod 0.28's process-set Gloo contexts (which carry the collectives) ignore HOROVOD_GLOO_IFACE
            # and bind to the address of the machine's hostname: inside rank i's namespace it is 10.77.0.i+1
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(f"127.0.0.1 localhost\n{self.ip(i)} {socket.gethostname()} {ns}\n")
            sh("ip", "-n", BRIDGE_NS, "link", "add", f"hcb{i}", "type", "veth", "peer", "name", f"hcv{i}",
               "netns", ns)
            sh("ip", "-n", BRIDGE_NS, "link", "set", f"hcb{i}", "master", BRIDGE)
            sh("ip", "-n", BRIDGE_NS, "link", "set", f"hcb{i}", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", f"hcv{i}")
            sh("ip", "-n", ns, "link", "set", f"hcv{i}", "up")
            for where, dev in self.ends(i):
                sh("tc", "-n", where, "qdisc", "replace", "dev", dev, "root", *self.tbf())
        return self

    def tbf(self):
        # hrtimer-driven tbf: the bucket only has to hold a few GSO packets (64 KB each), or 1 ms at the rate
        burst = max(256 * 1024, int(self.rate_bps / 8 * 1e-3))
        return ["tbf", "rate", str(int(self.rate_bps)), "burst", str(burst), "latency", "20ms"]

    @staticmethod
    def ip(i):
        return f"10.77.0.{i + 1}"

    @staticmethod
    def ends(i):
        """(namespace, device) of rank i's two link ends: its own (egress = upload), the bridge's (download)."""
        return [(f"{PREFIX}{i}", f"hcv{i}"), (BRIDGE_NS, f"hcb{i}")]

    def counters(self):
        return {"rank_side": [qdisc_bytes(*self.ends(i)[0]) for i in range(self.n)],
                "bridge_side": [qdisc_bytes(*self.ends(i)[1]) for i in range(self.n)]}

    def describe(self):
        return (f"{self.n} namespaces {PREFIX}0..{PREFIX}{self.n - 1}, veth hcvI (10.77.0.I+1/24) <-> hcbI on "
                f"bridge {BRIDGE} ({BRIDGE_IP}) in namespace {BRIDGE_NS}; tc {' '.join(self.tbf())} on both ends; "
                f"/etc/netns/{PREFIX}I/hosts maps the hostname to 10.77.0.I+1 inside namespace I")

    @staticmethod
    def template():
        return (f"one namespace per rank ({PREFIX}I), veth hcvI (10.77.0.I+1/24) <-> hcbI on bridge {BRIDGE} "
                f"({BRIDGE_IP}) in namespace {BRIDGE_NS}; tc tbf at the rate on both ends of every veth (burst "
                f"max(256 KiB, 1 ms at the rate), latency 20ms); /etc/netns/{PREFIX}I/hosts maps the hostname to "
                f"10.77.0.I+1 inside namespace I (Horovod 0.28's process-set Gloo contexts bind to it)")


def in_namespace(ns, fn):
    """fn() run by a thread that has joined network namespace ns (sockets it opens live there)."""
    import ctypes
    result = {}

    def target():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/var/run/netns/{ns}") as handle:
                if libc.setns(handle.fileno(), 0x40000000) != 0:    # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), f"setns({ns}) failed")
            result["value"] = fn()
        except BaseException as err:   # noqa: BLE001 -- handed to the caller
            result["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


# ---- one launch: n ranks at one rate -------------------------------------------------------------------------

def launch(net, plan, tmp, log):
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousServer

    n, rate_bps = net.n, net.rate_bps
    tag = f"n{n}_{rate_bps / 1e9:g}g"
    plan_path, out_path = tmp / f"plan_{tag}.json", tmp / f"report_{tag}.json"
    configs = [c for c in CONFIGS if c["name"] in plan["configs"]]
    plan_path.write_text(json.dumps({**{k: plan[k] for k in ("width", "layers", "batch", "warmup", "steps",
                                                             "probe_repeats")},
                                     "rate_bps": rate_bps, "lr": 0.01, "configs": configs}))
    slots = get_host_assignments(parse_hosts(",".join(f"{PREFIX}{i}:1" for i in range(n))), n)
    rendezvous = RendezvousServer()
    port = in_namespace(BRIDGE_NS, rendezvous.start)
    rendezvous.init(slots)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "OMPI_", "PMI", "PMIX"))}
    base.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                HOROVOD_GLOO_RENDEZVOUS_ADDR=BRIDGE_IP, HOROVOD_GLOO_RENDEZVOUS_PORT=str(port),
                HOROVOD_CONTROLLER="gloo", HOROVOD_CPU_OPERATIONS="gloo", HOROVOD_GLOO_TIMEOUT_SECONDS="60")
    procs, logs, printer = [], [], None
    before = net.counters()
    load_before = os.getloadavg()
    version = library_version()
    start = time.time()
    try:
        for slot in slots:
            i = slot.rank
            env = dict(base, HOROVOD_GLOO_IFACE=f"hcv{i}", HOROVOD_HOSTNAME=slot.hostname,
                       HOROVOD_RANK=str(i), HOROVOD_SIZE=str(slot.size), HOROVOD_LOCAL_RANK=str(slot.local_rank),
                       HOROVOD_LOCAL_SIZE=str(slot.local_size), HOROVOD_CROSS_RANK=str(slot.cross_rank),
                       HOROVOD_CROSS_SIZE=str(slot.cross_size))
            logs.append(tmp / f"rank{i}_{tag}.log")
            cmd = ["ip", "netns", "exec", f"{PREFIX}{i}", sys.executable, "-m", WORKER, str(plan_path), str(out_path)]
            if i == 0:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, preexec_fn=_own_session_dying_with_us)
                printer = threading.Thread(target=_relay, args=(proc.stdout, logs[0], log), daemon=True)
                printer.start()
            else:
                with open(logs[-1], "w") as handle:
                    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                            preexec_fn=_own_session_dying_with_us)
            procs.append(proc)
        deadline = start + plan["timeout_s"]
        failed = None
        while any(p.poll() is None for p in procs):
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                failed = f"rank {next(i for i, c in enumerate(codes) if c not in (None, 0))} exited with " \
                         f"{next(c for c in codes if c not in (None, 0))}"
                break
            if time.time() > deadline:
                failed = f"timed out after {plan['timeout_s']} s"
                break
            time.sleep(0.2)
        else:
            codes = [p.returncode for p in procs]
            if any(codes):
                failed = f"exit codes {codes}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if printer is not None:
            printer.join(timeout=5)
        rendezvous.stop()
        rendezvous._httpd.server_close()   # the socket holds the bridge's namespace alive
    after = net.counters()
    report = json.loads(out_path.read_text()) if out_path.exists() else {}
    report["launch"] = {"wall_s": round(time.time() - start, 1), "library": version,
                        "library_after": library_version(), "loadavg_before": load_before,
                        "loadavg_after": os.getloadavg(), "failed": failed,
                        "tc_bytes": {side: [a - b for a, b in zip(after[side], before[side])] for side in after}}
    if failed:
        tails = "\n".join(f"--- rank {i} ---\n{_tail(path)}" for i, path in enumerate(logs))
        report["launch"]["log_tails"] = tails[-8000:]
        log(f"launch n={n} {rate_bps / 1e9:g} Gbit/s FAILED: {failed}\n{tails[-4000:]}")
    return report


def library_version():
    """git HEAD and a digest of hvd_compress's sources as they are now (the library may change between launches
    when others edit the working tree: each launch records what its ranks imported)."""
    import hashlib
    digest = hashlib.sha256()
    for path in sorted((ROOT / "hvd_compress").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "hvd_compress"], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True).stdout.strip()
    return {"git_head": head or None, "hvd_compress_dirty": bool(dirty), "hvd_compress_sha256": digest.hexdigest()[:16]}


def _own_session_dying_with_us():
    """preexec_fn of the ranks: a session of their own (killed as a group), and SIGKILL when we die."""
    os.setsid()
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG, kept across exec
    except (OSError, AttributeError):
        pass


def _relay(stream, path, log):
    with open(path, "w") as handle:
        for line in stream:
            handle.write(line)
            handle.flush()
            if line.startswith("[n="):
                log("  " + line.rstrip())


def _tail(path, chars=3000):
    try:
        return Path(path).read_text()[-chars:]
    except OSError:
        return "(no log)"


# ---- the run -------------------------------------------------------------------------------------------------

def preflight():
    """None when the network can be built, else why not."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return f"{NEEDS_ROOT}; this is {sys.platform}"
    if os.geteuid() != 0:
        return f"{NEEDS_ROOT}; running as uid {os.geteuid()}"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{NEEDS_ROOT}; `{tool}` was not found"
    probe = f"{PREFIX}probe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return f"{NEEDS_ROOT}; `ip netns add` failed: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return None


def lock(timeout_s):
    """One run of this benchmark at a time on a machine (they would share the namespace names)."""
    handle = open(LOCK, "w")
    deadline = time.time() + timeout_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.time() > deadline:
                handle.close()
                return None
            time.sleep(1)


def run(out, quick):
    plan = PLANS[quick]
    log = lambda msg: print(msg, flush=True)   # noqa: E731
    why = preflight()
    if why:
        log(f"steps: {why}")
        return {"error": why, "checks": {"network namespaces available (root, CAP_NET_ADMIN)": False}}, False
    held = lock(900)
    if held is None:
        why = f"another run of the steps benchmark holds {LOCK}"
        log(f"steps: {why}")
        return {"error": why, "checks": {"no other steps run in progress": False}}, False

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # so that the finally below tears down
    atexit.register(teardown)
    leftovers = our_namespaces()
    if leftovers:
        log(f"steps: removing leftovers of an earlier run: {' '.join(leftovers)}")
        teardown()
    uptime_before = sh("uptime").strip()
    log(f"steps: {uptime_before}")
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="hc_steps_") as tmp:
            for n in plan["sizes"]:
                for rate_gbit in plan["rates_gbit"]:
                    log(f"steps: {n} ranks at {rate_gbit} Gbit/s")
                    net = Network(n, rate_gbit * 1e9)
                    try:
                        net.up()
                        report = launch(net, plan, Path(tmp), log)
                    finally:
                        left = teardown()
                    report.update(n=n, rate_gbit=rate_gbit, namespaces_left=left, network=net.describe())
                    runs.append(report)
    finally:
        left = teardown()
        signal.signal(signal.SIGTERM, previous)
        atexit.unregister(teardown)
        held.close()
    uptime_after = sh("uptime").strip()
    log(f"steps: {uptime_after}")
    return summarize(runs, plan, quick, out, Network.template(), left, uptime_before, uptime_after, log)


# ---- tables, plot, checks ------------------------------------------------------------------------------------

def _sent_bytes(entry):
    """Wire bytes per step of the rank that sent the most (tx counters), or None."""
    by_rank = [b for b in entry.get("wire_bytes_by_rank") or [] if b is not None]
    return max(by_rank) if by_rank else entry.get("wire_bytes_per_rank_step")


def rows_of(report, plan):
    """[{config, label, median_s, speedup, vs_best, ideal_s, efficiency, handed, wire, ..., note}] for one launch,
    in CONFIGS order, then the compute-only row (kind "compute_only"; configurations have kind "config").
    Efficiency: see the module's docstring."""
    configs = report.get("configs", {})
    compute_entry = report.get("compute_only") or {}
    compute = compute_entry.get("median_s")
    rate_bytes_s = report["rate_gbit"] * 1e9 / 8
    measured = lambda name: configs.get(name, {}).get("median_s")   # noqa: E731
    dense = measured("dense")
    baselines = {name: measured(name) for name in BASELINES if measured(name)}
    best = min(baselines, key=baselines.get) if baselines else None

    def ideal(sent):
        return None if compute is None or sent is None else compute + sent / rate_bytes_s

    def ratio(a, b):
        return a / b if a and b else None

    rows = []
    for config in CONFIGS:
        if config["name"] not in plan["configs"]:
            continue
        entry = configs.get(config["name"])
        row = {"config": config["name"], "kind": "config", "label": config["label"], "median_s": None,
               "speedup": None, "vs_best": None, "best_baseline": best, "ideal_s": None, "efficiency": None,
               "efficiency_basis": None, "ideal_handed_s": None, "efficiency_handed": None,
               "handed_bytes": None, "wire_bytes": None, "wire_bytes_max": None, "compress_s": None,
               "decompress_s": None, "buckets": None, "note": ""}
        if entry is None:
            row["note"] = "not measured (the launch stopped before it)"
        elif entry.get("skipped"):
            row["note"] = entry["note"]
        elif entry.get("error"):
            row["note"] = f"error: {entry['error']}"
        else:
            t = entry["median_s"]
            stats = entry.get("stats") or {}
            chosen = stats.get("transports") or {}
            notes = []
            if "auto" in config["name"] and chosen:
                counts = {}
                for how in chosen.values():
                    counts[how] = counts.get(how, 0) + 1
                note = "auto chose " + ", ".join(f"{how} for {k} tensors" for how, k in sorted(counts.items()))
                link = stats.get("link_gbps")
                if link:
                    note += f" (link {link:.2f} Gbit/s, {'given' if config.get('pass_bandwidth') else 'measured'})"
                notes.append(note)
            if entry.get("buckets") is not None:
                notes.append(f"{entry['buckets']} bucket{'' if entry['buckets'] == 1 else 's'}")
            row["note"] = "; ".join(notes)
            handed, wire_max = entry.get("handed_bytes_per_rank_step"), _sent_bytes(entry)
            ideal_wire, ideal_handed = ideal(wire_max), ideal(handed)
            row.update(median_s=t, speedup=ratio(dense, t), vs_best=ratio(baselines.get(best), t),
                       ideal_s=ideal_wire if ideal_wire is not None else ideal_handed,
                       efficiency_basis=("wire" if ideal_wire is not None
                                         else "handed" if ideal_handed is not None else None),
                       ideal_handed_s=ideal_handed, efficiency_handed=ratio(ideal_handed, t),
                       handed_bytes=handed, wire_bytes=entry.get("wire_bytes_per_rank_step"),
                       wire_bytes_max=wire_max, steps=len(entry["step_times_s"]),
                       compress_s=entry.get("compress_s"), decompress_s=entry.get("decompress_s"),
                       buckets=entry.get("buckets"), min_s=entry["min_s"], max_s=entry["max_s"])
            row["efficiency"] = ratio(row["ideal_s"], t)
        rows.append(row)
    if compute is not None:
        # its own row: no communication, so ideal = measured and efficiency = 1 by definition
        rows.append({"config": COMPUTE_ONLY, "kind": "compute_only",
                     "label": "the same step without Horovod, all ranks computing at once", "median_s": compute,
                     "speedup": ratio(dense, compute), "vs_best": ratio(baselines.get(best), compute),
                     "best_baseline": best, "ideal_s": compute, "efficiency": 1.0, "efficiency_basis": "definition",
                     "ideal_handed_s": compute, "efficiency_handed": 1.0, "handed_bytes": 0, "wire_bytes": None,
                     "wire_bytes_max": None, "compress_s": None, "decompress_s": None, "buckets": None,
                     "steps": len(compute_entry.get("step_times_s", [])), "min_s": compute_entry.get("min_s"),
                     "max_s": compute_entry.get("max_s"), "note": "efficiency 1 by definition"})
    return rows


def config_rows(rows):
    return [r for r in rows if r["kind"] == "config"]


def table(report, rows):
    mb = lambda b: "-" if b is None else f"{b / 1e6:.2f}"   # noqa: E731
    sec = lambda v: "-" if v is None else f"{v:.3f}"   # noqa: E731
    times = lambda v: "-" if v is None else f"{v:.2f}x"   # noqa: E731
    probe = report.get("probe", {})
    best = next((r["best_baseline"] for r in rows if r.get("best_baseline")), None)
    lines = [f"{report['n']} ranks, {report['rate_gbit']} Gbit/s, {report.get('params', 0) / 1e6:.1f}M parameters "
             f"(load {' '.join(f'{x:.2f}' for x in report['launch']['loadavg_before'])} before, "
             f"{' '.join(f'{x:.2f}' for x in report['launch']['loadavg_after'])} after); ideal = compute only + "
             f"wire bytes of the busiest rank / {report['rate_gbit']} Gbit/s, efficiency = ideal / median"
             + (f"; best of dense/fp16 here: {best}" if best else ""),
             "| configuration | median step (s) | speed-up vs dense | vs best of dense/fp16 | ideal (s) | efficiency "
             "| efficiency (handed bytes) | compress() s/step | decompress() s/step | handed MB/rank/step "
             "| wire MB/rank/step | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        eff = sec(r["efficiency"]) + (" (handed)" if r["efficiency_basis"] == "handed" else "")
        lines.append(f"| {r['config']} | {sec(r['median_s'])} | {times(r['speedup'])} | {times(r['vs_best'])} | "
                     f"{sec(r['ideal_s'])} | {eff} | {sec(r['efficiency_handed'])} | {sec(r['compress_s'])} | "
                     f"{sec(r['decompress_s'])} | {mb(r['handed_bytes'])} | {mb(r['wire_bytes'])} | {r['note']} |")
    if probe:
        lines.append(f"probe: dense allreduce of {probe['bytes'] / 1e6:.1f} MB took {probe['median_s']:.3f} s "
                     f"(ring allreduce at the link rate: {probe['ideal_ring_s']:.3f} s)")
    return "\n".join(lines)


def plot(runs, all_rows, path):
    """One panel per (ranks, rate): rows of panels by ranks, columns by rate."""
    import matplotlib.pyplot as plt   # after experiments.common, which selects the Agg backend
    from matplotlib import ticker
    sizes = sorted({r["n"] for r in runs})
    rates = sorted({r["rate_gbit"] for r in runs})
    fig, axes = plt.subplots(len(sizes), len(rates), figsize=(5.2 * len(rates), 3.9 * len(sizes)), squeeze=False,
                             sharey=True)
    for report, rows in zip(runs, all_rows):
        rows = config_rows(rows)
        ax = axes[sizes.index(report["n"])][rates.index(report["rate_gbit"])]
        names = [r["config"] for r in rows]
        times = [r["median_s"] or 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), times, color=[f"C{i}" for i in range(len(rows))])
        for bar, r in zip(bars, rows):
            label = "skipped" if r["median_s"] is None else f"{r['speedup']:.2f}x" if r["speedup"] else ""
            if r["median_s"] is not None and r["efficiency"] is not None:
                label += f"\neff {r['efficiency']:.2f}"
            ax.text(bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 1e-3) * 1.05, label, ha="center",
                    va="bottom", fontsize=7)
        compute = report.get("compute_only", {}).get("median_s")
        if compute:
            ax.axhline(compute, color="k", ls="--", lw=0.8, label="compute only (no network)")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2, 5)))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_title(f"{report['n']} ranks, {report['rate_gbit']} Gbit/s", fontsize=9)
    highest = max((r["median_s"] or 0.0 for rows in all_rows for r in config_rows(rows)), default=0.0)
    if highest > 0:
        axes[0][0].set_ylim(top=highest * 4)   # room for the two-line labels (the panels share the axis)
    for row in axes:
        row[0].set_ylabel("median step time (s)", fontsize=8)
    fig.suptitle(f"training step of a {runs[0].get('params', 0) / 1e6:.1f}M-parameter MLP, one rank per network "
                 f"namespace, tc-limited veths (labels: speed-up over dense, efficiency against the ideal)", fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def summarize(runs, plan, quick, out, network, left, uptime_before, uptime_after, log):
    all_rows = [rows_of(report, plan) for report in runs]
    for report, rows in zip(runs, all_rows):
        log("\n" + table(report, rows))
    checks, traffic = {}, []
    for report, rows in zip(runs, all_rows):
        where = f"{report['n']} ranks, {report['rate_gbit']} Gbit/s"
        rows = config_rows(rows)
        measured = [r for r in rows if r["median_s"] is not None]
        checks[f"{where}: every configuration measured (or skipped: a keyword not accepted yet)"] = (
            not report["launch"]["failed"] and report.get("done", False) and all(
                (r["median_s"] is not None and math.isfinite(r["median_s"]) and r["median_s"] > 0)
                or r["note"].startswith("skipped") for r in rows) and len(measured) >= 3)
        checks[f"{where}: efficiency against the ideal for every measured configuration (finite, > 0)"] = bool(
            measured) and all(r["efficiency"] is not None and math.isfinite(r["efficiency"]) and r["efficiency"] > 0
                              for r in measured)
        # the traffic crossed the shaped links: the probe alone puts 2(n-1)/n * bytes on each rank's link,
        # the links' tc counters saw at least that, and the probe was not faster than the rate allows
        probe, tc_bytes = report.get("probe"), report["launch"]["tc_bytes"]
        if probe:
            n = report["n"]
            ring = 2 * (n - 1) / n * probe["bytes"] * (plan["probe_repeats"] + 1)
            ok = (all(b is not None and b >= 0.9 * ring for b in tc_bytes["rank_side"])
                  and all(b is not None and b >= 0.9 * ring for b in tc_bytes["bridge_side"])
                  and probe["median_s"] >= 0.8 * probe["ideal_ring_s"])
            traffic.append({"where": where, "probe_ring_bytes_per_rank": ring, "tc_bytes": tc_bytes,
                            "probe_s": probe["median_s"], "ideal_ring_s": probe["ideal_ring_s"], "ok": ok})
        else:
            ok = False
        checks[f"{where}: traffic crossed the tc-limited veths (tc counters, probe not faster than the rate)"] = ok
    checks["network torn down (no hcns* namespaces left)"] = not left and all(not r["namespaces_left"] for r in runs)

    def row(n, rate, name):
        for report, rows in zip(runs, all_rows):
            if report["n"] == n and report["rate_gbit"] == rate:
                return next((r for r in rows if r["config"] == name), None)
        return None

    def value(n, rate, name, key):
        found = row(n, rate, name)
        return None if found is None else found.get(key)

    targets = {}
    if not quick:
        for target in TARGETS:
            points = [f"{n} ranks, {rate} Gbit/s" for n, rate in target["points"]]
            speedups = {where: value(n, rate, target["config"], "speedup")
                        for where, (n, rate) in zip(points, target["points"])}
            met = [None if s is None else s >= target["min_speedup"] for s in speedups.values()]
            entry = {"config": target["config"], "min_speedup": target["min_speedup"]}
            if len(points) == 1:
                entry["measured_speedup"] = speedups[points[0]]
            else:
                entry["measured_speedups"] = speedups
            if "min_efficiency" in target:
                efficiencies = {where: value(n, rate, target["config"], "efficiency")
                                for where, (n, rate) in zip(points, target["points"])}
                entry.update(min_efficiency=target["min_efficiency"], efficiency_basis={
                    where: value(n, rate, target["config"], "efficiency_basis")
                    for where, (n, rate) in zip(points, target["points"])})
                if len(points) == 1:
                    entry["measured_efficiency"] = efficiencies[points[0]]
                else:
                    entry["measured_efficiencies"] = efficiencies
                met += [None if e is None else e >= target["min_efficiency"] for e in efficiencies.values()]
            if any(m is None for m in met):
                entry["met"] = None
                entry["note"] = f"{target['config']} not measured at every point (skipped, failed or not run)"
            else:
                entry["met"] = all(met)
            if target["config"].startswith("auto"):
                # context: dense measured twice in the same launch (its noise), and auto with the rate given
                entry["dense_again_speedups"] = {where: value(n, rate, "dense again", "speedup")
                                                 for where, (n, rate) in zip(points, target["points"])}
                entry["rate_given_speedups"] = {where: value(n, rate, "auto topk1%+EF, rate given", "speedup")
                                                for where, (n, rate) in zip(points, target["points"])}
            targets[target["name"]] = entry
        for name, target in targets.items():
            shown = {k: target[k] for k in ("measured_speedup", "measured_speedups", "measured_efficiency",
                                            "measured_efficiencies") if k in target}
            log(f"  target {name}: {'not measured' if target['met'] is None else 'met' if target['met'] else 'NOT met'}"
                f" ({shown})")
    versions = {r["launch"][key]["hvd_compress_sha256"] for r in runs for key in ("library", "library_after")}
    if len(versions) > 1:
        log("  note: hvd_compress changed while the benchmark ran (edited by others): the launches did not all "
            "measure the same library; see runs[*].launch.library")
    figure = plot(runs, all_rows, out / "steps.png") if runs else None
    summary = {
        "setup": {"network": network, "rendezvous": f"horovod RendezvousServer in {BRIDGE_NS} on {BRIDGE_IP}",
                  "controller": "Gloo (HOROVOD_CONTROLLER=gloo, HOROVOD_CPU_OPERATIONS=gloo), one host per rank",
                  "model": f"MLP of {plan['layers']} nn.Linear({plan['width']}, {plan['width']}) with ReLU, "
                           f"batch {plan['batch']} per rank, SGD lr 0.01, OMP_NUM_THREADS=1",
                  "timing": f"{plan['warmup']} warm-up + {plan['steps']} timed steps per configuration, each step "
                            f"after a barrier; step time = slowest rank; median over the timed steps",
                  "efficiency": "ideal / median step; ideal = compute-only step + wire bytes per step of the "
                                "rank that sent the most (tx_bytes of its veth) / (tc rate / 8); "
                                "efficiency_handed: the same with the bytes rank 0 handed to Horovod (no ring "
                                "or allgather factor); row 'compute only (no communication)': 1 by definition",
                  "vs_best": "speed-up over the faster of dense allreduce (fp32) and Horovod fp16 in the same "
                             "launch (best_baseline names it)",
                  "sizes": plan["sizes"], "rates_gbit": plan["rates_gbit"], "configs": CONFIGS,
                  "cpus": os.cpu_count(), "uptime_before": uptime_before, "uptime_after": uptime_after},
        "tables": [{"n": report["n"], "rate_gbit": report["rate_gbit"], "params": report.get("params"),
                    "compute_only_s": report.get("compute_only", {}).get("median_s"), "probe": report.get("probe"),
                    "rows": rows} for report, rows in zip(runs, all_rows)],
        "library_versions": sorted(versions), "same_library_throughout": len(versions) == 1,
        "targets": targets, "traffic": traffic, "checks": checks, "figure": relpath(figure) if figure else None,
        "runs": runs,
    }
    return summary, all(checks.values())
