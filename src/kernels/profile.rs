//! Wall time per convolution shape and per network stage, for finding where inference time
//! goes (`examples/bench --profile`, beside OpenVINO's `PERF_COUNT` in
//! `scripts/bench_runtimes.py --profile`). Off unless [`enable`]d: one relaxed atomic load per
//! call then.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TIMES: Mutex<BTreeMap<String, Entry>> = Mutex::new(BTreeMap::new());

/// Calls, seconds and multiply-adds recorded under one name.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Entry {
    /// How many calls.
    pub calls: usize,
    /// Their total wall time.
    pub seconds: f64,
    /// Their direct-convolution multiply-adds (0 for stages).
    pub macs: f64,
}

/// Starts recording (and clears what was recorded).
pub fn enable() {
    reset();
    ENABLED.store(true, Ordering::Relaxed);
}

/// Clears what was recorded.
pub fn reset() {
    if let Ok(mut t) = TIMES.lock() {
        t.clear();
    }
}

/// What was recorded, by name.
pub fn snapshot() -> BTreeMap<String, Entry> {
    TIMES.lock().map(|t| t.clone()).unwrap_or_default()
}

/// Runs `f`, recording its wall time under `name()` (built only when recording) with `macs`.
pub fn timed<T>(name: impl FnOnce() -> String, macs: f64, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let seconds = start.elapsed().as_secs_f64();
    if let Ok(mut t) = TIMES.lock() {
        let e = t.entry(name()).or_default();
        e.calls += 1;
        e.seconds += seconds;
        e.macs += macs;
    }
    out
}
