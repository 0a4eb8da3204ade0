//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The device the parity tests run on: `$RETINANET_TEST_DEVICE` (`cpu`, the default, or
/// `cuda`, `cuda:N`, `metal`), as `scripts/gpu-check.sh` runs them on a GPU.
pub fn test_device() -> candle_core::Device {
    let name = std::env::var("RETINANET_TEST_DEVICE").unwrap_or_default();
    let open = match name.as_str() {
        "" | "cpu" => return candle_core::Device::Cpu,
        "cuda" => candle_core::Device::new_cuda(0),
        "metal" => candle_core::Device::new_metal(0),
        other => match other.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(i)) => candle_core::Device::new_cuda(i),
            _ => panic!("RETINANET_TEST_DEVICE={other}: expected cpu, cuda, cuda:N or metal"),
        },
    };
    open.unwrap_or_else(|e| panic!("RETINANET_TEST_DEVICE={name}: {e}"))
}

/// Root of the generated fixtures: `$RETINANET_FIXTURES`, else `target/fixtures`.
pub fn fixtures_root() -> PathBuf {
    std::env::var_os("RETINANET_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fixtures"))
}

/// A fixture directory, or a panic that says how to make it.
pub fn fixture_dir(sub: &str, script: &str) -> PathBuf {
    let dir = fixtures_root().join(sub);
    assert!(
        dir.is_dir(),
        "missing test fixtures {}: generate them with `$(bash scripts/venv.sh) scripts/{script}` \
         (or run `bash scripts/test.sh`, which does it for you)",
        dir.display()
    );
    dir
}

/// Records that `test` skipped its checks and why. The harness hides a passing test's output,
/// so the reason also goes to `target/skipped-tests.txt`, which `scripts/test.sh` prints after
/// the run (and `--nocapture` shows it in place).
pub fn skip(test: &str, reason: &str) {
    let line = format!("skipped {test}: {reason}");
    eprintln!("{line}");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/skipped-tests.txt");
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
    if let Err(e) = appended {
        eprintln!("cannot record the skip in {}: {e}", path.display());
    }
}

/// `target/<profile>/examples/<name>`, checked to be newer than its source: `cargo test
/// --test X` does not build examples.
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    let built = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}.rs"));
    assert!(
        built(&bin).is_some_and(|b| built(&source).is_some_and(|s| b >= s)),
        "{} is missing or older than its source: cargo build --release --example {name}",
        bin.display()
    );
    bin
}

/// A fresh, empty folder `retinanet-<tag>-<pid>-<name>` under the system's temporary folder.
pub fn scratch_dir(tag: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retinanet-{tag}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Lower-case hex sha256 of `bytes`, as the Hub's ETags give it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
