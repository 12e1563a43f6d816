#!/bin/bash
# Runs inside the test guest (chroot of the host's root, read-only over 9p; /tmp is a tmpfs
# in guest memory). Started by the initramfs' /init with the scenario as its arguments:
#   guest.sh SCENARIO [PHASE]
# Environment (from Tests/VM/run through the kernel command line):
#   VMTEST_BIN    the pmem-nbd binary (a host path)
#   VMTEST_ACKS   scenario 6 verify phase: host file with the acknowledged writes
#   VMTEST_CYCLE  scenario 6: the number of this power-cut cycle
#   VMTEST_QUICK  1 for smaller data sets
#   VMTEST_WATCHDOG  seconds after which to print where the guest is stuck
# It prints, on the console:
#   VMTEST STEP +SECONDSs TEXT     progress (the host shows the last ones on failure)
#   VMTEST RESULT PASS|FAIL ID: TEXT
#   VMTEST DIAG BEGIN ... VMTEST DIAG END   what explains a failure
set -uo pipefail
export LD_LIBRARY_PATH=/opt/swift/usr/lib/swift/linux${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

SCENARIO=${1:?scenario}
PHASE=${2:-}
ID=$SCENARIO${PHASE:+:$PHASE}
BIN=${VMTEST_BIN:?VMTEST_BIN}
QUICK=${VMTEST_QUICK:-0}
W=/tmp/vmtest            # logs, manifests (guest memory)
SOCK=/tmp/pmem.sock
mkdir -p "$W" /tmp/mnt /tmp/snap /tmp/pmem
cd /tmp || exit 1

SERVER_PID=""
CURRENT_STEP=""
CMDN=0

now() { local u; read -r u _ < /proc/uptime; echo "$u"; }
T0=$(now)
step() {
  CURRENT_STEP="$*"
  echo "$*" > "$W/step"
  echo "VMTEST STEP +$(awk -v a="$(now)" -v b="$T0" 'BEGIN{printf "%.1f", a-b}')s [$ID] $*"
}
log() { echo "VMTEST INFO [$ID] $*"; }

# Prints what explains a failure: the failing command's output is printed by the caller;
# here the server's log, the kernel's recent messages and the state of devices and mounts.
diagnostics() {
  echo "--- server log (last 40 lines of $W/server.log)"
  tail -n 40 "$W/server.log" 2>/dev/null
  echo "--- kernel errors and warnings (last 25)"
  dmesg -l emerg,alert,crit,err,warn 2>/dev/null |
    grep -vE 'mtrr: |MMCONFIG|[Cc]lock|trace_clock|on the kernel command line' | tail -n 25
  echo "--- kernel messages (last 15)"
  dmesg 2>/dev/null | tail -n 15
  echo "--- nbd devices"
  for d in /sys/block/nbd[0-3]; do
    [ -e "$d/size" ] && echo "$(basename "$d"): size=$(cat "$d/size") pid=$(cat "$d/pid" 2>/dev/null || echo -)"
  done
  echo "--- mounts"
  grep -E 'nbd|pmem' /proc/mounts
}

# Shortly before the host's time limit, says where the guest is stuck: the step, the
# processes and what they wait in, the tasks blocked in the kernel (sysrq w).
watchdog() {
  sleep "$1"
  echo "VMTEST DIAG BEGIN"
  echo "guest watchdog: no result after $1 s; current step: $(cat "$W/step" 2>/dev/null)"
  echo "--- processes"
  ps -eo pid,ppid,stat,wchan:24,etime,args 2>&1 | grep -v '\[.*\]$' | head -n 40
  echo w > /proc/sysrq-trigger 2>/dev/null
  sleep 1
  diagnostics
  echo "VMTEST DIAG END"
}

fail() {
  echo "VMTEST DIAG BEGIN"
  echo "failed step: $CURRENT_STEP"
  [ $# -gt 1 ] && printf '%s\n' "${@:2}"
  diagnostics
  echo "VMTEST DIAG END"
  echo "VMTEST RESULT FAIL $ID: $1"
  cleanup >/dev/null 2>&1
  exit 1
}

# run CMD...: runs a command, output to a file; on failure prints its tail and fails.
run() {
  CMDN=$((CMDN + 1))
  local out="$W/cmd.$CMDN.log"
  "$@" > "$out" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    fail "'$*' exited $rc" "--- output of '$*' (last 40 lines)" "$(tail -n 40 "$out")"
  fi
}

# expect_rc CODES CMD...: like run, accepting the listed exit codes (e.g. "0 1").
expect_rc() {
  local codes=$1; shift
  CMDN=$((CMDN + 1))
  local out="$W/cmd.$CMDN.log"
  "$@" > "$out" 2>&1
  local rc=$? c
  for c in $codes; do [ "$rc" = "$c" ] && return 0; done
  fail "'$*' exited $rc (expected $codes)" "--- output of '$*' (last 40 lines)" "$(tail -n 40 "$out")"
}

wait_for() { # wait_for SECONDS DESCRIPTION CONDITION...
  local secs=$1 what=$2 i; shift 2
  for ((i = 0; i < secs * 10; i++)); do "$@" && return 0; sleep 0.1; done
  fail "timed out after ${secs}s waiting for $what"
}

# ---------------------------------------------------------------- server and nbd-client

start_server() { # start_server POOL [serve options...]
  local pool=$1; shift
  rm -f "$SOCK"
  "$BIN" serve "$pool" --unix "$SOCK" -vv "$@" >> "$W/server.log" 2>&1 &
  SERVER_PID=$!
  wait_for 60 "the server's socket $SOCK" test -S "$SOCK"
  kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited at start"
}

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null
  local rc i
  for ((i = 0; i < 600; i++)); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -KILL "$SERVER_PID"; SERVER_PID=""
    fail "the server did not stop within 60s of SIGTERM"
  fi
  wait "$SERVER_PID"; rc=$?
  SERVER_PID=""
  [ $rc -eq 0 ] || fail "the server exited $rc after SIGTERM"
}

nbd_size() { cat "/sys/block/$(basename "$1")/size" 2>/dev/null || echo 0; }
nbd_attached() { [ "$(nbd_size "$1")" != 0 ]; }
nbd_detached() { [ "$(nbd_size "$1")" = 0 ]; }

attach() { # attach DEV EXPORT [nbd-client options...]
  local dev=$1 export=$2; shift 2
  run nbd-client -unix "$SOCK" "$dev" -N "$export" "$@"
  wait_for 30 "$dev to get a size" nbd_attached "$dev"
}

detach() {
  run nbd-client -d "$1"
  wait_for 30 "$1 to detach" nbd_detached "$1"
}

cleanup() {
  local m
  for m in /tmp/snap /tmp/mnt; do mountpoint -q "$m" && umount "$m"; done
  for m in /dev/nbd1 /dev/nbd0; do nbd_attached "$m" && nbd-client -d "$m"; done
  if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID"; wait "$SERVER_PID"; SERVER_PID=""; fi
  mountpoint -q /tmp/pmem && umount /tmp/pmem
}

check_pool() { # check_pool POOL: pmem-nbd check must find it clean (exit 0)
  run "$BIN" check "$1"
}

# ---------------------------------------------------------------- file trees

# make_tree DIR COUNT MAXKB: files of random sizes and contents in nested folders, plus
# the awkward cases (empty, exactly one block, one large file, symlink, hard link).
make_tree() {
  local dir=$1 count=$2 maxkb=$3 i d size
  mkdir -p "$dir" || fail "mkdir $dir"
  for ((i = 0; i < count; i++)); do
    d="$dir/d$((i % 6))/s$((i % 4))"
    [ -d "$d" ] || mkdir -p "$d"
    size=$(( (RANDOM * 32768 + RANDOM) % (maxkb * 1024) + 1 ))
    head -c "$size" /dev/urandom > "$d/f$i" || fail "writing $d/f$i"
  done
  : > "$dir/empty"
  head -c 4096 /dev/urandom > "$dir/one-block"
  head -c $((4 * 1024 * 1024 + 123)) /dev/urandom > "$dir/large" || fail "writing $dir/large"
  ln -s d0/s0/f0 "$dir/link"
  ln "$dir/one-block" "$dir/hardlink"
  mkdir -p "$dir/a-rather-long-directory-name-to-spill-out-of-inline-dirents/x" &&
    echo hello > "$dir/a-rather-long-directory-name-to-spill-out-of-inline-dirents/x/y"
}

# manifest DIR OUT: checksums of every file, and a listing of every name with type, mode,
# size and link target (compare_tree checks both).
manifest() {
  (cd "$1" && find . -path ./lost+found -prune -o -type f -print0 | sort -z | xargs -0 -r sha256sum) > "$2.sums" ||
    fail "checksumming $1"
  (cd "$1" && find . -path ./lost+found -prune -o -printf '%y %m %s %n %p %l\n' | grep -v ' \./lost+found ' | sort) > "$2.list" ||
    fail "listing $1"
}

compare_tree() { # compare_tree DIR MANIFEST WHAT
  local dir=$1 m=$2 what=$3
  manifest "$dir" "$W/now"
  if ! cmp -s "$m.list" "$W/now.list"; then
    fail "$what: the names, types or sizes differ" "--- diff expected actual (first 30 lines)" \
      "$(diff "$m.list" "$W/now.list" | head -n 30)"
  fi
  if ! cmp -s "$m.sums" "$W/now.sums"; then
    fail "$what: file contents differ" "--- diff expected actual (first 30 lines)" \
      "$(diff "$m.sums" "$W/now.sums" | head -n 30)"
  fi
  log "$what: $(wc -l < "$m.sums") files match"
}

fs_check() { # fs_check FSTYPE DEV: a forced read-only check must find nothing
  case $1 in
    ext4) run e2fsck -f -n "$2" ;;
    xfs) run xfs_repair -n "$2" ;;
  esac
}

