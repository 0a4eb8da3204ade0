//! Host-memory helpers shared by the CPU ops: borrowing a tensor's values without a copy,
//! a pointer for parallel writes to disjoint elements, and allocator tuning.

use candle_core::{CpuStorage, Layout, Result, Tensor, WithDType};

/// The values of a contiguous CPU argument of an op, as `T`.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    if !l.is_contiguous() {
        candle_core::bail!("expected a contiguous CPU tensor");
    }
    Ok(&s.as_slice::<T>()?[l.start_offset()..][..l.shape().elem_count()])
}

/// The values of a contiguous f32 CPU argument of an op.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    slice(s, l)
}

/// The values of a tensor as a vector of `T`.
pub(crate) fn host<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>()
}

/// Runs `f` on the values of a contiguous f32 CPU tensor in place; `None` for any other
/// tensor (the caller falls back to Candle's ops).
pub(crate) fn host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f32_slice(cpu, layout).ok().map(f),
        _ => None,
    }
}

/// Runs `f` on the values of an f32 CPU tensor, copying them only if it is not contiguous.
pub(crate) fn with_host<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    match host_f32(&t.contiguous()?, f) {
        Some(r) => Ok(r),
        None => candle_core::bail!("expected an f32 CPU tensor"),
    }
}

/// A pointer shared by threads that write disjoint elements of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: its users write disjoint elements (each output position belongs to one thread).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The element `i` places further (a method, so closures capture the whole `SyncPtr`).
    ///
    /// # Safety
    /// `i` must lie inside the allocation.
    pub(crate) unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// Makes glibc's malloc keep freed memory for reuse instead of mapping fresh pages for every
/// large buffer: CPU inference allocates tens of megabytes per layer, and the page faults of
/// fresh mappings cost as much as the arithmetic of the smaller convolutions. Process-wide
/// and idempotent; a no-op off glibc.
pub(crate) fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters.
            unsafe {
                libc::mallopt(libc::M_MMAP_MAX, 0);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        });
    }
}
