#!/usr/bin/env bash
# Installs Debian's Slurm (slurm-wlm: slurmctld, slurmd and the client commands) and munge for the
# single-node cluster tests in tests/cluster/. Idempotent: does nothing when everything is there.
# Needs root (apt-get). No systemd is needed: tests/cluster/slurm_cluster.py starts the daemons.
set -euo pipefail

need=()
for cmd in munged slurmctld slurmd sbatch sinfo squeue scancel scontrol; do
    command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
if [ ${#need[@]} -eq 0 ]; then
    echo "slurm and munge already installed ($(slurmctld -V 2>/dev/null || echo slurmctld))"
    exit 0
fi
echo "installing slurm-wlm and munge (missing: ${need[*]})"

if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm.sh: needs root for apt-get" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# slurm-wlm pulls slurmctld, slurmd and slurm-client; munge is the authentication daemon.
# The packages' postinst scripts try to start services through systemd/invoke-rc.d, which is absent
# on these machines; policy-rc.d 101 tells invoke-rc.d not to start anything.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    created_policy=1
fi
trap 'if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
apt-get install -y -q --no-install-recommends slurm-wlm munge

# munge's key normally comes with the package; create one if the postinst could not.
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --force
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    fi
fi
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 0400 /etc/munge/munge.key

for cmd in munged slurmctld slurmd sbatch sinfo squeue scancel scontrol; do
    command -v "$cmd" >/dev/null 2>&1 || { echo "install_slurm.sh: $cmd still missing" >&2; exit 1; }
done
echo "installed: $(slurmctld -V)"
