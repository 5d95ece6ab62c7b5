#!/usr/bin/env python3
"""Run the sbatch scripts in examples/slurm/ on a throw-away single-node Slurm cluster on this machine.

As root: installs Slurm and MUNGE from the distribution's packages if they are missing (Debian 12: Slurm
22.05), starts munged, slurmctld and slurmd in a temporary directory (own key, socket, ports, state, spool and
logs; nothing under /etc is read or changed), waits for the node to be idle, submits every launch style of
examples/slurm/*.sbatch with a short 2-rank run, waits for each job, checks its output, and tears the cluster
down again, also on failure or Ctrl-C.

    python3 -m scripts.slurm_local                 # all jobs
    python3 -m scripts.slurm_local --jobs pytorch,keras --keep   # some jobs; keep the temp dir for a look
    python3 -m scripts.slurm_local --nodes 2       # two nodes of the emulated cluster (scripts/cluster.py)

With ``--nodes 2`` the cluster is two nodes of ``scripts/cluster.py`` (network namespaces with their own
hostnames, ssh between them, a 1 Gbit/s tc-limited link each): slurmctld and the first slurmd run on hcnode0,
the second slurmd on hcnode1 (Slurm's own node names), Slurm's clients on hcnode0, and every job is 2 nodes x
2 ranks (PyTorch's with ``--transport hierarchical``): horovodrun and mpirun reach hcnode1 over ssh, srun
through slurmd.

One line per job:  JOB <id> <name> <state> <PASS|FAIL> [why] | <matched output lines>
Exit status: 0 = every job passed, 1 = a job failed a check, 3 = the cluster could not be set up or started
(the first line of stderr starting with "SETUP-FAILED:" says why; tests/test_slurm.py skips on it).
"""
import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts import cluster as emulated

ROOT = Path(__file__).resolve().parents[1]
SBATCH_DIR = ROOT / "examples" / "slurm"
PACKAGES = ["slurm-wlm", "munge"]          # slurm-wlm pulls in slurmctld, slurmd, slurm-client and the plugins
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "srun"]
SETUP_FAILED = 3
MPI_ENV_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "OPAL_", "ORTE_")

# The short training run every job gets (2 ranks on the one node).
EXAMPLE_ARGS = ["--epochs", "1", "--train-limit", "1000", "--test-limit", "500", "--compressor", "topk:0.01",
                "--error-feedback", "--check-replicas"]
ALLOC_ARGS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]
# name -> (sbatch script, extra environment for the job)
JOBS = {
    "pytorch":            ("pytorch_fashion_mnist.sbatch", {}),
    "pytorch-mpirun":     ("pytorch_fashion_mnist.sbatch", {"LAUNCHER": "mpirun"}),
    "pytorch-srun":       ("pytorch_fashion_mnist.sbatch", {"LAUNCHER": "srun"}),
    "tensorflow":         ("tensorflow_fashion_mnist.sbatch", {}),
    "tensorflow-mpirun":  ("tensorflow_fashion_mnist.sbatch", {"LAUNCHER": "mpirun"}),
    "tensorflow-srun":    ("tensorflow_fashion_mnist.sbatch", {"LAUNCHER": "srun"}),
    "keras":              ("tensorflow_fashion_mnist.sbatch", {"EXAMPLE": "keras"}),
}
FINAL_RE = re.compile(r"final test_acc (\d+\.\d+) ratio (\d+\.\d+)")
TAG_RE = re.compile(r"\[\d+,\d+\]<std(?:out|err)>:")
SIZE_RE = re.compile(r"size (\d+) ")
CHECK_RES = [re.compile(r"launcher .*"), re.compile(r"size \d+\s+device \S+"), re.compile(r"epoch \d+/\d+ .*"), FINAL_RE,
             re.compile(r"replicas identical: \S+")]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}


class SetupError(Exception):
    pass


def log(msg):
    print(f"[slurm_local] {msg}", file=sys.stderr, flush=True)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:   # all bound at once: n distinct ports
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ensure_installed(allow_install):
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not missing:
        return
    if not allow_install:
        raise SetupError(f"missing {', '.join(missing)} and --no-install given")
    if shutil.which("apt-get") is None:
        raise SetupError(f"missing {', '.join(missing)} and no apt-get to install {' '.join(PACKAGES)}")
    log(f"installing {' '.join(PACKAGES)} (missing: {', '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:   # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SetupError(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stdout.strip()[-500:]}")
    still = [b for b in BINARIES if shutil.which(b) is None]
    if still:
        raise SetupError(f"still missing after apt-get install: {', '.join(still)}")


