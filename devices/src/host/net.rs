//! Tap backend: being written.
