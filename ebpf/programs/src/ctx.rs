//! Context field access that the verifier accepts.
//!
//! The verifier only allows loads from a context pointer at a constant offset from its base. LLVM
//! happily turns neighbouring field reads into "advance the pointer, then load", which the verifier
//! rejects ("dereference of modified ctx ptr"). Volatile accesses keep each read and write a single
//! direct load or store.

/// Reads one context field.
///
/// # Safety
/// `p` must point into the program's context.
#[inline(always)]
pub unsafe fn ctx_read<T: Copy>(p: *const T) -> T {
    // SAFETY: upheld by the caller.
    unsafe { core::ptr::read_volatile(p) }
}

/// Writes one context field.
///
/// # Safety
/// `p` must point into the program's context at a writable field.
#[inline(always)]
pub unsafe fn ctx_write<T: Copy>(p: *mut T, v: T) {
    // SAFETY: upheld by the caller.
    unsafe { core::ptr::write_volatile(p, v) }
}

/// Reads a four-word IPv6 address field, one word at a time.
///
/// # Safety
/// `p` must point to a `[u32; 4]` inside the program's context.
#[inline(always)]
pub unsafe fn read_ip6(p: *const [u32; 4]) -> [u32; 4] {
    let w = p.cast::<u32>();
    // SAFETY: upheld by the caller; each word is within the array.
    unsafe { [ctx_read(w), ctx_read(w.add(1)), ctx_read(w.add(2)), ctx_read(w.add(3))] }
}
