//! Which implementation runs the layers: this crate's CPU kernels, or Candle's
//! device-agnostic ops only, exactly the code that CUDA and Metal run.
//!
//! The choice is made per call, at the model's entry points ([`scoped`]), and read by every
//! layer that has a CPU kernel ([`native`]): a thread-local flag rather than an argument
//! threaded through every layer's `forward`. The layers' kernels run on the calling thread's
//! decision; their data-parallel insides never consult it.

use std::cell::Cell;
use std::str::FromStr;

use candle_core::Device;

/// The implementation of the layers on the CPU. Other devices always run Candle's ops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Kernels {
    /// This crate's kernels for f32 on the CPU (fused convolutions, batch norm, pooling,
    /// losses, optimiser), Candle's ops elsewhere.
    #[default]
    Native,
    /// Candle's device-agnostic ops everywhere: the path CUDA and Metal take, runnable and
    /// testable on the CPU.
    Candle,
}

impl Kernels {
    /// The name `FromStr` reads.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Native => "native",
            Kernels::Candle => "candle",
        }
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kernels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "native" => Ok(Kernels::Native),
            "candle" => Ok(Kernels::Candle),
            _ => Err(format!(
                "unknown kernels {s:?}: expected \"native\" (this crate's CPU kernels) or \
                 \"candle\" (Candle's device-agnostic ops, the GPU path)"
            )),
        }
    }
}

thread_local! {
    static CANDLE_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with `kernels` selected on this thread, restoring the previous choice after
/// (also on unwinding), so that scopes nest.
pub fn scoped<R>(kernels: Kernels, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            CANDLE_ONLY.with(|c| c.set(self.0));
        }
    }
    let previous = CANDLE_ONLY.with(|c| c.replace(kernels == Kernels::Candle));
    let _restore = Restore(previous);
    f()
}

/// The selection in force on this thread.
pub fn current() -> Kernels {
    if CANDLE_ONLY.with(Cell::get) {
        Kernels::Candle
    } else {
        Kernels::Native
    }
}

/// Whether this crate's CPU kernels may run on `device` (the caller checks the dtype).
pub(crate) fn native(device: &Device) -> bool {
    device.is_cpu() && current() == Kernels::Native
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_and_restore() {
        assert_eq!(current(), Kernels::Native);
        scoped(Kernels::Candle, || {
            assert!(!native(&Device::Cpu));
            scoped(Kernels::Native, || assert!(native(&Device::Cpu)));
            assert_eq!(current(), Kernels::Candle);
        });
        assert!(native(&Device::Cpu));
        let unwound = std::panic::catch_unwind(|| scoped(Kernels::Candle, || panic!("boom")));
        assert!(unwound.is_err());
        assert_eq!(current(), Kernels::Native);
    }

    #[test]
    fn parses_names() {
        assert_eq!("candle".parse::<Kernels>(), Ok(Kernels::Candle));
        assert_eq!("Native".parse::<Kernels>(), Ok(Kernels::Native));
        assert!("cuda".parse::<Kernels>().unwrap_err().contains("\"cuda\""));
    }
}
