#!/bin/sh
# Runs inside the KVM test host (see tests/crash/run): ROUNDS rounds of
#   boot a guest that writes numbered 4 KiB records to its virtio disk and, after
#   every batch, flushes the disk and prints "ACK <last record>";
#   SIGKILL the vmm at a random moment;
#   check that every record up to the last complete ACK line is intact on the disk.
# Prints one line per round and a summary line "CRASH rounds=R acked=A failures=F".
# shellcheck shell=dash disable=SC3028 # busybox ash has $RANDOM
set -u
rounds=${1:-10}
kernel="guest-images/out/minimal/bzImage"
initrd="guest-images/out/minimal/initramfs.cpio.gz"
work=/tmp/crash
mkdir -p "$work"

# The guest's loop: records are "REC <n> <seed>" padded with zeros to 4 KiB, written with
# O_DIRECT; every 4 records a flush (fsync of the block device = virtio FLUSH) and then
# the ACK. It never stops by itself: the host kills the vmm.
# (No double quotes inside: the script travels as one double-quoted word of the
# kernel command line; SEED is replaced per round.)
guest=$(cat <<'G'
i=0; while :; do for k in 1 2 3 4; do printf 'REC %08d %s\n' $i SEED | dd of=/dev/vda bs=4096 seek=$i count=1 conv=sync,notrunc oflag=direct 2>/dev/null || exit 1; i=$((i+1)); done; dd if=/dev/null of=/dev/vda conv=fsync,notrunc 2>/dev/null || exit 2; echo ACK $((i-1)); done
G
)

total_acked=0 failures=0 r=1
while [ "$r" -le "$rounds" ]; do
    seed=$RANDOM$RANDOM
    img=$work/disk.img
    rm -f "$img"
    dd if=/dev/zero of="$img" bs=1M count=16 2>/dev/null
    log=$work/console.log
    g=$(printf '%s' "$guest" | sed "s/SEED/$seed/")
    vmm --kernel "$kernel" --initrd "$initrd" --memory 128M --no-rng --disk "$img" \
        --cmdline "console=ttyS0 panic=-1 pci=off quiet -- \"$g\"" >"$log" 2>&1 &
    pid=$!
    # Kill somewhere between 3 and 9 s after start (boot takes ~2-3 s here).
    delay=$((3000 + RANDOM % 6000))
    sleep "$((delay / 1000)).$(printf %03d $((delay % 1000)))"
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "round $r: the vmm ended before the kill:"; tail -5 "$log"
        failures=$((failures + 1)); r=$((r + 1)); continue
    fi
    kill -9 "$pid"; wait "$pid" 2>/dev/null
    # The last complete ACK line (a line cut by the kill has no newline and is ignored).
    last=$(tr -d '\r' <"$log" | grep -a '^ACK [0-9]*$' | tail -1 | cut -d' ' -f2)
    if [ -z "$last" ]; then
        echo "round $r: killed after ${delay} ms before any ACK"
        r=$((r + 1)); continue
    fi
    bad=0 n=0
    while [ "$n" -le "$last" ]; do
        want=$(printf 'REC %08d %s' "$n" "$seed")
        got=$(dd if="$img" bs=4096 skip="$n" count=1 2>/dev/null | head -n 1)
        [ "$got" = "$want" ] || { bad=$((bad + 1)); [ "$bad" -le 3 ] && echo "round $r: record $n: got '$got'"; }
        n=$((n + 1))
    done
    echo "round $r: killed after ${delay} ms; records 0-$last acknowledged; $bad damaged"
    total_acked=$((total_acked + last + 1))
    [ "$bad" -eq 0 ] || failures=$((failures + 1))
    r=$((r + 1))
done
echo "CRASH rounds=$rounds acked=$total_acked failures=$failures"
[ "$failures" -eq 0 ]
