//! The operator's heap, as the C allocator sees it.
//!
//! Most of the operator's memory is its watch caches. While they fill, every listed object
//! arrives with fields that are dropped right away (managedFields, most of a Pod): the
//! allocator keeps those freed pages, so the resident size stays at the high-water mark of the
//! initial lists rather than what the caches hold. [`release_free_memory`] hands free pages
//! back to the kernel once the caches are synced; [`heap_in_use`] is exported as a metric so
//! that the live size can be told apart from the resident one.
//!
//! All are glibc's (`malloc_trim`, `mallinfo2`, `mallopt`); with another C library they do
//! nothing. [`tune_allocator`] sets the allocator up for the operator's pattern of use.

// The only unsafe code of the operator: calls into the C library, no pointers involved.
#![allow(unsafe_code)]

/// Bytes of heap in use (allocated and not freed), when the C library can tell.
pub fn heap_in_use() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        Some((info.uordblks + info.hblkhd) as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Sets glibc's allocator up for a long-running process whose memory is mostly its caches:
/// at most two arenas (otherwise each of tokio's worker and blocking threads may get one, and
/// each arena keeps free pages of its own), and a fixed mmap threshold of 128 KiB, so that a
/// large buffer (a page of an initial list, a big ConfigMap) is mapped and handed back when
/// freed, instead of raising the threshold and staying in the heap as a hole. Call it before
/// any thread starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Returns free heap pages to the kernel (cheap: a walk over the free lists).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds as free.
    unsafe {
        libc::malloc_trim(0);
    }
}

// The test of these figures is tests/heap_gauge.rs: the heap is shared by every thread of a
// process, so it needs a test binary with no other test running beside it.