mkfs_dev() { # mkfs_dev FSTYPE DEV
  case $1 in
    ext4) run mkfs.ext4 -q -F "$2" ;;
    xfs) run mkfs.xfs -q -f "$2" ;;
  esac
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

tree_files() { if [ "$QUICK" = 1 ]; then echo 60; else echo 150; fi; }

# ---------------------------------------------------------------- scenario bodies

# Scenario 1 on a served pool: for ext4 and xfs, mkfs, write a tree, sync, unmount, fsck,
# detach, restart the server (and check the pool between), attach again, verify.
body_filesystems() {
  local pool=$1 fs
  for fs in ext4 xfs; do
    step "$fs: attach pmem0 on /dev/nbd0"
    attach /dev/nbd0 pmem0
    step "$fs: mkfs.$fs"
    mkfs_dev "$fs" /dev/nbd0
    run mount -t "$fs" /dev/nbd0 /tmp/mnt
    step "$fs: write a tree of files"
    make_tree /tmp/mnt/tree "$(tree_files)" 256
    manifest /tmp/mnt "$W/m-$fs"
    log "$fs: wrote $(wc -l < "$W/m-$fs.sums") files, $(du -sk /tmp/mnt | cut -f1) KiB"
    run sync
    step "$fs: unmount, fsck -f"
    run umount /tmp/mnt
    fs_check "$fs" /dev/nbd0
    step "$fs: detach; restart the server; pmem-nbd check"
    detach /dev/nbd0
    stop_server
    check_pool "$pool"
    start_server "$pool"
    step "$fs: attach again, fsck, verify the tree"
    attach /dev/nbd0 pmem0
    fs_check "$fs" /dev/nbd0
    run mount -t "$fs" -o ro /dev/nbd0 /tmp/mnt
    compare_tree /tmp/mnt "$W/m-$fs" "$fs after re-attach"
    run umount /tmp/mnt
    detach /dev/nbd0
  done
}

