/work/main/microkernel/user/target/debug/deps/devices-42e525a05b5b2c22.d: /work/main/devices/src/lib.rs /work/main/devices/src/virtio/mod.rs /work/main/devices/src/virtio/blk.rs /work/main/devices/src/virtio/mem.rs /work/main/devices/src/virtio/mmio.rs /work/main/devices/src/virtio/net.rs /work/main/devices/src/virtio/queue.rs /work/main/devices/src/virtio/rng.rs /work/main/devices/src/virtio/vsock.rs /work/main/devices/src/platform.rs /work/main/devices/src/uart.rs

/work/main/microkernel/user/target/debug/deps/libdevices-42e525a05b5b2c22.rmeta: /work/main/devices/src/lib.rs /work/main/devices/src/virtio/mod.rs /work/main/devices/src/virtio/blk.rs /work/main/devices/src/virtio/mem.rs /work/main/devices/src/virtio/mmio.rs /work/main/devices/src/virtio/net.rs /work/main/devices/src/virtio/queue.rs /work/main/devices/src/virtio/rng.rs /work/main/devices/src/virtio/vsock.rs /work/main/devices/src/platform.rs /work/main/devices/src/uart.rs

/work/main/devices/src/lib.rs:
/work/main/devices/src/virtio/mod.rs:
/work/main/devices/src/virtio/blk.rs:
/work/main/devices/src/virtio/mem.rs:
/work/main/devices/src/virtio/mmio.rs:
/work/main/devices/src/virtio/net.rs:
/work/main/devices/src/virtio/queue.rs:
/work/main/devices/src/virtio/rng.rs:
/work/main/devices/src/virtio/vsock.rs:
/work/main/devices/src/platform.rs:
/work/main/devices/src/uart.rs:
