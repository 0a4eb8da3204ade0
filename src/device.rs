//! Choosing the Candle device a model runs on.

use candle_core::utils::{cuda_is_available, metal_is_available};
use candle_core::Device;

use crate::{Error, Result};

/// Which device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA if this build supports it and a GPU opens, then Metal, then the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA GPU 0 (needs the `cuda` feature).
    Cuda,
    /// Metal GPU 0 (needs the `metal` feature).
    Metal,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;

    /// `auto`, `cpu`, `cuda` or `metal`, as command lines spell them.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "metal" => Ok(Self::Metal),
            _ => Err(Error::Invalid(format!(
                "unknown device {s:?}: expected auto, cpu, cuda or metal"
            ))),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
        })
    }
}

impl DeviceChoice {
    /// Opens the device; errors name the choice as a `--device` flag.
    pub fn open(self) -> Result<Device> {
        select(self).map_err(|e| Error::Invalid(format!("--device {self}: {e}")))
    }
}

/// Opens the requested device. Asking for a GPU this build cannot use is an error that names
/// the Cargo feature to enable.
pub fn select(choice: DeviceChoice) -> Result<Device> {
    let open_err = |what: &str, e: candle_core::Error| Error::Invalid(format!("{what}: {e}"));
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda if !cuda_is_available() => Err(Error::Invalid(
            "this build has no CUDA support; rebuild with `--features cuda`".into(),
        )),
        DeviceChoice::Cuda => {
            Device::new_cuda(0).map_err(|e| open_err("cannot open CUDA GPU 0", e))
        }
        DeviceChoice::Metal if !metal_is_available() => Err(Error::Invalid(
            "this build has no Metal support; rebuild with `--features metal`".into(),
        )),
        DeviceChoice::Metal => {
            Device::new_metal(0).map_err(|e| open_err("cannot open the Metal GPU", e))
        }
        DeviceChoice::Auto => Ok(cuda_is_available()
            .then(|| Device::new_cuda(0).ok())
            .flatten()
            .or_else(|| {
                metal_is_available()
                    .then(|| Device::new_metal(0).ok())
                    .flatten()
            })
            .unwrap_or(Device::Cpu)),
    }
}

/// A short name for messages: `CPU`, `CUDA` or `Metal`.
pub fn name(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "CPU",
        Device::Cuda(_) => "CUDA",
        Device::Metal(_) => "Metal",
    }
}

/// Gives Candle's element-wise thread pool one thread (sets `CANDLE_NUM_THREADS=1` unless
/// the caller set it), so that it does not compete with rayon's pool, which runs this
/// crate's convolutions. Candle's pool otherwise starts a worker per core that spins for
/// a while after every large element-wise op; on a 2-core machine those spins took a core
/// from the next convolution (training step R18 at 400×400, batch 2, on a busy machine:
/// 2.12 s → 1.45 s). Call it first thing in `main`, before any tensor exists: the pool
/// reads the variable once, when Candle first uses it.
pub fn one_candle_pool_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print_as_written() {
        for name in ["auto", "cpu", "cuda", "metal"] {
            let choice: DeviceChoice = name.parse().unwrap();
            assert_eq!(choice.to_string(), name);
        }
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert!("tpu".parse::<DeviceChoice>().is_err());
    }
}