fio_run() { # fio_run NAME fio-options...: runs fio, fails on any error or verify failure
  local name=$1; shift
  CMDN=$((CMDN + 1))
  local out="$W/fio-$name.log"
  fio --name="$name" --output-format=normal "$@" > "$out" 2>&1
  local rc=$?
  if [ $rc -ne 0 ] || grep -qE 'verify: bad|err= *[1-9]|fio: .*error' "$out"; then
    fail "fio job '$name' failed (exit $rc)" "--- fio output (last 40 lines)" "$(tail -n 40 "$out")"
  fi
  log "fio $name: $(grep -E '^ +(write|read):' "$out" | sed 's/^ *//' | tr '\n' ';')"
}

# Scenario 3 on a served pool: fio with O_DIRECT, libaio, random writes verified by crc32c;
# then an fsync-heavy job on ext4.
body_fio() {
  local size=96m fsize=12m
  [ "$QUICK" = 1 ] && size=32m && fsize=4m
  step "attach pmem0 on /dev/nbd0"
  attach /dev/nbd0 pmem0
  step "fio: random writes, direct=1, libaio, verify=crc32c ($size)"
  fio_run randwrite-verify --filename=/dev/nbd0 --direct=1 --ioengine=libaio --iodepth=16 \
    --rw=randwrite --bs=4k --size="$size" --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --randrepeat=0
  step "fio: mixed block sizes, direct=1, libaio, verify=crc32c"
  fio_run mixed-verify --filename=/dev/nbd0 --direct=1 --ioengine=libaio --iodepth=8 \
    --rw=randwrite --bssplit=4k/50:16k/25:64k/20:256k/5 --offset=128m --size="$size" \
    --verify=crc32c --verify_fatal=1 --randrepeat=0
  step "fio: fsync-heavy job on ext4 (fsync after every write, 2 jobs)"
  mkfs_dev ext4 /dev/nbd0
  run mount /dev/nbd0 /tmp/mnt
  fio_run fsync-heavy --directory=/tmp/mnt --ioengine=psync --rw=randwrite --bs=4k \
    --size="$fsize" --numjobs=2 --fsync=1 --verify=crc32c --verify_fatal=1 --randrepeat=0
  run umount /tmp/mnt
  fs_check ext4 /dev/nbd0
  step "detach"
  detach /dev/nbd0
}

