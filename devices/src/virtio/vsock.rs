//! virtio-vsock: being written.
