//! vsock muxer: being written.