# ---------------------------------------------------------------- scenarios

make_tmpfs_pool() { # make_tmpfs_pool POOL SIZE
  run "$BIN" create "$1" --size "$2"
}

scenario_1() {
  local pool=/tmp/pool.pmem
  step "create a 640M pool in guest memory"
  make_tmpfs_pool "$pool" 640M
  start_server "$pool"
  body_filesystems "$pool"
  stop_server
  check_pool "$pool"
}

scenario_2() {
  local pool=/tmp/pool.pmem writers=4 per i
  per=$(( $(tree_files) / 2 ))
  step "create a 640M pool in guest memory"
  make_tmpfs_pool "$pool" 640M
  start_server "$pool"
  step "attach with nbd-client -C 4"
  attach /dev/nbd0 pmem0 -C 4
  local conns
  conns=$(grep -c " $SOCK\$" /proc/net/unix)
  # one listening socket plus one accepted socket per connection
  [ "$conns" -ge 5 ] || fail "expected 4 connections to $SOCK, /proc/net/unix shows $((conns - 1))"
  log "connections to the server: $((conns - 1))"
  mkfs_dev ext4 /dev/nbd0
  run mount /dev/nbd0 /tmp/mnt
  step "$writers parallel writers"
  local pids=()
  for ((i = 0; i < writers; i++)); do
    (
      fail() { echo "writer $i: $*"; exit 1; }
      RANDOM=$((i * 7919 + $$))
      make_tree "/tmp/mnt/w$i" "$per" 512
    ) > "$W/writer$i.log" 2>&1 &
    pids+=($!)
  done
  # and one raw-ish writer doing O_DIRECT writes of a big file at the same time
  dd if=/dev/urandom of=/tmp/mnt/direct bs=64k count=256 oflag=direct status=none 2> "$W/dd.log" &
  pids+=($!)
  for i in "${pids[@]}"; do
    wait "$i" || fail "a parallel writer failed" "$(cat "$W"/writer*.log "$W/dd.log")"
  done
  run sync
  manifest /tmp/mnt "$W/m-par"
  log "wrote $(wc -l < "$W/m-par.sums") files, $(du -sk /tmp/mnt | cut -f1) KiB"
  step "drop caches, verify through 4 connections"
  drop_caches
  compare_tree /tmp/mnt "$W/m-par" "after drop_caches"
  step "unmount, fsck, detach"
  run umount /tmp/mnt
  fs_check ext4 /dev/nbd0
  detach /dev/nbd0
  step "attach again with -C 4, verify"
  attach /dev/nbd0 pmem0 -C 4
  fs_check ext4 /dev/nbd0
  run mount -o ro /dev/nbd0 /tmp/mnt
  compare_tree /tmp/mnt "$W/m-par" "after re-attach"
  run umount /tmp/mnt
  detach /dev/nbd0
  stop_server
  check_pool "$pool"
}

