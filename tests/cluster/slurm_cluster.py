"""A real single-node Slurm cluster for tests: munged, slurmctld and slurmd started as root, no systemd.

    with SlurmCluster(tmp_path / "slurm") as cluster:
        job = cluster.sbatch("--array=0-3", "script.sbatch", env={"FOO": "1"})
        cluster.wait_done([job], timeout=120)

Everything lives in one scratch folder: slurm.conf, cgroup.conf, gres.conf, a copy of the munge key,
the munge socket, state, spool, pid and log files. The daemons run in the foreground as children of
this process (`-D` / `-F`), on free TCP ports, so several clusters (and a system-wide munged) do not
collide, and teardown stops exactly what was started: jobs are cancelled, `scontrol shutdown` stops
slurmctld and slurmd, munged is terminated, and any process still carrying this cluster's
SLURM_CONF in its environment (slurmstepd, job scripts) is killed by pid and reported.

Every wait is bounded; a failure raises `SlurmClusterError` with the tail of every daemon log.
The node can advertise fake GPUs (`gpus=N`: `Gres=gpu:N`, no device files), so job scripts that
request `--gpus-per-task=1` run unchanged on a GPU-less machine.

Configuration follows shared/FACTS.md "Running on clusters and object storage" (Slurm 22.05, Debian).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

#: Commands the cluster needs; `tests/cluster/install_slurm.sh` installs them.
REQUIRED_COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "scontrol")
MUNGE_KEY = Path("/etc/munge/munge.key")

# Job states in which a job (or array task) will not change any more.
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED",
}


class SlurmClusterError(RuntimeError):
    """The cluster could not be started, or a bounded wait ran out. The message has the daemon logs."""


def missing_commands() -> list[str]:
    return [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"({path}: {e})"
    return "\n".join(text[-lines:]) if text else "(empty)"


class SlurmCluster:
    """Context manager for a single-node Slurm cluster under `root` (created if missing)."""

    def __init__(self, root: Path, *, gpus: int = 0, cpus: int | None = None, real_memory_mb: int = 4000,
                 start_timeout: float = 180.0, extra_conf: str = "") -> None:
        if os.geteuid() != 0:
            raise SlurmClusterError("SlurmCluster runs slurmctld/slurmd as root: run the tests as root")
        missing = missing_commands()
        if missing:
            raise SlurmClusterError(
                f"Slurm/munge commands missing: {', '.join(missing)}; run tests/cluster/install_slurm.sh")
        self.root = Path(root).resolve()
        self.gpus = gpus
        self.cpus = cpus
        self.real_memory_mb = real_memory_mb
        self.start_timeout = start_timeout
        self.extra_conf = extra_conf
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._short_dir: str | None = None
        if len(str(self.munge_socket)) > 100:  # a Unix socket path must fit in 108 bytes
            self._short_dir = tempfile.mkdtemp(prefix="vpmunge-")
            self.munge_socket = Path(self._short_dir) / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env: dict[str, str] = {}
        self.startup_seconds: float | None = None
        self._started = False

    # ----- configuration -------------------------------------------------------------------------

    def _hardware(self) -> dict[str, int]:
        """What slurmd itself detects (`slurmd -C`): a node configured above it is rejected (INVAL)."""
        p = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60)
        line = p.stdout.splitlines()[0] if p.stdout else ""
        hw = {k: int(v) for k, v in (kv.split("=", 1) for kv in line.split() if "=" in kv) if v.isdigit()}
        if p.returncode != 0 or "CPUs" not in hw or "RealMemory" not in hw:
            raise SlurmClusterError(f"`slurmd -C` gave no node description (exit {p.returncode}):\n"
                                    f"{p.stdout}\n{p.stderr}")
        return hw

    def _write_config(self) -> None:
        r = self.root
        hw = self._hardware()
        self.cpus = min(self.cpus or hw["CPUs"], hw["CPUs"])
        self.real_memory_mb = min(self.real_memory_mb, hw["RealMemory"])
        for d in ("state", "spool", "run", "log", "munge", "jobs", "dev"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o755)  # clients (jobs, sbatch) reach the socket in it
        key = r / "munge" / "munge.key"
        if not MUNGE_KEY.is_file():
            raise SlurmClusterError(f"{MUNGE_KEY} missing: reinstall munge (tests/cluster/install_slurm.sh)")
        shutil.copyfile(MUNGE_KEY, key)  # owned by root: munged runs as root here
        os.chmod(key, 0o400)
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        gres_node = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        gres_types = "GresTypes=gpu\n" if self.gpus else ""
        text = f"""\
