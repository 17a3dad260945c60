#!/usr/bin/env python3
"""Run one `vae-pipeline precompute` over a Ray cluster: one Ray task per partition.

    python pipelines/ray/launch.py --bin PATH --partitions N [--num-gpus 1] [--num-cpus C]
        [--max-retries 3] [--address auto] -- <precompute flags: --pipeline, --input, --out, ...>

--input and --out may come from the `--pipeline` preset instead of the flags.

What it does, in order:

1. `vae-pipeline plan FLAGS --partitions N` on this machine (idempotent: a rerun with the same
   flags reuses the plan), then `vae-pipeline status OUT --json`.
2. One Ray task per partition that `status` does not show as done (nor as running: a live worker
   already owns it). A task runs `vae-pipeline precompute FLAGS --partitions N --partition I` as a
   subprocess in this launcher's working directory and raises, with the tail of its output, on a
   non-zero exit. Ray retries a failed task `--max-retries` times (`retry_exceptions=True`); a
   rerun of a partition continues from its committed rows.
3. Waits for every task, prints `status`, and runs `vae-pipeline finalize OUT` (`_manifest.jsonl`,
   `_SUCCESS`) when every partition is done. Exits 0 on success, 1 naming the partitions that stayed
   failed (or when finalize fails), 2 on a usage error or a failed `plan`/`status`.

Rerunning the same command after any failure resubmits only the partitions that are not done.

On a real cluster (see pipelines/ray/README.md):

- Every node needs the binary and the inputs at the same paths (a shared filesystem, or the wheel
  installed on every node with `--bin vae-pipeline`) and the output reachable from every node (a
  shared filesystem or an s3:// URL). Tasks run in this launcher's working directory when that
  folder exists on their node, so relative paths work on a shared filesystem; use absolute paths
  otherwise.
- GPUs: `--num-gpus 1` gives each task one GPU. Ray sets `CUDA_VISIBLE_DEVICES` to that GPU, and the
  launcher adds `--device cuda` unless the flags choose a device. The default `--num-gpus 0` is for
  CPU clusters; with 0 on a GPU node every task would see every GPU.
- Threads: unless the flags give `--threads`, each task gets `--threads ceil(num_cpus)` (at least 1)
  so that the tasks on one node share its cores as Ray accounts them (the binary's own default,
  0, means all cores for every task). Fractional `--num-cpus` (0.5) packs more tasks per core.
- Environment: tasks get the Ray worker's environment plus this launcher's `VAE_PIPELINE_*` and
  `ORT_*` variables and any named with `--env NAME` (e.g. `--env AWS_PROFILE` for s3:// outputs).
- If a Ray worker dies (node lost, OOM kill), the binary it ran is killed with it (Linux
  parent-death signal), so the retry does not find the partition still locked. Rows committed
  before are kept; the retry continues from them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

#: Lines of a failed attempt's output carried in the exception (and so in the final report).
TAIL_LINES = 20
#: Environment variables (by prefix) that travel from the launcher to every task.
FORWARD_PREFIXES = ("VAE_PIPELINE_", "ORT_")
#: Flags the launcher sets itself, or that would be unsafe in a retried multi-worker run.
RESERVED_FLAGS = ("--partition", "--partitions", "--overwrite")


class PartitionFailed(RuntimeError):
    """A `precompute --partition I` attempt exited non-zero (Ray retries it)."""


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the binary if the Ray worker that started it dies (Linux only).

    Without this a killed worker leaves its binary running and holding the partition's lock, and
    Ray's retry of the task is refused. SIGKILL (not SIGTERM) frees the lock at once; shards are
    committed atomically, so nothing committed is lost.
    """
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # not Linux, or no prctl: the retry may then be refused while it runs
        pass


