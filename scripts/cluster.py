"""An emulated cluster on this machine: ``python -m scripts.cluster up [--nodes 2] [--rate-gbit 1] | down |
status | run NODE -- COMMAND...`` (needs root).

Each node is a network namespace ``hcnodeK`` with a hostname of its own (a UTS namespace: ``hcnodeK``) and an
sshd, joined to the other nodes by one veth link to a bridge (namespace ``hcnodebr``). tc limits each node's
link, both directions, to the inter-node rate, as a cluster's network does; the ranks of one node talk inside
their namespace at memory speed. So ``horovodrun -H hcnode0:2,hcnode1:2`` and ``mpirun -H hcnode0:2,hcnode1:2``,
started on hcnode0 (``run hcnode0 -- ...``), reach the other nodes over ssh as on a real cluster, and Horovod
gives each node its own local ranks. ``down`` removes everything ``up`` made (also after a crash); ``up``
removes leftovers of an earlier run first. The tc counters of the node side of each link are what left the
node (``Cluster.sent_bytes``).

What ``up`` writes outside its namespaces: ``/etc/netns/hcnodeK/hosts`` (the node names, seen only inside the
namespaces), ``/etc/ssh/ssh_config.d/hvd_compress_cluster.conf`` (the key and no host-key prompts for the
hcnode names only), and its state folder (keys, sshd configurations) in the temporary directory.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREFIX = "hcnode"
BRIDGE_NS, BRIDGE, BRIDGE_IP = "hcnodebr", "hcnbr0", "10.78.0.254"
NIC = "eth0"                     # each node's link, as the node sees it
STATE = Path(tempfile.gettempdir()) / "hvd_compress_cluster"
NETNS_ETC = Path("/etc/netns")   # `ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts
SSH_CONFIG = Path("/etc/ssh/ssh_config.d/hvd_compress_cluster.conf")
SSHD = "/usr/sbin/sshd"
NEEDS = ("the emulated cluster needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), iproute2 (`ip`, `tc`), util-linux "
         "(`unshare`) and OpenSSH (`ssh`, `sshd`, `ssh-keygen`: Debian's openssh-server, which scripts/setup.sh "
         "installs)")


def sh(*cmd, check=True):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def name(k):
    return f"{PREFIX}{k}"


def ip(k):
    return f"10.78.0.{k + 1}"


def preflight():
    """None when the cluster can be built here, else why not."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return f"{NEEDS}; running as uid {os.geteuid()} on {sys.platform}"
    missing = [tool for tool in ("ip", "tc", "unshare", "ssh", "ssh-keygen", SSHD) if shutil.which(tool) is None]
    if missing:
        return f"{NEEDS}; not found: {', '.join(missing)}"
    probe = f"{PREFIX}probe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return f"{NEEDS}; `ip netns add` failed: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return None


def our_namespaces():
    listing = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in listing.splitlines() if line.split() and line.split()[0].startswith(PREFIX)]


def down():
    """Everything ``up`` made, gone (what still runs in the namespaces, sshd included, is killed first)."""
    for ns in our_namespaces():
        for pid in sh("ip", "netns", "pids", ns, check=False).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", ns, check=False)
    for folder in NETNS_ETC.glob(f"{PREFIX}*") if NETNS_ETC.is_dir() else []:
        shutil.rmtree(folder, ignore_errors=True)
    SSH_CONFIG.unlink(missing_ok=True)
    shutil.rmtree(STATE, ignore_errors=True)
    return our_namespaces()


