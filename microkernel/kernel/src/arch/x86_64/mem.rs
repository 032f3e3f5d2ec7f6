//! The C memory functions and unwinding personality, shared with the user runtime.

#[path = "../../../../freestanding/mem.rs"]
mod shared;