def run_partition(
    binary: str,
    flags: list[str],
    partitions: int,
    partition: int,
    cwd: str,
    env: dict[str, str],
) -> dict:
    """The Ray task body: one attempt at one partition. Raises PartitionFailed on non-zero exit."""
    import socket
    import tempfile
    from collections import deque

    host = socket.gethostname()
    cmd = [binary, "precompute", *flags, "--partitions", str(partitions), "--partition", str(partition)]
    workdir = cwd if os.path.isdir(cwd) else None
    if workdir is None:
        print(
            f"[partition {partition}] {cwd} does not exist on {host}: running in "
            f"{os.getcwd()}; relative paths in the flags will not resolve",
            file=sys.stderr,
        )
    full_env = dict(os.environ)
    full_env.update(env)
    start = time.monotonic()
    # Output goes to a temporary file (not a pipe): nothing to drain, and only its tail is kept.
    with tempfile.TemporaryFile(mode="w+b") as log:
        try:
            rc = subprocess.run(
                cmd,
                cwd=workdir,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                check=False,
            ).returncode
        except OSError as e:  # binary missing or not executable on this node
            raise PartitionFailed(f"partition {partition} on {host}: cannot run {binary}: {e}") from None
        log.seek(0)
        tail = deque((line.decode("utf-8", "replace").rstrip("\n") for line in log), maxlen=TAIL_LINES)
    seconds = time.monotonic() - start
    if rc != 0:
        msg = (
            f"partition {partition} on {host}: exit {rc} after {seconds:.1f} s\n"
            f"command: {' '.join(cmd)}\n--- last {len(tail)} lines of output ---\n" + "\n".join(tail)
        )
        # Printed too, so that every failed attempt shows in the driver's log (Ray forwards it),
        # not only the last one.
        print(f"[partition {partition}] attempt failed: exit {rc} on {host}", file=sys.stderr, flush=True)
        raise PartitionFailed(msg)
    return {"partition": partition, "host": host, "seconds": seconds, "tail": list(tail)[-3:]}


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Launcher arguments before the first `--`, precompute flags after it."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def flag_value(flags: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in flags (the last one wins, as in the binary)."""
    value = None
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif f.startswith(name + "="):
            value = f[len(name) + 1 :]
    return value


def has_flag(flags: list[str], name: str) -> bool:
    return any(f == name or f.startswith(name + "=") for f in flags)


def resolved_out(binary: str, flags: list[str]) -> str | None:
    """The run's --out: the flag, else what the binary resolves from the preset (`--print-config`,
    which anchors a relative `out` at the preset's folder, as the workers do)."""
    out = flag_value(flags, "--out")
    if out:
        return out
    proc = run_bin(binary, ["precompute", *flags, "--print-config"], "precompute --print-config")
    if proc.returncode != 0:
        fail_usage(proc, "vae-pipeline precompute --print-config")
    try:
        import tomllib

        return tomllib.loads(proc.stdout).get("out") or None
    except ImportError:  # Python < 3.11: the line `out = "..."` (a TOML basic string is JSON)
        for line in proc.stdout.splitlines():
            if line.startswith("out = "):
                return json.loads(line[len("out = "):]) or None
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.py",
        usage="%(prog)s --bin PATH --partitions N [options] -- PRECOMPUTE_FLAGS...",
        description="Run `vae-pipeline precompute` over a Ray cluster, one Ray task per partition,\n"
        "then finalize the output. Everything after `--` goes to `plan` and to every\n"
        "`precompute` task: --pipeline/--model, --input, --out, ... (--input and --out may come\n"
        "from the --pipeline preset).",
        epilog="example (on the head node of a cluster, one GPU per task):\n"
        "  python pipelines/ray/launch.py --bin /shared/bin/vae-pipeline --partitions 64 \\\n"
        "      --num-gpus 1 --num-cpus 8 --address auto -- \\\n"
        "      --pipeline /shared/sdxl-1024-buckets.toml --input /shared/photos --out /shared/latents\n"
        "Rerun the same command to resume: partitions already done are not resubmitted.\n"
        "Exit status: 0 finalized; 1 partitions failed or finalize failed; 2 usage, plan or status error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bin", required=True, metavar="PATH",
                   help="vae-pipeline binary: a path (the same on every node) or a name on each node's PATH")
    p.add_argument("--partitions", type=int, required=True, metavar="N", help="number of partitions (one Ray task each)")
    p.add_argument("--num-gpus", type=float, default=0.0, metavar="G",
                   help="GPUs per task: 1 on a GPU cluster (adds --device cuda); fractions share a GPU (default 0)")
    p.add_argument("--num-cpus", type=float, default=1.0, metavar="C",
                   help="CPUs per task, fractions allowed (0.5: two tasks per core); also the binary's "
                   "--threads, rounded up, unless the flags give it (default 1)")
    p.add_argument("--max-retries", type=int, default=3, metavar="R",
                   help="Ray retries of a failed partition task (default 3)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="Ray cluster to join: 'auto' (the one started on this node), HOST:PORT, or "
                   "ray://HOST:10001 (default: $RAY_ADDRESS, else a cluster running on this node, "
                   "else a new local one)")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="also forward this environment variable to the tasks (repeatable); "
                   "VAE_PIPELINE_* and ORT_* always are")
    return p