def node_hardware():
    """slurmd -C's NodeName line as a dict (CPUs, Boards, SocketsPerBoard, CoresPerSocket, ThreadsPerCore)."""
    out = subprocess.run(["slurmd", "-C"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=60).stdout
    for line in out.splitlines():
        if line.startswith("NodeName="):
            return dict(kv.split("=", 1) for kv in line.split())
    return {"NodeName": socket.gethostname().split(".")[0], "CPUs": str(os.cpu_count() or 1)}


def cgroup_mounts():
    """Shell commands that mount this machine's cgroup file systems again where they are now (inside a node
    of the emulated cluster, whose /sys is the network namespace's own)."""
    commands = []
    for line in Path("/proc/mounts").read_text().splitlines():
        source, where, kind, options = line.split()[:4]
        if where == "/sys/fs/cgroup" or where.startswith("/sys/fs/cgroup/"):
            if kind not in ("tmpfs", "cgroup", "cgroup2"):
                continue
            options = ",".join(o for o in options.split(",") if o not in ("rw", "ro", "relatime", "nosuid", "nodev",
                                                                           "noexec", "mode=755"))
            commands.append(f"mkdir -p {where} && mount -t {kind} {'-o ' + options if options else ''} {source} "
                            f"{where}")
    return " && ".join(commands) or "true"


class Cluster:
    def __init__(self, keep=False, nodes=1):
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="hvd-slurm-"))   # mode 0700, owned by root
        self.procs = {}
        # one node: this machine; several: the emulated cluster's nodes, Slurm's clients on the first
        self.nodes = emulated.Cluster(nodes, rate_gbit=1.0) if nodes > 1 else None
        self.hosts = self.nodes.names if self.nodes else [socket.gethostname().split(".")[0]]
        self.host = self.hosts[0]
        # Without the variables of an MPI process we may run in (an MPI singleton, e.g. a test process that
        # called hvd.init(), sets two dozen): passed on to a job, they make its mpirun fail silently.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(MPI_ENV_PREFIXES)}

    # -- daemons ------------------------------------------------------------------------------------
    def _on(self, k, cmd):
        """cmd, run on node k (itself with one node)."""
        return self.nodes.on(k, cmd) if self.nodes else cmd

    def _slurmds(self):
        return [f"slurmd{k}" for k in range(len(self.hosts))]

    def _spawn(self, name, cmd, node=0):
        logf = open(self.dir / "log" / f"{name}.console", "w")
        self.procs[name] = (subprocess.Popen(self._on(node, cmd), stdout=logf, stderr=subprocess.STDOUT, env=self.env,
                                             start_new_session=True), logf)

    def _alive(self, name):
        proc = self.procs[name][0]
        if proc.poll() is not None:
            tail = ""
            for f in (self.dir / "log").glob(f"{name}*"):
                tail += f.read_text(errors="replace")[-1500:]
            raise SetupError(f"{name} exited with status {proc.returncode}: {tail.strip()}")

    def start(self):
        d = self.dir
        if self.nodes:
            try:
                self.nodes.up()
            except RuntimeError as e:
                raise SetupError(f"the emulated cluster: {e}") from None
        for sub in ("munge", "munge/run", "log", "state", "spool", "out", *(f"spool/{h}" for h in self.hosts)):
            (d / sub).mkdir(mode=0o755)
        os.chmod(d, 0o755)   # munged checks that no one else can write to the directories above its socket
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = d / "munge" / "run" / "munge.socket.2"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                               f"--pid-file={d / 'munge' / 'munged.pid'}",
                               f"--seed-file={d / 'munge' / 'munged.seed'}",
                               f"--log-file={d / 'log' / 'munged.log'}"])
        self._wait(lambda: sock.exists(), 20, "munged socket", "munged")

        hw = node_hardware()
        cpus = hw.get("CPUs", str(os.cpu_count() or 1))
        topo = " ".join(f"{k}={hw[k]}" for k in ("Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
                        if k in hw)
        ctld_port, slurmd_port = free_ports(2)
        conf = d / "slurm.conf"
        plugstack = d / "plugstack.conf"
        plugstack.write_text("")   # no SPANK plug-ins from /etc/slurm/plugstack.conf.d
        conf.write_text(f"""\
# Throw-away cluster written by scripts/slurm_local.py
ClusterName=hvdlocal
SlurmctldHost={self.host}({self._address(0)})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool' / '%n'}
TmpFS={d / 'spool' / '%n'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.%n.pid'}
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd.%n.log'}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={plugstack}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=3600
KillWait=10
MailProg=/bin/true
InactiveLimit=0
{{nodes}}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""".replace("{nodes}", "\n".join(f"NodeName={h} NodeAddr={self._address(k)} CPUs={cpus} {topo} RealMemory=1000 "
                                  f"State=UNKNOWN" for k, h in enumerate(self.hosts))))
        self.env["SLURM_CONF"] = str(conf)
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":
                del self.env[var]   # started from inside another allocation: don't leak its settings
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
        self._wait(lambda: self._run(["scontrol", "ping"]).stdout.find("UP") >= 0, 60, "slurmctld to answer",
                   "slurmctld")
        for k, host in enumerate(self.hosts):
            slurmd = ["slurmd", "-D", "-f", str(conf), "-N", host]
            if self.nodes:   # `ip netns exec` mounts the namespace's own /sys, without cgroups: slurmd needs them
                slurmd = ["sh", "-c", f'{cgroup_mounts()} && exec "$@"', "sh", *slurmd]
            self._spawn(f"slurmd{k}", slurmd, node=k)
        self._wait(lambda: self.node_state() == "idle", 90, f"node(s) {', '.join(self.hosts)} to be idle",
                   "slurmd0", also=("slurmctld", *self._slurmds()[1:]))
        log(f"cluster up in {d}: node(s) {', '.join(self.hosts)} idle ({cpus} CPUs each)")
        mpi = " ".join(self._run(["srun", "--mpi=list"]).stdout.split())
        log(f"srun --mpi=list: {mpi}")

    def _wait(self, cond, timeout, what, name, also=()):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for n in (name, *also):
                self._alive(n)
            try:
                if cond():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.5)
        extra = f" (node state {self.node_state()!r})" if name.startswith("slurmd") else ""
        tail = ""
        logf = self.dir / "log" / (f"slurmd.{self.hosts[int(name[6:])]}.log" if name.startswith("slurmd")
                                   else f"{name}.log")
        if logf.exists():
            tail = " ".join(logf.read_text(errors="replace").splitlines()[-8:])
        raise SetupError(f"timed out after {timeout} s waiting for {what}{extra}: {tail}")

    def _address(self, k):
        return emulated.ip(k) if self.nodes else "127.0.0.1"

    def _run(self, cmd, timeout=30, **kw):
        return subprocess.run(self._on(0, cmd), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, **kw)

    def node_state(self):
        try:
            states = set(self._run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split())
            return states.pop() if len(states) == 1 else " ".join(sorted(states))
        except subprocess.SubprocessError:
            return ""

    def stop(self):
        if self.procs.get("slurmctld") and self.procs["slurmctld"][0].poll() is None:
            try:   # jobs still queued or running (timeout, Ctrl-C): cancel them while slurmctld can
                jobs = self._run(["squeue", "-h", "-o", "%i"], timeout=15).stdout.split()
                if jobs:
                    log(f"cancelling jobs {' '.join(jobs)}")
                    self._run(["scancel", *jobs], timeout=15)
                    end = time.monotonic() + 20
                    while time.monotonic() < end and self._run(["squeue", "-h", "-o", "%i"], timeout=15).stdout.split():
                        time.sleep(1)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in (*self._slurmds(), "slurmctld", "munged"):
            if name not in self.procs:
                continue
            proc, logf = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            logf.close()
        # job steps that outlived slurmd (slurmstepd and its children) still hold the temp dir's spool
        for pid in self._leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.nodes:
            emulated.down()
        if self.keep:
            log(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _leftover_pids(self):
        """Processes whose environment names this cluster's slurm.conf (job steps we started)."""
        pids, marker = [], f"SLURM_CONF={self.dir}/slurm.conf".encode()
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                if marker in (p / "environ").read_bytes().split(b"\0"):
                    pids.append(int(p.name))
            except OSError:
                pass
        return pids

    # -- jobs ----------------------------------------------------------------------------------------
    def submit(self, name, script, extra_env, args):
        env_spec = ",".join(["ALL", *(f"{k}={v}" for k, v in extra_env.items())])
        alloc = [f"--nodes={len(self.hosts)}", *ALLOC_ARGS[1:]]
        cmd = ["sbatch", "--parsable", f"--job-name=hvd-{name}", f"--output={self.dir / 'out' / name}-%j.out",
               f"--export={env_spec}", *alloc, str(SBATCH_DIR / script), *args]
        log(f"submit {name}: {' '.join(shlex.quote(c) for c in cmd)}")
        proc = self._run(cmd, cwd=ROOT)   # cwd = SLURM_SUBMIT_DIR: the scripts find .venv and examples/ there
        if proc.returncode != 0:
            return None, proc.stdout.strip()
        return proc.stdout.strip().split(";")[0], ""

    def job_info(self, jobid):
        out = self._run(["scontrol", "-o", "show", "job", jobid]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, jobid, timeout):
        end = time.monotonic() + timeout
        info = {}
        while time.monotonic() < end:
            for daemon in ("slurmctld", *self._slurmds()):
                self._alive(daemon)
            info = self.job_info(jobid)
            if info.get("JobState") in TERMINAL:
                return info
            time.sleep(2)
        self._run(["scancel", jobid])
        time.sleep(3)
        info = self.job_info(jobid)
        info["JobState"] = f"TIMEOUT-{timeout}s({info.get('JobState', '?')})"
        return info


def check_output(text, ratio_max, ranks=2):
    """(problems, matched lines) for one job's output file."""
    # mpirun --tag-output (horovodrun passes it) prefixes "[1,0]<stdout>:" to every chunk a rank writes, which
    # can land mid-line when a line's text and its newline are written separately (seen with Keras)
    text = TAG_RE.sub("", text)
    matched = []
    for line in text.splitlines():
        for rx in CHECK_RES:
            m = rx.search(line)
            if m:
                matched.append(m.group(0).strip())
                break
    problems = []
    sizes = SIZE_RE.findall(text)
    if [int(n) for n in sizes] != [ranks]:   # one world of `ranks` ranks, not `ranks` worlds of one
        problems.append(f"expected one 'size {ranks}' line, got sizes {sizes}")
    final = FINAL_RE.findall(text)
    if not final:
        problems.append("no 'final test_acc' line")
    else:
        ratio = float(final[-1][1])
        if not ratio < ratio_max:
            problems.append(f"ratio {ratio} not < {ratio_max}")
    if "replicas identical: True" not in text:
        problems.append("no 'replicas identical: True'")
    return problems, matched


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {', '.join(JOBS)}")
    ap.add_argument("--job-timeout", type=float, default=300, help="seconds per job (default 300)")
    ap.add_argument("--ratio-max", type=float, default=0.1, help="a job passes with byte ratio below this")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (conf, logs, job outputs)")
    ap.add_argument("--no-install", action="store_true", help="fail instead of apt-get installing Slurm/MUNGE")
    ap.add_argument("--show-output", action="store_true", help="print each failed job's output file")
    ap.add_argument("--nodes", type=int, default=1, choices=[1, 2],
                    help="2: two nodes of the emulated cluster (scripts/cluster.py), PyTorch jobs with "
                         "--transport hierarchical")
    a = ap.parse_args()
    names = [n for n in a.jobs.split(",") if n]
    unknown = [n for n in names if n not in JOBS]
    if unknown:
        ap.error(f"unknown jobs {unknown}; choose from {list(JOBS)}")

    start = time.monotonic()
    if os.geteuid() != 0:
        print("SETUP-FAILED: not root (slurmctld/slurmd/munged are started as root)", file=sys.stderr)
        return SETUP_FAILED
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        print(f"SETUP-FAILED: no {ROOT / '.venv'}; run scripts/setup.sh first", file=sys.stderr)
        return SETUP_FAILED
    cluster = None
    failed = 0
    old_term = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        try:
            ensure_installed(not a.no_install)
            cluster = Cluster(keep=a.keep, nodes=a.nodes)
            cluster.start()
        except SetupError as e:
            print(f"SETUP-FAILED: {e}", file=sys.stderr)
            return SETUP_FAILED
        # one job at a time: every job asks for all of the node's CPUs' worth of ranks
        for name in names:
            script, extra_env = JOBS[name]
            t0 = time.monotonic()
            # PyTorch jobs on several nodes compress between nodes only (TensorFlow has no such transport yet)
            hierarchical = a.nodes > 1 and script.startswith("pytorch")
            args = EXAMPLE_ARGS + (["--transport", "hierarchical"] if hierarchical else [])
            jobid, err = cluster.submit(name, script, extra_env, args)
            if jobid is None:
                print(f"JOB - {name} SUBMIT-FAILED FAIL sbatch: {err}", flush=True)
                failed += 1
                continue
            try:
                info = cluster.wait_job(jobid, a.job_timeout)
            except SetupError as e:
                print(f"JOB {jobid} {name} DAEMON-DIED FAIL {e}", flush=True)
                failed += 1
                break
            state = info.get("JobState", "?")
            out = Path(info.get("StdOut", "") or cluster.dir / "out" / f"{name}-{jobid}.out")
            text = out.read_text(errors="replace") if out.exists() else ""
            problems, matched = check_output(text, a.ratio_max, ranks=2 * a.nodes)
            if state != "COMPLETED":
                problems.insert(0, f"state {state} exit {info.get('ExitCode', '?')}")
            verdict = "FAIL " + "; ".join(problems) if problems else "PASS"
            failed += bool(problems)
            print(f"JOB {jobid} {name} {state} {verdict} ({time.monotonic() - t0:.0f} s) | "
                  + " | ".join(matched), flush=True)
            if problems and a.show_output:
                print(f"----- {out} -----\n{text[-6000:]}\n-----", flush=True)
    except KeyboardInterrupt:
        log("interrupted")
        failed += 1
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if cluster is not None:
            cluster.stop()
        log(f"{len(names)} jobs, {failed} failed, {time.monotonic() - start:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
