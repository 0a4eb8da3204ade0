//! Atomic file writing: every file this crate and its examples write goes through here, so
//! that readers see the old content or the new, never a part, and a failure leaves no
//! temporary behind.
//!
//! A file is written to a hidden temporary beside its destination (same folder, so the rename
//! cannot cross file systems), synced, then renamed over the destination. [`Staged`] does the
//! same for several files at once, renaming them only when all were written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Error, Result};

/// Writes `bytes` to `path` atomically, creating its folder if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| write_synced(tmp, bytes))
}

/// Writes and syncs a new file, so that the rename after it never exposes unwritten data.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io_error(path))?;
    f.write_all(bytes).map_err(io_error(path))?;
    f.sync_all().map_err(io_error(path))
}

/// Runs `write` on a temporary path beside `path`, then renames it over `path`; on failure
/// the temporary is removed and `path` is untouched.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let guard = TempGuard::new(temporary_for(path)?);
    write(guard.path())?;
    guard.persist(path)
}

/// A fresh hidden temporary name beside `path` (`.NAME.PID-N.tmp`), its folder created.
pub fn temporary_for(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    Ok(dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        unique_suffix()
    )))
}

/// A name unique among this process's temporaries: the process id and a counter.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes a temporary file or folder when dropped, unless disarmed: errors and panics
/// between creating a temporary and renaming it leave nothing behind.
#[derive(Debug)]
pub struct TempGuard(Option<PathBuf>);

impl TempGuard {
    /// Guards `path`.
    pub fn new(path: PathBuf) -> Self {
        Self(Some(path))
    }

    /// Keeps the path: it was renamed into place.
    pub fn disarm(&mut self) {
        self.0 = None;
    }

    /// The guarded path (empty once disarmed).
    pub fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    /// Renames the guarded file over `dest` and keeps it there.
    pub fn persist(mut self, dest: &Path) -> Result<()> {
        std::fs::rename(self.path(), dest).map_err(io_error(dest))?;
        self.disarm();
        Ok(())
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Several files written to temporaries and renamed into place together by
/// [`Staged::commit`], once all succeeded; dropped uncommitted, it removes them all.
#[derive(Debug, Default)]
pub struct Staged {
    files: Vec<(TempGuard, PathBuf)>,
}

impl Staged {
    /// Writes the future `dest` with `write` (given the temporary path).
    pub fn write_with(
        &mut self,
        dest: &Path,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        // Guarded before writing, so a failed write is cleaned up too.
        let guard = TempGuard::new(temporary_for(dest)?);
        let tmp = guard.path().to_path_buf();
        self.files.push((guard, dest.to_path_buf()));
        write(&tmp)
    }

    /// Writes `bytes` as the future `dest`.
    pub fn write(&mut self, dest: &Path, bytes: &[u8]) -> Result<()> {
        self.write_with(dest, |tmp| write_synced(tmp, bytes))
    }

    /// Encodes `image` as the future `dest`, in the format its extension names.
    pub fn save_image(&mut self, dest: &Path, image: &image::RgbImage) -> Result<()> {
        let image_error = |source| Error::Image {
            path: dest.to_path_buf(),
            source,
        };
        let format = image::ImageFormat::from_path(dest).map_err(image_error)?;
        self.write_with(dest, |tmp| {
            image.save_with_format(tmp, format).map_err(image_error)
        })
    }

    /// Renames every file into place, in the order written.
    pub fn commit(mut self) -> Result<()> {
        for (guard, dest) in std::mem::take(&mut self.files) {
            guard.persist(&dest)?;
        }
        Ok(())
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("retinanet-atomic-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_no_temporary() {
        let path = scratch("a.txt");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(Error::Invalid("disk full".into()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(path.parent().unwrap()), ["a.txt"]);
    }

    #[test]
    fn staged_files_appear_only_on_commit() {
        let (a, b) = (scratch("a.bin"), scratch("b.bin"));
        let dir = a.parent().unwrap().to_path_buf();
        let dir_b = b.parent().unwrap().to_path_buf();
        let mut staged = Staged::default();
        staged
            .write_with(&a, |t| std::fs::write(t, b"a").map_err(io_error(t)))
            .unwrap();
        assert!(!a.exists());
        drop(staged);
        assert!(entries(&dir).is_empty(), "dropped: temporaries removed");

        let mut staged = Staged::default();
        staged.write(&b, b"b").unwrap();
        staged.commit().unwrap();
        assert_eq!(entries(&dir_b), ["b.bin"]);
    }
}