scenario_3() {
  local pool=/tmp/pool.pmem
  step "create a 640M pool in guest memory"
  make_tmpfs_pool "$pool" 640M
  start_server "$pool"
  body_fio
  stop_server
  check_pool "$pool"
}

# Origin keeps changing until $W/stop-churn exists: overwrite blocks in place, truncate and
# rewrite, delete, create; sync every fourth change so the writes reach the device.
churn() {
  local n=0 f files count
  mapfile -t files < <(cd /tmp/mnt && find tree -type f)
  count=${#files[@]}
  while [ ! -e "$W/stop-churn" ]; do
    n=$((n + 1))
    f=/tmp/mnt/${files[$(( (n * 7) % count ))]}
    case $((n % 4)) in
      0) [ -e "$f" ] && dd if=/dev/urandom of="$f" bs=4k count=1 conv=notrunc status=none ;;
      1) head -c $((n * 1000 % 70000 + 1)) /dev/urandom > "$f" ;;
      2) rm -f "$f" ;;
      3) head -c 8192 /dev/urandom > "/tmp/mnt/new-$n"; sync ;;
    esac
  done
  echo "$n" > "$W/churn-count"
}

scenario_4() {
  local pool=/tmp/pool.pmem
  step "create a 640M pool in guest memory; attach; mkfs.ext4; write a tree"
  make_tmpfs_pool "$pool" 640M
  start_server "$pool"
  attach /dev/nbd0 pmem0
  mkfs_dev ext4 /dev/nbd0
  run mount /dev/nbd0 /tmp/mnt
  make_tree /tmp/mnt/tree "$(tree_files)" 256
  run sync
  manifest /tmp/mnt "$W/m-snap"
  step "fsfreeze, snapshot pmem0@s1 (through the control socket), thaw"
  run fsfreeze -f /tmp/mnt
  CMDN=$((CMDN + 1))
  if ! "$BIN" snapshot create pmem0@s1 --pool "$pool" > "$W/snap.log" 2>&1; then
    fsfreeze -u /tmp/mnt
    fail "snapshot create failed" "$(cat "$W/snap.log")"
  fi
  run fsfreeze -u /tmp/mnt
  step "the origin keeps changing; attach pmem0@s1 read-only on /dev/nbd1"
  rm -f "$W/stop-churn"
  churn > "$W/churn.log" 2>&1 &
  local churn_pid=$!
  attach /dev/nbd1 pmem0@s1 -readonly
  [ "$(cat /sys/block/nbd1/ro)" = 1 ] || fail "/dev/nbd1 is not read-only"
  fs_check ext4 /dev/nbd1
  run mount -o ro /dev/nbd1 /tmp/snap
  step "verify the snapshot while the origin changes"
  compare_tree /tmp/snap "$W/m-snap" "snapshot, origin changing"
  drop_caches
  compare_tree /tmp/snap "$W/m-snap" "snapshot after drop_caches, origin changing"
  touch "$W/stop-churn"
  wait "$churn_pid" || fail "the origin's writer failed" "$(tail -n 20 "$W/churn.log")"
  run sync
  log "origin changed $(cat "$W/churn-count") times while the snapshot was read"
  manifest /tmp/mnt "$W/m-origin"
  cmp -s "$W/m-snap.sums" "$W/m-origin.sums" && fail "the origin did not change (test is broken)"
  drop_caches
  compare_tree /tmp/snap "$W/m-snap" "snapshot after the origin changed"
  step "unmount and detach both; rollback pmem0 to s1"
  run umount /tmp/snap
  detach /dev/nbd1
  run umount /tmp/mnt
  detach /dev/nbd0
  run "$BIN" snapshot rollback pmem0@s1 --pool "$pool"
  step "attach pmem0 again, fsck, verify it equals the snapshot"
  attach /dev/nbd0 pmem0
  fs_check ext4 /dev/nbd0
  run mount /dev/nbd0 /tmp/mnt
  compare_tree /tmp/mnt "$W/m-snap" "origin after rollback"
  step "the rolled-back volume is writable; restart the server and verify again"
  make_tree /tmp/mnt/after 20 64
  manifest /tmp/mnt "$W/m-after"
  run umount /tmp/mnt
  detach /dev/nbd0
  stop_server
  check_pool "$pool"
  start_server "$pool"
  attach /dev/nbd0 pmem0
  run mount -o ro /dev/nbd0 /tmp/mnt
  compare_tree /tmp/mnt "$W/m-after" "origin after rollback, writes and restart"
  run umount /tmp/mnt
  detach /dev/nbd0
  stop_server
  check_pool "$pool"
}

