//! The allocator's tuning (`memory::tune_allocator`) holds: a block above 128 KiB is mapped on
//! its own and handed back when freed, also after a larger block was freed (which, untuned,
//! raises glibc's mmap threshold to that block's size, so that the next large blocks stay in
//! the heap and leave holes there).
//!
//! The allocator's figures are process-wide, so this test has a binary of its own with a
//! single test in it (as `heap_gauge.rs`).

#![allow(unsafe_code)]

use std::hint::black_box;

use opsconductor_operator::memory::tune_allocator;

/// Bytes the allocator holds in blocks mapped on their own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn mapped() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2() }.hblkhd
}

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn large_blocks_are_mapped_and_handed_back_after_tuning() {
    tune_allocator();
    // Untuned, freeing this block raises the mmap threshold to 4 MiB.
    drop(black_box(vec![1u8; 4 << 20]));
    let before = mapped();
    let block = black_box(vec![1u8; 512 << 10]);
    let during = mapped();
    assert!(
        during >= before + (512 << 10),
        "a 512 KiB block should be mapped on its own: {before} -> {during} bytes mapped"
    );
    drop(block);
    let after = mapped();
    assert!(
        after < during,
        "a freed mapped block should be handed back: {during} -> {after} bytes mapped"
    );
}
