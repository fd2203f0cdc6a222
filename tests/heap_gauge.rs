//! The heap-in-use figure follows allocations.
//!
//! A process-wide figure, so this test has a binary of its own with a single test in it: in
//! the library's unit tests, other tests allocating and freeing on other threads moved the
//! figure between two readings (one run saw 64 MiB allocated and the figure grow by 8 KiB less).

use opsconductor_operator::memory::{heap_in_use, release_free_memory};

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_in_use_follows_allocations() {
    let before = heap_in_use().expect("glibc reports the heap");
    let block = std::hint::black_box(vec![1u8; 64 << 20]);
    let during = heap_in_use().unwrap();
    assert!(during >= before + (64 << 20), "{before} -> {during}");
    drop(block);
    release_free_memory();
    let after = heap_in_use().unwrap();
    assert!(after + (32 << 20) < during, "{during} -> {after}");
}