# ---------------------------------------------------------------- DAX

# Brings up /dev/pmem0 in fsdax mode and mounts it with -o dax on /tmp/pmem. mkfs only when
# told to (first boot on a backing file).
setup_dax() { # setup_dax fresh|existing [nodax]: with nodax, ext4 on /dev/pmem0 through the page cache
  local i
  for ((i = 0; i < 100; i++)); do [ -e /sys/bus/nd/devices/namespace0.0 ] && break; sleep 0.1; done
  [ -e /sys/bus/nd/devices/namespace0.0 ] || fail "no NVDIMM namespace (is nfit loaded?)" "$(ls /sys/bus/nd/devices 2>&1)"
  local mode
  mode=$(ndctl list -n namespace0.0 2>/dev/null | grep -o '"mode":"[a-z]*"')
  log "namespace0.0 $mode"
  if [ "$1" = fresh ]; then
    if [ "$mode" != '"mode":"fsdax"' ]; then
      step "ndctl create-namespace -m fsdax"
      run ndctl create-namespace -f -e namespace0.0 -m fsdax
    fi
    wait_for 10 /dev/pmem0 test -b /dev/pmem0
    step "mkfs.ext4 /dev/pmem0"
    run mkfs.ext4 -q -F /dev/pmem0
  else
    [ "$mode" = '"mode":"fsdax"' ] || fail "namespace0.0 came back as $mode, not fsdax" "$(ndctl list -N 2>&1)"
    wait_for 10 /dev/pmem0 test -b /dev/pmem0
  fi
  if [ "${2:-}" = nodax ]; then
    step "mount -o nodax /dev/pmem0 (the page cache in front of it)"
    run mount -t ext4 -o dax=never /dev/pmem0 /tmp/pmem
    return
  fi
  step "mount -o dax /dev/pmem0"
  run mount -t ext4 -o dax /dev/pmem0 /tmp/pmem
  grep -q ' /tmp/pmem .*dax' /proc/mounts || fail "/tmp/pmem is not mounted with dax" "$(grep pmem /proc/mounts)"
}

# Scenario 7 is scenario 6 in page mode: the pool file on ext4 without DAX on the NVDIMM's
# block device, served with --persistence page. A power cut loses the guest's page cache:
# only what the server made durable (pwrite, sync_file_range, msync, fdatasync) is there.
PAGE_MODE=0
[ "$SCENARIO" = 7 ] && PAGE_MODE=1
powercut_mount() { if [ "$PAGE_MODE" = 1 ]; then setup_dax "$1" nodax; else setup_dax "$1"; fi; }
powercut_serve() {
  if [ "$PAGE_MODE" = 1 ]; then
    start_server "$1" --persistence page
    grep -q 'persistence page (pwrite' "$W/server.log" ||
      fail "the pool on ext4 without DAX is not served in page mode with pwrite" "$(grep -i persistence "$W/server.log" | tail -n 2)"
    log "persistence: page (pwrite)"
  else
    start_server "$1"
  fi
}

