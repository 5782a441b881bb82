"""A real NFS server for tests: nfs-ganesha (VFS backend) exporting a temporary directory,
with its own rpcbind, inside its own network and mount namespace.

Why a namespace at all: ganesha registers its NFS and MOUNT programs with the rpcbind it
finds through /run/rpcbind.sock, replacing another server's registrations and deleting them
when it exits, and rpcbind itself needs port 111. A network namespace gives the test server
its own port space; a mount namespace with a tmpfs on /run gives it its own rpcbind socket.
Nothing on the host (another ganesha, the host's rpcbind, a parallel test run) is touched.

How the test process reaches it: a veth pair joins the namespace to the host on a private
/30 from 198.18.0.0/15 (the range reserved for network benchmarking, RFC 2544, so it clashes
with no real network). A loopback address inside the namespace would be unreachable from the
host, and running the client inside the namespace too would need every reader thread moved
into it. Over the veth the client is exactly a remote NFS client: the portmapper on port 111,
NFSv3 MOUNT, NFSv4 on 2049, real TCP (so a killed server or a downed link behave as on a
real network).

Isolation and clean-up:
- Each server claims a slot n (namespace `dcnfs<n>`, veth `dcnfs<n>h`/`dcnfs<n>n`, subnet
  198.18.<n/64>.<4(n%64)>/30) with `ip netns add`, which fails if the name exists: parallel
  runs never share one.
- rpcbind and ganesha run under `setpriv --pdeathsig KILL`, so they die with the test process
  even when it is killed; a slot left behind by a killed run (its veth names a dead owner pid)
  is reclaimed by the next run.
- `close()` kills both processes (SIGTERM, SIGKILL after a grace period), deletes the veth and
  the namespace. Every wait is bounded.
- ganesha's state (pid file, NFSv4 recovery directory, logs) lives in the work directory.

Requires root and the Debian packages nfs-ganesha, nfs-ganesha-vfs and rpcbind (scripts/test
installs them); `unavailable_reason()` says what is missing so tests can skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

START_TIMEOUT_SECONDS = 30.0
STOP_GRACE_SECONDS = 5.0
COMMAND_TIMEOUT_SECONDS = 10.0
SLOTS = 64
PSEUDO_ROOT = "/export"
_GANESHA = "/usr/bin/ganesha.nfsd"
_OWNER_ALIAS = "datacache-test-nfs pid="


class NfsServerError(Exception):
    pass


def unavailable_reason() -> str | None:
    """Why an NFS test server cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and mounts)"
    missing = [
        tool for tool in ("ip", "nsenter", "setpriv", "rpcbind", "rpcinfo") if not _which(tool)
    ]
    if not os.access(_GANESHA, os.X_OK):
        missing.append("ganesha.nfsd (Debian nfs-ganesha)")
    if not glob.glob("/usr/lib/*/ganesha/libfsalvfs.so") + glob.glob(
        "/usr/lib*/ganesha/libfsalvfs.so"
    ):
        missing.append("libfsalvfs.so (Debian nfs-ganesha-vfs)")
    if missing:
        return "not installed: " + ", ".join(missing) + " (scripts/test installs them)"
    return None


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False
    )
    if check and result.returncode != 0:
        raise NfsServerError(f"{' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _slot_names(slot: int) -> tuple[str, str, str, str, str]:
    """(namespace, host veth, namespace veth, host address, server address) of a slot."""
    base = 4 * (slot % 64)
    net = f"198.18.{slot // 64}"
    name = f"dcnfs{slot}"
    return name, f"{name}h", f"{name}n", f"{net}.{base + 1}", f"{net}.{base + 2}"


def _owner_alive(host_veth: str) -> bool | None:
    """Whether the run that created this veth is alive; None if there is no such veth."""
    try:
        alias = Path(f"/sys/class/net/{host_veth}/ifalias").read_text().strip()
    except OSError:
        return None
    if not alias.startswith(_OWNER_ALIAS):
        return True  # not made by this helper: not ours to judge
    try:
        os.kill(int(alias[len(_OWNER_ALIAS) :]), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True
    return True


class NfsServer:
    """nfs-ganesha serving `export_dir` as nfs://<address>/export/ over NFSv3 and NFSv4,
    read-only, without root squashing."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.export_dir = workdir / "export"
        self.address = ""
        self._slot: int | None = None
        self._rpcbind: subprocess.Popen[bytes] | None = None
        self._ganesha: subprocess.Popen[bytes] | None = None

    @property
    def ganesha_pid(self) -> int | None:
        """The NFS server's process id while it runs (benchmarks read its CPU time)."""
        return self._ganesha.pid if self._ganesha is not None else None

    def uri(self, path: str = "") -> str:
        """nfs:// URI of `path` (relative to the exported directory)."""
        return f"nfs://{self.address}{PSEUDO_ROOT}/{path}"

    def __enter__(self) -> NfsServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise NfsServerError(reason)
        self.export_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "recovery").mkdir(exist_ok=True)
        self._claim_slot()
        self._start_rpcbind()
        self.start_ganesha()

    def _claim_slot(self) -> None:
        for slot in range(SLOTS):
            netns, host_veth, ns_veth, host_ip, server_ip = _slot_names(slot)
            if _run("ip", "netns", "add", netns, check=False).returncode != 0:
                if _owner_alive(host_veth) is False:
                    # Left by a run that was killed: its processes died with it.
                    _run("ip", "link", "del", host_veth, check=False)
                    _run("ip", "netns", "del", netns, check=False)
                    if _run("ip", "netns", "add", netns, check=False).returncode != 0:
                        continue
                else:
                    continue
            self._slot = slot
            if _owner_alive(host_veth) is False:
                _run("ip", "link", "del", host_veth, check=False)
            _run("ip", "link", "add", host_veth, "type", "veth", "peer", "name", ns_veth)
            _run("ip", "link", "set", "dev", host_veth, "alias", f"{_OWNER_ALIAS}{os.getpid()}")
            _run("ip", "link", "set", ns_veth, "netns", netns)
            _run("ip", "addr", "add", f"{host_ip}/30", "dev", host_veth)
            _run("ip", "link", "set", host_veth, "up")
            _run("ip", "-n", netns, "addr", "add", f"{server_ip}/30", "dev", ns_veth)
            _run("ip", "-n", netns, "link", "set", ns_veth, "up")
            _run("ip", "-n", netns, "link", "set", "lo", "up")
            self.address = server_ip
            return
        raise NfsServerError(f"all {SLOTS} test NFS namespaces (dcnfs0..) are in use")

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.out").open("ab")
        try:
            return subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()

    def _start_rpcbind(self) -> None:
        assert self._slot is not None
        netns = _slot_names(self._slot)[0]
        # `ip netns exec` enters the network namespace and a fresh mount namespace (mounts
        # made there do not propagate to the host); the tmpfs on /run hides the host's
        # /run/rpcbind.sock from rpcbind and, later, from ganesha.
        script = (
            "mount -t tmpfs -o size=8m,mode=0755 datacache-test-nfs /run"
            " && mkdir -p /run/rpcbind && exec rpcbind -f"
        )
        self._rpcbind = self._spawn("rpcbind", ["ip", "netns", "exec", netns, "sh", "-c", script])
        self._wait(lambda: self._rpc_ready("portmapper", "2"), "rpcbind", self._rpcbind)

    def _config(self) -> str:
        return f"""
NFS_CORE_PARAM {{
    Protocols = 3, 4;
    NFS_Port = 2049;
    MNT_Port = 20048;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    # The same path (the pseudo path) mounts over NFSv3 and NFSv4.
    Mount_Path_Pseudo = true;
}}
NFSV4 {{
    Graceless = true;
    RecoveryBackend = fs;
    RecoveryRoot = "{self.workdir / "recovery"}";
}}
EXPORT {{
    Export_Id = 1;
    Path = "{self.export_dir}";
    Pseudo = "{PSEUDO_ROOT}";
    Access_Type = RO;
    Squash = No_Root_Squash;
    SecType = sys;
    Transports = TCP;
    Protocols = 3, 4;
    # Tests change files behind ganesha's back: no attribute caching, so a changed file is
    # seen at once (with the default 60 s it would look unchanged).
    Attr_Expiration_Time = 0;
    FSAL {{ Name = VFS; }}
}}
"""

    def start_ganesha(self) -> None:
        """Starts (or restarts) ganesha in the namespace of the running rpcbind."""
        assert self._rpcbind is not None
        if self._ganesha is not None and self._ganesha.poll() is None:
            raise NfsServerError("ganesha is already running")
        config = self.workdir / "ganesha.conf"
        config.write_text(self._config())
        args = [
            "nsenter",
            f"--target={self._rpcbind.pid}",
            "--net",
            "--mount",
            _GANESHA,
            "-F",
            "-f",
            str(config),
            "-L",
            str(self.workdir / "ganesha.log"),
            "-p",
            str(self.workdir / "ganesha.pid"),
        ]
        self._ganesha = self._spawn("ganesha", args)
        process = self._ganesha
        self._wait(
            lambda: all(
                self._rpc_ready(program, version)
                for program, version in (("mountd", "3"), ("nfs", "3"), ("nfs", "4"))
            ),
            "nfs-ganesha",
            process,
        )

    def kill_ganesha(self) -> None:
        """Kills the NFS server abruptly (SIGKILL), as a crash would; rpcbind stays."""
        if self._ganesha is not None:
            _stop(self._ganesha, signal.SIGKILL)

    def cut_network(self) -> None:
        """Takes the server's side of the link down: the server stays up but unreachable."""
        assert self._slot is not None
        netns, _, ns_veth, _, _ = _slot_names(self._slot)
        _run("ip", "-n", netns, "link", "set", ns_veth, "down")

    def _rpc_ready(self, program: str, version: str) -> bool:
        # rpcinfo -t calls the program's NULL procedure over TCP: registered and answering.
        try:
            result = subprocess.run(
                ["rpcinfo", "-t", self.address, program, version],
                capture_output=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def _wait(self, ready: Callable[[], bool], what: str, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not ready():
            if process.poll() is not None:
                raise NfsServerError(f"{what} exited with {process.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise NfsServerError(
                    f"{what} not ready after {START_TIMEOUT_SECONDS:.0f}s:\n{self.logs()}"
                )
            # Readiness is an RPC answer from another process: nothing to wait on but time.
            time.sleep(0.1)

    def logs(self) -> str:
        parts = []
        for name in ("rpcbind.out", "ganesha.out", "ganesha.log"):
            path = self.workdir / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-20:]
                parts.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def close(self) -> None:
        for process in (self._ganesha, self._rpcbind):
            if process is not None:
                _stop(process, signal.SIGTERM)
        self._ganesha = self._rpcbind = None
        if self._slot is not None:
            netns, host_veth, _, _, _ = _slot_names(self._slot)
            # Deleting one end of a veth pair deletes both.
            _run("ip", "link", "del", host_veth, check=False)
            _run("ip", "netns", "del", netns, check=False)
            self._slot = None


def _stop(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(STOP_GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(STOP_GRACE_SECONDS)
