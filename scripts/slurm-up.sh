#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine for the tests marked `slurm` (tests/test_slurm_real.py).
#
# As root on Debian: installs slurm-wlm and munge (apt-get), writes a minimal /etc/slurm/slurm.conf for this
# host (its real CPU count and memory from `slurmd -C`, no GPUs, one default partition `debug`, process
# tracking by process group, no cgroups, no accounting), starts munged, slurmctld and slurmd, and waits
# until `sinfo` shows the node idle. A cluster that already answers is left as it is.
#
# It prints ONE line saying what it did or why it could not, and always exits 0: where SLURM cannot start
# (not root, not Debian, no network for apt, a container that forbids it), the slurm tests skip with a reason.
# Details go to $SLURM_UP_LOG (default /tmp/slurm-up.log).
# Usage: bash scripts/slurm-up.sh
set -uo pipefail
log=${SLURM_UP_LOG:-/tmp/slurm-up.log}
: > "$log"
say() { echo "slurm-up: $*"; exit 0; }
t0=$(date +%s)

node_idle() { sinfo -h -N -o '%t' 2>>"$log" | grep -qE '^(idle|mix|alloc)'; }

if command -v sinfo >/dev/null 2>&1 && node_idle; then
    say "a SLURM controller already answers ($(sinfo -h -N -o '%N %t %c CPUs' | head -1)); left as it is"
fi
[ "$(id -u)" = 0 ] || say "not started: needs root (to install and start slurmctld/slurmd); the slurm tests skip"
command -v apt-get >/dev/null 2>&1 || say "not started: no apt-get (not Debian); the slurm tests skip"

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    t_apt=$(date +%s)
    # no service starts from the package scripts: there may be no init system; we start the daemons below
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >>"$log" 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >>"$log" 2>&1 \
            || { rm -f /usr/sbin/policy-rc.d; say "not started: apt-get install slurm-wlm munge failed (see $log)"; }
    fi
    rm -f /usr/sbin/policy-rc.d
    apt_s=$(($(date +%s) - t_apt))
fi

# munge: a key, its run directory, the daemon (as the munge user, as the package would)
if [ ! -s /etc/munge/munge.key ]; then
    (mungekey --create --keyfile=/etc/munge/munge.key || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024) >>"$log" 2>&1
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>>"$log" | unmunge >>"$log" 2>&1; then
    runuser -u munge -- /usr/sbin/munged >>"$log" 2>&1 || say "not started: munged would not start (see $log)"
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi
munge -n 2>>"$log" | unmunge >>"$log" 2>&1 || say "not started: munge does not answer (see $log)"

# slurm.conf: this host as the only node, with what slurmd itself detects (CPUs, sockets, cores, memory)
host=$(hostname -s)
node=$(slurmd -C 2>>"$log" | head -1)
case "$node" in NodeName=*) ;; *) say "not started: slurmd -C could not describe this node (see $log)" ;; esac
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<EOF
# written by scripts/slurm-up.sh: one node, no GPUs, no cgroups, no accounting (tests only)
ClusterName=collapse-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerParameters=sched_interval=1
MinJobAge=30
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

pgrep -x slurmctld >/dev/null || slurmctld >>"$log" 2>&1 || say "not started: slurmctld failed (see $log and /var/log/slurm/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd >>"$log" 2>&1 || say "not started: slurmd failed (see $log and /var/log/slurm/slurmd.log)"
for _ in $(seq 60); do node_idle && break; sleep 0.5; done
node_idle || say "not started: the node did not become idle in 30 s ($(sinfo -h -N -o '%N %t %E' 2>&1 | head -1); see /var/log/slurm/)"
cpus=$(sinfo -h -N -o '%c'); mem=$(sinfo -h -N -o '%m')
say "one-node SLURM $(sinfo -V | cut -d' ' -f2) up on $host ($cpus CPUs, ${mem} MB, no GPUs, partition debug) in $(($(date +%s) - t0)) s${apt_s:+ (apt-get install: ${apt_s} s)}"