expect_cacheline() { # the served pool must be mapped with MAP_SYNC
  local pool=$1 json
  json=$("$BIN" info "$pool" --json 2>&1) || fail "pmem-nbd info failed" "$json"
  echo "$json" | grep -q '"persistence" *: *"cache-line"' ||
    fail "the pool on DAX does not report cache-line persistence" "--- pmem-nbd info --json" "$json"
  grep -q 'MAP_SYNC' "$W/server.log" ||
    fail "the server did not log a MAP_SYNC mapping" "$(head -n 20 "$W/server.log")"
  log "persistence: cache-line (MAP_SYNC)"
}

scenario_5() {
  local pool=/tmp/pmem/pool.pmem
  setup_dax fresh
  step "create a 768M pool on the DAX file system (--prefault)"
  run "$BIN" create "$pool" --size 768M --prefault
  start_server "$pool"
  expect_cacheline "$pool"
  body_filesystems "$pool"
  expect_cacheline "$pool"
  body_fio
  stop_server
  check_pool "$pool"
  run umount /tmp/pmem
}

# ---------------------------------------------------------------- power cut

# Phase run: bring the pool up (creating it on the first cycle), attach, mount, then write
# files forever, acknowledging each one on the console once it and its folder are fsynced:
#   VMTEST ACK C I SHA256   file c<C>/f<I> of cycle C is durable with this content
# with a line "entry I" appended to c<C>/journal for each and fsynced before the ack.
scenario_6_run() {
  local cycle=${VMTEST_CYCLE:-1} pool=/tmp/pmem/pool.pmem fresh=existing
  [ "$cycle" = 1 ] && fresh=fresh
  powercut_mount "$fresh"
  if [ "$fresh" = fresh ]; then
    step "create the pool on DAX"
    run "$BIN" create "$pool" --size 768M --prefault
  else
    step "pmem-nbd check (after the previous cycle's verification)"
    check_pool "$pool"
  fi
  powercut_serve "$pool"
  attach /dev/nbd0 pmem0
  if [ "$fresh" = fresh ]; then
    mkfs_dev ext4 /dev/nbd0
  fi
  run mount /dev/nbd0 /tmp/mnt
  local dir=/tmp/mnt/c$cycle i=0 j sum
  rm -rf "$dir"
  mkdir -p "$dir" && sync -f /tmp/mnt && sync /tmp/mnt || fail "cannot make $dir"
  step "write workload (the host cuts the power at a random time)"
  # Unacknowledged writes in the background, and eager writeback, so that the power cut
  # also finds writes in flight (the verification ignores these files).
  echo 50 > /proc/sys/vm/dirty_writeback_centisecs
  echo 100 > /proc/sys/vm/dirty_expire_centisecs
  (
    k=0
    mkdir -p "$dir/noise"
    while :; do
      dd if=/dev/urandom of="$dir/noise/n$k" bs=16k count=$((k % 16 + 1)) status=none
      rm -f "$dir/noise/n$((k - 6))"
      k=$((k + 1))
      sleep 0.2
    done
  ) > /dev/null 2>&1 &
  echo "VMTEST READY"
  local batch f sums
  while :; do
    # four new files and four journal lines, then one fsync of each file, the folder and
    # the journal; only then are they acknowledged
    batch=()
    for ((j = 0; j < 4; j++)); do
      f=$dir/f$((i + j))
      head -c $(( (RANDOM * 32768 + RANDOM) % 65536 + 1 )) /dev/urandom > "$f" || fail "write $f"
      echo "entry $((i + j))" >> "$dir/journal" || fail "append journal"
      batch+=("$f")
    done
    sync "${batch[@]}" "$dir" "$dir/journal" || fail "fsync ${batch[*]}"
    sums=$(cd "$dir" && sha256sum "${batch[@]##*/}") || fail "read back ${batch[*]}"
    while read -r sum f; do
      echo "VMTEST ACK $cycle ${f#f} $sum"
    done <<< "$sums"
    i=$((i + 4))
  done
}

