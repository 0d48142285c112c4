//! How the agent's heap behaves: one process serves every pod of a node, so memory it holds but
//! does not use is the mesh's cost, counted against it.

/// Caps glibc's malloc arenas at two. By default glibc gives busy threads up to 8 arenas per core,
/// each keeping its own free memory; the agent's threads (tokio workers, one netns thread per pod)
/// allocate little, so extra arenas only hold memory. Call it before any thread starts.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands free heap pages back to the kernel (glibc's malloc_trim), after start-up's peak.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim is thread-safe and only releases memory malloc no longer uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn freed_heap_goes_back_to_the_kernel() {
        // Many small blocks (below the mmap threshold), so they live in the heap, then freed.
        let blocks: Vec<Vec<u8>> = (0..20_000).map(|i| vec![i as u8; 2000]).collect();
        let with_blocks = rss_kib();
        drop(blocks);
        release_free_heap();
        let after = rss_kib();
        assert!(
            after + 20_000 < with_blocks,
            "RSS went from {with_blocks} KiB to only {after} KiB after freeing 40 MB"
        );
    }
}