# Written by tests/cluster/slurm_cluster.py: a throw-away single-node cluster (Slurm 22.05).
ClusterName=vptest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MaxArraySize=1001
# Keep finished jobs visible to `scontrol show job` for the whole test (no accounting database).
MinJobAge=3600
# SIGTERM on scancel, then SIGKILL this many seconds later: time for a worker to commit.
KillWait=15
InactiveLimit=0
SlurmdTimeout=60
MessageTimeout=20
{gres_types}NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.real_memory_mb}{gres_node} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
{self.extra_conf}"""
        self.conf.write_text(text)
        # 22.05 rejects CgroupPlugin=disabled; autodetect is accepted and unused with task/none.
        (r / "cgroup.conf").write_text("CgroupPlugin=autodetect\n")
        if self.gpus:
            # Fake GPUs: slurmd drops a GPU without a device file ("Removing file-less GPU"), and the
            # node is then INVAL (count 0 < configured). Plain empty files serve as the devices.
            for i in range(self.gpus):
                (r / "dev" / f"fakegpu{i}").touch()
            (r / "gres.conf").write_text(
                f"AutoDetect=off\nNodeName={self.node} Name=gpu File={r}/dev/fakegpu[0-{self.gpus - 1}]\n")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # Do not let a caller's Slurm job environment leak into the test cluster's commands.
        for k in list(self.env):
            if k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")) and k != "SLURM_CONF":
                del self.env[k]
        self.env["SLURM_CONF"] = str(self.conf)

    # ----- start / stop ---------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.log_dir / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            cwd=self.root, start_new_session=True)
        out.close()

    def logs(self, lines: int = 40) -> str:
        """The last lines of each daemon's log (its captured stdout when the log file is empty)."""
        parts = []
        for name in ("munged", "slurmctld", "slurmd"):
            for p in (self.log_dir / f"{name}.log", self.log_dir / f"{name}.stdout"):
                if p.exists() and p.stat().st_size:
                    parts.append(f"--- {p} (last {lines} lines) ---\n{_tail(p, lines)}")
                    break
        return "\n".join(parts) or "(no daemon logs yet)"

    def _fail(self, msg: str) -> SlurmClusterError:
        return SlurmClusterError(f"{msg}\n{self.logs()}")

    def _check_alive(self, what: str) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise self._fail(f"{name} exited with {p.returncode} while {what}")

    def start(self) -> "SlurmCluster":
        t0 = time.monotonic()
        self._write_config()
        self._started = True
        try:
            self._spawn("munged", [
                "munged", "-F", "--force", f"--socket={self.munge_socket}",
                f"--key-file={self.root / 'munge' / 'munge.key'}",
                f"--pid-file={self.root / 'run' / 'munged.pid'}",
                f"--log-file={self.log_dir / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
            self._wait(lambda: self.munge_socket.exists(), 30, "munged to create its socket")
            # -D: foreground (our child), -i: ignore saved state (a fresh cluster), -c: clear jobs.
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-c", "-f", str(self.conf)])
            self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), 60, "slurmctld to answer `scontrol ping`")
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait(self._node_idle, self.start_timeout, f"node {self.node} to be idle in sinfo")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _ok(self, cmd: list[str], needle: str) -> bool:
        try:
            p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            return False
        return p.returncode == 0 and needle in p.stdout

    def _node_idle(self) -> bool:
        p = subprocess.run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"], env=self.env,
                           capture_output=True, text=True, timeout=20)
        state = p.stdout.strip().lower()
        if state.startswith(("drain", "down", "fail", "inval")):
            # A node that slurmctld rejected does not come back by itself: fail now, with the reason.
            reason = subprocess.run(["sinfo", "-h", "-R", "-o", "%T %E"], env=self.env, capture_output=True,
                                    text=True, timeout=20).stdout.strip()
            raise self._fail(f"node {self.node} is {state}: {reason}")
        return p.returncode == 0 and state == "idle"

    def _wait(self, cond, timeout: float, what: str, poll: float = 0.25) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(f"waiting for {what}")
            if cond():
                return
            if time.monotonic() > deadline:
                raise self._fail(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(poll)

    def stop(self) -> list[str]:
        """Cancel every job, stop the daemons, kill leftovers. Returns what had to be killed by force."""
        if not self._started:
            return []
        self._started = False
        forced: list[str] = []
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                q = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                                   timeout=20)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
            else:
                forced.append(f"jobs still in squeue after 45s: {q.stdout.split()}")
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None:
                continue
            if name == "munged" and p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
                forced.append(f"{name} (pid {p.pid}) did not stop by itself")
        for pid, cmdline in self.leftover_processes():
            try:
                os.kill(pid, signal.SIGKILL)
                forced.append(f"leftover pid {pid}: {cmdline}")
            except ProcessLookupError:
                pass
        if self._short_dir:
            shutil.rmtree(self._short_dir, ignore_errors=True)
        return forced

    def leftover_processes(self) -> list[tuple[int, str]]:
        """Processes (other than this one) whose environment names this cluster's slurm.conf."""
        needle = f"SLURM_CONF={self.conf}".encode()
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                env = (d / "environ").read_bytes()
                if needle in env.split(b"\0"):
                    cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    found.append((int(d.name), cmd))
            except OSError:
                continue
        return found

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        forced = self.stop()
        if forced and exc[0] is None:
            raise SlurmClusterError("teardown had to force-stop: " + "; ".join(forced) + "\n" + self.logs())

    # ----- helpers for tests -----------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run([str(c) for c in cmd], env={**self.env, **(env or {})}, capture_output=True,
                           text=True, timeout=timeout, cwd=cwd)
        if check and p.returncode != 0:
            raise self._fail(f"{' '.join(map(str, cmd))} exited {p.returncode}\nstdout: {p.stdout}\n"
                             f"stderr: {p.stderr}")
        return p

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> str:
        """Submit with `sbatch --parsable ARGS`; returns the job id (the array job id for arrays)."""
        p = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd or self.root / "jobs")
        return p.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> dict[str, dict[str, str]]:
        """`scontrol show job JOB` as {key: fields}. Keys: `JOBID` for a plain job, `ARRAYJOB_TASK`
        for an array task that has its own record (started or finished), `ARRAYJOB_[SPEC]` for the
        record of the array's tasks that are still pending together (e.g. `7_[2-3]`)."""
        p = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        out = {}
        for line in p.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "JobId" not in fields:
                continue
            task = fields.get("ArrayTaskId")
            if task is None:
                out[fields["JobId"]] = fields
            elif task.isdigit():
                out[f"{fields['ArrayJobId']}_{task}"] = fields
            else:
                out[f"{fields['ArrayJobId']}_[{task}]"] = fields
        return out

    def states(self, job_id: str) -> dict[str, str]:
        return {k: v.get("JobState", "?") for k, v in self.jobs(job_id).items()}

    def wait_done(self, job_ids: list[str], timeout: float, poll: float = 0.5) -> dict[str, dict[str, str]]:
        """Wait until every job (all tasks of each array) is in a final state; returns their records."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("waiting for jobs")
            recs = {}
            for j in job_ids:
                recs.update(self.jobs(j))
            pending = {k: v.get("JobState") for k, v in recs.items() if v.get("JobState") not in FINAL_STATES}
            if recs and not pending:
                return recs
            if time.monotonic() > deadline:
                q = self.run("squeue", "-a", "-o", "%.18i %.9T %.20r %j", check=False).stdout
                raise self._fail(f"timed out after {timeout:.0f}s waiting for jobs {job_ids}; not final: "
                                 f"{pending}\nsqueue:\n{q}")
            time.sleep(poll)


def main() -> None:  # `python tests/cluster/slurm_cluster.py`: start, show sinfo, stop; prints timings
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vp-slurm-") as d:
        with SlurmCluster(Path(d), gpus=4) as c:
            print(f"started in {c.startup_seconds:.1f}s")
            print(c.run("sinfo", "-N", "-l").stdout)
            t = time.monotonic()
        print(f"stopped in {time.monotonic() - t:.1f}s")


if __name__ == "__main__":
    main()
