//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

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
