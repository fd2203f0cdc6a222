//! The operator's heap, as the C allocator sees it.
//!
//! Most of the operator's memory is its watch caches. While they fill, every listed object
//! arrives with fields that are dropped right away (managedFields, most of a Pod): the
//! allocator keeps those freed pages, so the resident size stays at the high-water mark of the
//! initial lists rather than what the caches hold. [`release_free_memory`] hands free pages
//! back to the kernel once the caches are synced; [`heap_in_use`] is exported as a metric so
//! that the live size can be told apart from the resident one.
//!
//! Both are glibc's (`malloc_trim`, `mallinfo2`); with another C library they do nothing.

// The only unsafe code of the operator: two calls into the C library, no pointers involved.
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