class Cluster:
    """``nodes`` namespaces with sshd, links limited to ``rate_gbit`` each way. A context manager: up, then
    down on leaving (also on error)."""

    def __init__(self, nodes=2, rate_gbit=1.0):
        if nodes < 1 or nodes > 200:
            raise ValueError(f"nodes must be 1..200, got {nodes!r}")
        if not rate_gbit > 0:
            raise ValueError(f"rate_gbit must be > 0, got {rate_gbit!r}")
        self.nodes, self.rate_bps = int(nodes), float(rate_gbit) * 1e9
        self.names = [name(k) for k in range(self.nodes)]

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        down()

    def up(self):
        why = preflight()
        if why:
            raise RuntimeError(why)
        down()
        STATE.mkdir(mode=0o700)
        key = STATE / "id_ed25519"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(STATE / "host_key"))
        shutil.copy(f"{key}.pub", STATE / "authorized_keys")
        SSH_CONFIG.parent.mkdir(parents=True, exist_ok=True)
        SSH_CONFIG.write_text(f"# hvd_compress's emulated cluster (scripts/cluster.py); removed by its `down`\n"
                              f"Host {' '.join(self.names)}\n    IdentityFile {key}\n    StrictHostKeyChecking no\n"
                              f"    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n")
        Path("/run/sshd").mkdir(exist_ok=True)   # sshd's privilege separation directory
        sh("ip", "netns", "add", BRIDGE_NS)
        sh("ip", "-n", BRIDGE_NS, "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "-n", BRIDGE_NS, "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
        sh("ip", "-n", BRIDGE_NS, "link", "set", BRIDGE, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{ip(k)} {n}\n" for k, n in enumerate(self.names))
        for k, ns in enumerate(self.names):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(hosts)
            # the same interface name on every node: Horovod's launcher looks for one common to all hosts
            sh("ip", "-n", BRIDGE_NS, "link", "add", f"hcnb{k}", "type", "veth", "peer", "name", NIC, "netns", ns)
            sh("ip", "-n", BRIDGE_NS, "link", "set", f"hcnb{k}", "master", BRIDGE)
            sh("ip", "-n", BRIDGE_NS, "link", "set", f"hcnb{k}", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip(k)}/24", "dev", NIC)
            sh("ip", "-n", ns, "link", "set", NIC, "up")
            for where, dev in self.link_ends(k):
                sh("tc", "-n", where, "qdisc", "replace", "dev", dev, "root", *self.tbf())
            self._start_sshd(k)
        for k in range(self.nodes):
            self._wait_for_ssh(k)
        return self

    def tbf(self):
        burst = max(256 * 1024, int(self.rate_bps / 8 * 1e-3))   # a few GSO packets, or 1 ms at the rate
        return ["tbf", "rate", str(int(self.rate_bps)), "burst", str(burst), "latency", "20ms"]

    def link_ends(self, k):
        """(namespace, device) of node k's link: its own end (egress: what leaves the node), the bridge's."""
        return [(self.names[k], NIC), (BRIDGE_NS, f"hcnb{k}")]

    def _start_sshd(self, k):
        config = STATE / f"sshd_{k}.conf"
        config.write_text(f"ListenAddress {ip(k)}\nHostKey {STATE / 'host_key'}\nPidFile {STATE / f'sshd_{k}.pid'}\n"
                          f"AuthorizedKeysFile {STATE / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                          f"PasswordAuthentication no\nStrictModes no\nUsePAM no\nPrintMotd no\nAcceptEnv *\n")
        # sshd -D in the node's namespaces; the sessions it starts inherit the node's network, hosts and hostname
        subprocess.Popen(self.on(k, [SSHD, "-D", "-e", "-f", str(config)]), stdout=subprocess.DEVNULL,
                         stderr=open(STATE / f"sshd_{k}.log", "w"), start_new_session=True)

    def _wait_for_ssh(self, k, timeout_s=20):
        deadline = time.time() + timeout_s
        while True:
            proc = subprocess.run(self.on(0, ["ssh", "-o", "BatchMode=yes", self.names[k], "hostname"]),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode == 0 and proc.stdout.strip() == self.names[k]:
                return
            if time.time() > deadline:
                raise RuntimeError(f"ssh to {self.names[k]} did not work within {timeout_s} s: {proc.stdout.strip()}"
                                   f"\n{(STATE / f'sshd_{k}.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def on(self, k, command):
        """The command line that runs ``command`` on node k (its network namespace and hostname)."""
        return ["ip", "netns", "exec", self.names[k], "unshare", "--uts", "sh", "-c",
                f'hostname {self.names[k]} && exec "$@"', "sh", *command]

    def hosts(self, ranks_per_node):
        """``-H`` for horovodrun and mpirun."""
        return ",".join(f"{n}:{ranks_per_node}" for n in self.names)

    def sent_bytes(self):
        """Bytes each node has sent over its link so far (tc's counter of the node's end)."""
        import re
        counts = []
        for ns, dev in (self.link_ends(k)[0] for k in range(self.nodes)):
            match = re.search(r"Sent (\d+) bytes", sh("tc", "-n", ns, "-s", "qdisc", "show", "dev", dev))
            counts.append(int(match.group(1)) if match else None)
        return counts

    def describe(self):
        return (f"{self.nodes} nodes {', '.join(self.names)} (network + UTS namespaces, sshd each), veth {NIC} "
                f"({ip(0)[:-1]}K+1/24) <-> hcnbK on bridge {BRIDGE} in namespace {BRIDGE_NS}; tc "
                f"{' '.join(self.tbf())} on both ends of every node's link")


def mpirun(hosts, np, command, env_names=()):
    """mpirun across the nodes: ssh (as configured by ``up``) starts Open MPI's daemons, TCP on the nodes'
    links only; ``env_names``: variables passed on to the ranks."""
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(np), "-H", hosts,
            "--mca", "plm_rsh_agent", "ssh", "--mca", "btl_tcp_if_include", "10.78.0.0/24",
            "--mca", "oob_tcp_if_include", "10.78.0.0/24",
            *[arg for variable in env_names for arg in ("-x", variable)], *command]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    up_ = sub.add_parser("up", help="build the cluster (removing an earlier one first)")
    up_.add_argument("--nodes", type=int, default=2)
    up_.add_argument("--rate-gbit", type=float, default=1.0, help="each node's link, each way (Gbit/s)")
    sub.add_parser("down", help="remove everything `up` made")
    sub.add_parser("status", help="the namespaces that exist now")
    run = sub.add_parser("run", help="run a command on a node (e.g. horovodrun -H hcnode0:2,hcnode1:2 ...)")
    run.add_argument("node", help="hcnodeK")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.what == "up":
        try:
            cluster = Cluster(args.nodes, args.rate_gbit).up()
        except Exception:
            down()
            raise
        print(f"cluster up: {cluster.describe()}\nnext: python -m scripts.cluster run {name(0)} -- horovodrun "
              f"-np {2 * args.nodes} -H {cluster.hosts(2)} python ...   (then: python -m scripts.cluster down)")
    elif args.what == "down":
        left = down()
        print("cluster down" if not left else f"left: {left}")
        return 1 if left else 0
    elif args.what == "status":
        print(" ".join(our_namespaces()) or "no cluster")
    else:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command or not args.node.startswith(PREFIX) or args.node not in our_namespaces():
            parser.error(f"run needs a node of the cluster (now: {' '.join(our_namespaces()) or 'none'}) and a "
                         f"command")
        k = int(args.node[len(PREFIX):])
        nodes = len([ns for ns in our_namespaces() if ns != BRIDGE_NS])
        return subprocess.call(Cluster(nodes).on(k, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
