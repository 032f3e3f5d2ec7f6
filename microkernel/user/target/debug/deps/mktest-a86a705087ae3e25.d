/work/main/microkernel/user/target/debug/deps/mktest-a86a705087ae3e25.d: src/bin/mktest/main.rs src/bin/mktest/bench.rs src/bin/mktest/device.rs src/bin/mktest/guest.rs src/bin/mktest/hosted.rs src/bin/mktest/pager.rs src/bin/mktest/tests.rs Cargo.toml

/work/main/microkernel/user/target/debug/deps/libmktest-a86a705087ae3e25.rmeta: src/bin/mktest/main.rs src/bin/mktest/bench.rs src/bin/mktest/device.rs src/bin/mktest/guest.rs src/bin/mktest/hosted.rs src/bin/mktest/pager.rs src/bin/mktest/tests.rs Cargo.toml

src/bin/mktest/main.rs:
src/bin/mktest/bench.rs:
src/bin/mktest/device.rs:
src/bin/mktest/guest.rs:
src/bin/mktest/hosted.rs:
src/bin/mktest/pager.rs:
src/bin/mktest/tests.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=
# env-dep:CLIPPY_CONF_DIR
