/work/main/microkernel/user/target/debug/deps/mkrt-7c63b5c49f1ec7a4.d: src/lib.rs src/heap.rs src/lang.rs src/../../freestanding/mem.rs src/mmio.rs src/msg.rs src/pool.rs src/port.rs src/print.rs src/sys.rs src/vdriver.rs Cargo.toml

/work/main/microkernel/user/target/debug/deps/libmkrt-7c63b5c49f1ec7a4.rmeta: src/lib.rs src/heap.rs src/lang.rs src/../../freestanding/mem.rs src/mmio.rs src/msg.rs src/pool.rs src/port.rs src/print.rs src/sys.rs src/vdriver.rs Cargo.toml

src/lib.rs:
src/heap.rs:
src/lang.rs:
src/../../freestanding/mem.rs:
src/mmio.rs:
src/msg.rs:
src/pool.rs:
src/port.rs:
src/print.rs:
src/sys.rs:
src/vdriver.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=
# env-dep:CLIPPY_CONF_DIR
