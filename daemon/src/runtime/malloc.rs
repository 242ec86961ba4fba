//! Allocator settings for the CPU path (glibc on Linux; a no-op elsewhere).
//!
//! A forward pass allocates and frees tensors of tens of megabytes hundreds of times. glibc
//! serves blocks above its mmap threshold (at most 32 MiB) with a fresh `mmap` and unmaps them
//! on free, so every such tensor is page-faulted and zeroed by the kernel again: on the 2-core box
//! that was about a quarter of the SS flow's forward time (perf: `clear_page_erms`,
//! `exc_page_fault` and the page-table locks). [`tune`] makes glibc keep freed memory in its heap
//! for reuse (no mmap for large blocks, trimming only past 512 MiB of free space at the top).
//! A resident server should hand the free pages back between jobs (`libc::malloc_trim(0)`).

/// Freed memory above this much at the top of the heap goes back to the kernel at once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 512 << 20;

/// Applies the settings above; call once at start, before the first large allocation.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; these values are in range.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