# Phase verify: after the power cut. pmem-nbd check, serve, fsck; every acknowledged write
# of every cycle so far must be there.
scenario_6_verify() {
  local pool=/tmp/pmem/pool.pmem acks=${VMTEST_ACKS:?VMTEST_ACKS}
  powercut_mount existing
  step "pmem-nbd check after the power cut"
  CMDN=$((CMDN + 1))
  "$BIN" check "$pool" > "$W/check.log" 2>&1
  local rc=$?
  sed 's/^/  check: /' "$W/check.log" | head -n 20
  [ $rc -eq 0 ] || fail "pmem-nbd check exited $rc after the power cut" "$(cat "$W/check.log")"
  powercut_serve "$pool"
  grep -E 'recovered' "$W/server.log" | sed 's/^/  /'
  attach /dev/nbd0 pmem0
  step "mount (journal replay), verify every acknowledged write"
  run mount /dev/nbd0 /tmp/mnt
  local cycle i sum n=0 bad=0 last=() got lines lost="$W/lost"
  : > "$lost"
  while read -r _ _ cycle i sum; do
    got=$(sha256sum < "/tmp/mnt/c$cycle/f$i" 2>&1)
    if [ "${got%% *}" != "$sum" ]; then
      bad=$((bad + 1))
      echo "LOST: c$cycle/f$i acknowledged as $sum, now: $(stat -c '%s bytes' "/tmp/mnt/c$cycle/f$i" 2>&1) ${got%% *}" >> "$lost"
    fi
    last[$cycle]=$i
    n=$((n + 1))
  done < "$acks"
  for cycle in "${!last[@]}"; do
    lines=$(grep -c '^entry ' "/tmp/mnt/c$cycle/journal" 2>/dev/null)
    if [ "${lines:-0}" -le "${last[$cycle]}" ]; then
      bad=$((bad + 1))
      echo "LOST: c$cycle/journal has ${lines:-0} lines, $((last[$cycle] + 1)) were acknowledged" >> "$lost"
    fi
    # every complete line must be in order
    awk '/^entry /{ if ($2 != NR-1) { print "BAD: c'"$cycle"'/journal line " NR ": " $0; exit 1 } }' \
      "/tmp/mnt/c$cycle/journal" >> "$lost" 2>&1 || bad=$((bad + 1))
    log "cycle $cycle: $((last[$cycle] + 1)) acknowledged files, journal has ${lines:-0} lines"
  done
  [ $n -gt 0 ] || fail "no acknowledged writes to verify (the workload never got going?)"
  [ $bad -eq 0 ] || fail "$bad acknowledged writes were lost or corrupt after the power cut" \
    "--- lost writes (first 20 of $(wc -l < "$lost"))" "$(head -n 20 "$lost")" \
    "--- c$cycle after the power cut" "$(ls -la "/tmp/mnt/c$cycle" 2>&1 | head -n 12)"
  log "all $n acknowledged writes are intact"
  step "unmount, fsck -f must be clean"
  run umount /tmp/mnt
  fs_check ext4 /dev/nbd0
  detach /dev/nbd0
  stop_server
  check_pool "$pool"
  run umount /tmp/pmem
}

# ---------------------------------------------------------------- main

[ "${BASH_SOURCE[0]}" = "$0" ] || return 0   # sourced (for debugging): functions only
if [ "${VMTEST_WATCHDOG:-0}" -gt 0 ]; then
  watchdog "$VMTEST_WATCHDOG" &
  disown
fi
case $ID in
  1 | 2 | 3 | 4 | 5) "scenario_$SCENARIO" ;;
  6:run | 7:run) scenario_6_run ;;
  6:verify | 7:verify) scenario_6_verify ;;
  *) fail "unknown scenario '$ID'" ;;
esac
step "done"
echo "VMTEST RESULT PASS $ID"