def run_bin(binary: str, args: list[str], what: str) -> subprocess.CompletedProcess:
    """Run the binary here (on the driver); return the finished process (output captured)."""
    cmd = [binary, *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    except OSError as e:
        sys.exit(f"launch.py: cannot run {binary} for {what}: {e}")


def fail_usage(proc: subprocess.CompletedProcess, what: str) -> None:
    sys.stderr.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    print(f"launch.py: `{what}` exited {proc.returncode}", file=sys.stderr)
    sys.exit(2)


def read_status(binary: str, out: str) -> dict:
    proc = run_bin(binary, ["status", out, "--json"], "status")
    if proc.returncode != 0:
        fail_usage(proc, f"vae-pipeline status {out} --json")
    try:
        status = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        print(proc.stdout, file=sys.stderr)
        print(f"launch.py: `status --json` printed something that is not JSON: {e}", file=sys.stderr)
        sys.exit(2)
    for key in ("done", "running", "missing"):
        status[key] = sorted(int(x) for x in status.get(key, []))
    return status


def fmt_parts(parts) -> str:
    return ", ".join(str(p) for p in sorted(parts)) or "none"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    mine, flags = split_argv(argv)
    parser = build_parser()
    args = parser.parse_args(mine)
    if not flags:
        parser.error("give the precompute flags after `--` (at least --pipeline or --model)")
    if args.partitions < 1:
        parser.error("--partitions must be at least 1")
    if args.num_cpus < 0 or args.num_gpus < 0 or args.max_retries < 0:
        parser.error("--num-cpus, --num-gpus and --max-retries must not be negative")
    for f in RESERVED_FLAGS:
        if has_flag(flags, f):
            parser.error(f"{f} must not be among the precompute flags (the launcher sets partitions; "
                         "--overwrite would make every retry start its partition again)")

    cwd = os.getcwd()
    binary = args.bin
    if os.sep in binary:  # a path, not a name looked up on PATH: the same absolute path on every node
        binary = str(Path(binary).absolute())
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            parser.error(f"--bin {binary} is not an executable file")
    out = resolved_out(binary, flags)
    if not out:
        parser.error("no output: give --out among the precompute flags, or set `out` in the --pipeline preset")
    # Run settings (not part of the run's identity, so a rerun with other values resumes).
    if not has_flag(flags, "--threads"):
        flags = [*flags, "--threads", str(max(1, math.ceil(args.num_cpus)))]
    if args.num_gpus > 0 and not has_flag(flags, "--device"):
        flags = [*flags, "--device", "cuda"]
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)}
    for name in args.env:
        if name in os.environ:
            env[name] = os.environ[name]
        else:
            print(f"launch.py: --env {name}: not set here, not forwarded", file=sys.stderr)

    # 1. The plan (on this machine), then what is already done.
    proc = run_bin(binary, ["plan", *flags, "--partitions", str(args.partitions)], "plan")
    if proc.returncode != 0:
        fail_usage(proc, "vae-pipeline plan")
    sys.stdout.write(proc.stdout)
    status = read_status(binary, out)
    if status.get("partitions") not in (None, args.partitions):
        print(f"launch.py: {out} is planned with {status['partitions']} partitions, not {args.partitions}", file=sys.stderr)
        return 2
    done, running = set(status["done"]), set(status["running"])
    todo = [i for i in range(args.partitions) if i not in done and i not in running]
    if running:
        print(f"launch.py: partitions {fmt_parts(running)} are being written by another worker now; not submitted")
    print(f"launch.py: {len(done)} of {args.partitions} partitions already done; submitting {len(todo)}", flush=True)

    # 2. One Ray task per partition left.
    failed: dict[int, str] = {}
    if todo:
        import ray  # here, so that --help and usage errors need no Ray

        if __name__ != "__main__":  # imported (not run as a script): ship this module's code by value
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        t0 = time.monotonic()
        try:
            ray.init(address=args.address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            print(f"launch.py: cannot join the Ray cluster (--address {args.address}): {e}", file=sys.stderr)
            return 2
        try:
            print(f"launch.py: Ray cluster ready in {time.monotonic() - t0:.1f} s: {ray.cluster_resources()}", flush=True)
            warn_unplaceable(ray, args.num_cpus, args.num_gpus)
            task = ray.remote(run_partition)
            refs = {
                task.options(
                    num_cpus=args.num_cpus,
                    num_gpus=args.num_gpus,
                    max_retries=args.max_retries,
                    retry_exceptions=True,
                    name=f"vae-pipeline-partition-{i}",
                ).remote(binary, flags, args.partitions, i, cwd, env): i
                for i in todo
            }
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    i = refs[ref]
                    try:
                        r = ray.get(ref)
                        last = r["tail"][-1] if r["tail"] else ""
                        print(f"launch.py: partition {i} done on {r['host']} in {r['seconds']:.1f} s: {last}", flush=True)
                    except ray.exceptions.RayTaskError as e:
                        cause = e.cause if isinstance(e.cause, BaseException) else e
                        failed[i] = str(cause)
                        print(f"launch.py: partition {i} FAILED after {args.max_retries} retries:\n{cause}", flush=True)
                    except ray.exceptions.RayError as e:  # worker/node lost beyond the retries
                        failed[i] = f"{type(e).__name__}: {e}"
                        print(f"launch.py: partition {i} FAILED: {failed[i]}", flush=True)
            print(f"launch.py: all {len(todo)} tasks ended in {time.monotonic() - t0:.1f} s", flush=True)
        except KeyboardInterrupt:
            print("launch.py: interrupted; Ray stops the tasks; rerun the same command to resume", file=sys.stderr)
            return 130
        finally:
            ray.shutdown()

    # 3. Status, then finalize.
    status = read_status(binary, out)
    print("launch.py: status " + json.dumps(status, sort_keys=True), flush=True)
    not_done = sorted(set(range(args.partitions)) - set(status["done"]))
    if failed or not_done:
        print(
            f"launch.py: not finalized: partitions failed: {fmt_parts(failed)}; not done: {fmt_parts(not_done)}. "
            "Rerun the same command to resume them.",
            file=sys.stderr,
        )
        return 1
    proc = run_bin(binary, ["finalize", out], "finalize")
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        print(f"launch.py: `vae-pipeline finalize {out}` exited {proc.returncode}", file=sys.stderr)
        return 1
    print(f"launch.py: {out} finalized ({args.partitions} partitions)", flush=True)
    return 0


def warn_unplaceable(ray, num_cpus: float, num_gpus: float) -> None:
    """Warn when no live node can hold one task: Ray would keep it pending (until an autoscaler adds one)."""
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        if res.get("CPU", 0) >= num_cpus and res.get("GPU", 0) >= num_gpus:
            return
    print(
        f"launch.py: WARNING: no node of this cluster has {num_cpus:g} CPU and {num_gpus:g} GPU; the tasks "
        "wait until such a node joins (Ctrl-C to stop)",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
