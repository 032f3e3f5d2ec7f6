/work/main/microkernel/user/target/debug/deps/microkernel-48b367d81dcc8a59.d: /work/main/microkernel/src/lib.rs /work/main/microkernel/src/abi.rs /work/main/microkernel/src/bootinfo.rs /work/main/microkernel/src/fastpath.rs /work/main/microkernel/src/fault.rs /work/main/microkernel/src/ipc.rs /work/main/microkernel/src/irq.rs /work/main/microkernel/src/kernel.rs /work/main/microkernel/src/list.rs /work/main/microkernel/src/machine.rs /work/main/microkernel/src/mapdb.rs /work/main/microkernel/src/route.rs /work/main/microkernel/src/sched.rs /work/main/microkernel/src/syscalls.rs /work/main/microkernel/src/task.rs /work/main/microkernel/src/thread.rs

/work/main/microkernel/user/target/debug/deps/libmicrokernel-48b367d81dcc8a59.rmeta: /work/main/microkernel/src/lib.rs /work/main/microkernel/src/abi.rs /work/main/microkernel/src/bootinfo.rs /work/main/microkernel/src/fastpath.rs /work/main/microkernel/src/fault.rs /work/main/microkernel/src/ipc.rs /work/main/microkernel/src/irq.rs /work/main/microkernel/src/kernel.rs /work/main/microkernel/src/list.rs /work/main/microkernel/src/machine.rs /work/main/microkernel/src/mapdb.rs /work/main/microkernel/src/route.rs /work/main/microkernel/src/sched.rs /work/main/microkernel/src/syscalls.rs /work/main/microkernel/src/task.rs /work/main/microkernel/src/thread.rs

/work/main/microkernel/src/lib.rs:
/work/main/microkernel/src/abi.rs:
/work/main/microkernel/src/bootinfo.rs:
/work/main/microkernel/src/fastpath.rs:
/work/main/microkernel/src/fault.rs:
/work/main/microkernel/src/ipc.rs:
/work/main/microkernel/src/irq.rs:
/work/main/microkernel/src/kernel.rs:
/work/main/microkernel/src/list.rs:
/work/main/microkernel/src/machine.rs:
/work/main/microkernel/src/mapdb.rs:
/work/main/microkernel/src/route.rs:
/work/main/microkernel/src/sched.rs:
/work/main/microkernel/src/syscalls.rs:
/work/main/microkernel/src/task.rs:
/work/main/microkernel/src/thread.rs:
