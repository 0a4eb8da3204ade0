//! Range checks shared by the library and the command lines, so that a bad number is refused
//! before any work starts, naming where it came from (a flag, a checkpoint's metadata), rather
//! than giving a wrong result, a panic or an aborted allocation later.

use crate::{Error, Result};

/// The longest image side a model input may have after resizing: 8192 px. At the limit the
/// input alone takes 768 MiB as f32 and the activations many times that; beyond it a
/// RetinaNet's buffers outgrow any machine this crate runs on.
pub const MAX_SIDE: usize = 8192;

/// Checks a resize target `min_size`/`max_size` from `source` (e.g. `--min-size`, or a
/// checkpoint's metadata): positive, at most [`MAX_SIDE`], refusing with the memory figure.
pub fn check_input_size(min_size: usize, max_size: usize, source: &str) -> Result<()> {
    check_side(min_size, &format!("{source}: min_size"))?;
    check_side(max_size, &format!("{source}: max_size"))
}

/// Checks one resize side `what` (e.g. `--max-size`): positive, at most [`MAX_SIDE`].
pub fn check_side(side: usize, what: &str) -> Result<()> {
    if side == 0 {
        return Err(Error::Invalid(format!("{what} must be positive")));
    }
    if side > MAX_SIDE {
        let gib = (side as f64).powi(2) * 3.0 * 4.0 / (1u64 << 30) as f64;
        return Err(Error::Invalid(format!(
            "{what} {side}: a {side}×{side} input needs {gib:.1} GiB for its pixels alone \
             (f32 RGB), its activations far more; at most {MAX_SIDE}"
        )));
    }
    Ok(())
}

/// Checks that `value` (named `what`) is finite and above zero.
pub fn check_positive(value: f64, what: &str) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{what} must be a finite number above 0, got {value}"
    )))
}

/// Checks that `value` (named `what`) is finite and at least zero.
pub fn check_non_negative(value: f64, what: &str) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{what} must be a finite number ≥ 0, got {value}"
    )))
}

/// Checks that `value` (named `what`) is a probability, in [0, 1].
pub fn check_unit(value: f64, what: &str) -> Result<()> {
    if (0.0..=1.0).contains(&value) {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{what} must be in [0, 1], got {value}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_are_refused_with_their_source() {
        let err = check_input_size(100_000, 1333, "--min-size").unwrap_err();
        assert!(
            err.to_string().contains("--min-size: min_size 100000"),
            "{err}"
        );
        assert!(err.to_string().contains("111.8 GiB"), "{err}");
        assert!(check_input_size(800, 1333, "x").is_ok());
        assert!(check_input_size(0, 1333, "x").is_err());
        assert!(check_positive(f64::NAN, "--lr").is_err());
        assert!(check_positive(-1.0, "--lr").is_err());
        assert!(check_positive(f64::INFINITY, "--lr").is_err());
        assert!(check_positive(0.01, "--lr").is_ok());
        assert!(check_non_negative(0.0, "--bn-eps").is_ok());
        assert!(check_non_negative(f64::NAN, "--bn-eps").is_err());
        assert!(check_unit(1.5, "--hflip").is_err());
        assert!(check_unit(f64::NAN, "--hflip").is_err());
    }
}
