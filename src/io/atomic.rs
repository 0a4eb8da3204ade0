//! File writing: every file this crate and its examples write goes through here, so that
//! readers see the old content or the new, never a part, and a failure leaves no temporary
//! behind.
//!
//! What stands at the destination decides how ([`Destination`]): a regular file or a new
//! path is written to a hidden temporary beside it (same folder, so the rename cannot cross
//! file systems), synced, then renamed over it; a symbolic link is written through, its
//! final target replaced that way and the link kept; a character or block device, a FIFO
//! and `-` (standard output) get the bytes directly, once they were produced in full; a
//! folder or a socket is refused, never replaced. `/dev/stdout` is standard output, and other
//! existing paths under `/dev` and `/proc` are written in place. [`Staged`] does the same for
//! several files at once, making them current only when all were written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Error, Result};

/// How a destination is written, from what stands there ([`Destination::of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A regular file or nothing yet: replaced atomically. The path is the link's final
    /// target when the destination was a symbolic link.
    Replace(PathBuf),
    /// A character or block device or a FIFO: written in place.
    Direct(PathBuf),
    /// `-`: standard output.
    Stdout,
}

/// Symbolic links followed before giving up (Linux's limit).
const MAX_LINKS: usize = 40;

impl Destination {
    /// Classifies `path`, following symbolic links; refuses folders, sockets and link loops.
    pub fn of(path: &Path) -> Result<Self> {
        // Through fd 1, not a new open of its target: a regular file there would be written
        // from offset 0 over the process's other output, a pipe has no path to replace.
        if ["-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"]
            .iter()
            .any(|s| path == Path::new(s))
        {
            return Ok(Self::Stdout);
        }
        // Other descriptors and kernel files are written in place, never replaced.
        if (path.starts_with("/dev") || path.starts_with("/proc")) && path.exists() {
            return Ok(Self::Direct(path.to_path_buf()));
        }
        let mut current = path.to_path_buf();
        for _ in 0..MAX_LINKS {
            let meta = match std::fs::symlink_metadata(&current) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(Self::Replace(current))
                }
                Err(source) => {
                    return Err(Error::Io {
                        path: current,
                        source,
                    })
                }
                Ok(meta) => meta,
            };
            let kind = meta.file_type();
            if kind.is_symlink() {
                let link = std::fs::read_link(&current).map_err(io_error(&current))?;
                current = match current.parent() {
                    Some(dir) => dir.join(link),
                    None => link,
                };
                continue;
            }
            if kind.is_file() {
                return Ok(Self::Replace(current));
            }
            if is_device_or_fifo(&kind) {
                return Ok(Self::Direct(current));
            }
            let what = if kind.is_dir() {
                "a folder"
            } else {
                "not a regular file"
            };
            return Err(Error::Invalid(format!(
                "{}: {what}; refusing to replace it",
                path.display()
            )));
        }
        Err(Error::Invalid(format!(
            "{}: more than {MAX_LINKS} symbolic links deep (a loop?)",
            path.display()
        )))
    }

    /// Where the content is produced: beside the file it replaces, else in the temporary
    /// folder (then copied to the device, FIFO or standard output).
    fn temporary(&self) -> Result<(PathBuf, Option<PathBuf>)> {
        match self {
            Self::Replace(path) => temporary_tracked(path),
            Self::Direct(_) | Self::Stdout => {
                let dir = std::env::temp_dir();
                Ok((
                    dir.join(format!(".retinanet-out.{}.tmp", unique_suffix())),
                    None,
                ))
            }
        }
    }

    /// Makes the finished temporary `tmp` the content of this destination.
    fn finish(&self, tmp: TempGuard) -> Result<()> {
        match self {
            Self::Replace(path) => tmp.persist(path),
            Self::Direct(path) => {
                let bytes = std::fs::read(tmp.path()).map_err(io_error(tmp.path()))?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io_error(path))?;
                f.write_all(&bytes).map_err(io_error(path))?;
                f.flush().map_err(io_error(path))
            }
            Self::Stdout => {
                let bytes = std::fs::read(tmp.path()).map_err(io_error(tmp.path()))?;
                write_stdout(&bytes)
            }
        }
    }
}

#[cfg(unix)]
fn is_device_or_fifo(kind: &std::fs::FileType) -> bool {
    use std::os::unix::fs::FileTypeExt;
    kind.is_char_device() || kind.is_block_device() || kind.is_fifo()
}

#[cfg(not(unix))]
fn is_device_or_fifo(_: &std::fs::FileType) -> bool {
    false
}

/// Writes `bytes` to standard output and flushes; the error names `-`. A closed pipe is an
/// error of kind [`std::io::ErrorKind::BrokenPipe`] ([`is_broken_pipe`]).
pub fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => io_error(Path::new("-"))(e),
            _ => Error::Invalid(format!("cannot write to standard output: {e}")),
        })
}

/// Whether `error` (or an error it wraps) is a write to a closed pipe, which a command
/// ends quietly on (`detect … | head`).
pub fn is_broken_pipe(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        let io = e.downcast_ref::<std::io::Error>();
        if io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
            return true;
        }
        current = e.source();
    }
    false
}

/// Writes `bytes` to `path` as its [`Destination`] says, creating its folder if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| write_new(tmp, bytes))
}

/// Writes a new file ([`Staged::write_with`] syncs it before the rename).
fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io_error(path))?;
    f.write_all(bytes).map_err(io_error(path))
}

/// Runs `write` on a temporary path, then makes it the content of `path` as its
/// [`Destination`] says; on failure the temporary is removed, `path` is untouched and a
/// folder created for it is removed again.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut staged = Staged::default();
    staged.write_with(path, write)?;
    staged.commit()
}

/// A fresh hidden temporary name beside `path` (`.NAME.PID-N.tmp`), its folder created.
pub fn temporary_for(path: &Path) -> Result<PathBuf> {
    Ok(temporary_tracked(path)?.0)
}

/// As [`temporary_for`], with the topmost folder it created, if any.
fn temporary_tracked(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let created = create_dir_tracked(&dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        unique_suffix()
    ));
    Ok((tmp, created))
}

/// Creates `dir` and its missing parents; returns the topmost one it created.
fn create_dir_tracked(dir: &Path) -> Result<Option<PathBuf>> {
    let top = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .last();
    let top = top.map(Path::to_path_buf);
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    Ok(top)
}

/// Removes `dir` and its parents up to `top` while they are empty (folders this module
/// created for files that were never written).
fn remove_empty_dirs(dir: &Path, top: &Path) {
    for d in dir.ancestors() {
        if std::fs::remove_dir(d).is_err() || d == top {
            break;
        }
    }
}

/// Removes temporaries this module left in `dir` (`.NAME.PID-N.tmp`) when killed, those of
/// processes no longer running; returns their names. Where running processes cannot be
/// told (no `/proc`), every temporary but this process's counts as stale: call it on a
/// folder this process owns, such as a training run's output.
pub fn remove_stale_temporaries(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.map_err(io_error(dir))?,
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = temporary_pid(&name) else {
            continue;
        };
        if pid != std::process::id() && !process_running(pid) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io_error(&path))?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

/// The process id in a temporary's name `.NAME.PID-N.tmp`.
fn temporary_pid(name: &str) -> Option<u32> {
    let stem = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (_, suffix) = stem.rsplit_once('.')?;
    let (pid, n) = suffix.split_once('-')?;
    n.parse::<usize>().ok()?;
    pid.parse().ok()
}

fn process_running(pid: u32) -> bool {
    let proc = Path::new("/proc");
    proc.is_dir() && proc.join(pid.to_string()).exists()
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
        sync_parent(dest);
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

/// Several files written to temporaries and made current by [`Staged::commit`], once all
/// succeeded; dropped uncommitted, it removes them all, and the folders it created for them.
#[derive(Debug, Default)]
pub struct Staged {
    files: Vec<StagedFile>,
}

#[derive(Debug)]
struct StagedFile {
    tmp: TempGuard,
    dest: Destination,
    /// The topmost folder created for the file, removed again if it stays empty.
    created: Option<PathBuf>,
}

impl Staged {
    /// Writes the future `dest` with `write` (given the temporary path).
    pub fn write_with(
        &mut self,
        dest: &Path,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        let dest = Destination::of(dest)?;
        let (tmp, created) = dest.temporary()?;
        // Guarded before writing, so a failed write is cleaned up too.
        let tmp = TempGuard::new(tmp);
        let path = tmp.path().to_path_buf();
        self.files.push(StagedFile { tmp, dest, created });
        write(&path)?;
        // Whatever `write` did (an encoder, a copy), the data is on disk before the rename.
        sync(&path)
    }

    /// Writes `bytes` as the future `dest`.
    pub fn write(&mut self, dest: &Path, bytes: &[u8]) -> Result<()> {
        self.write_with(dest, |tmp| write_new(tmp, bytes))
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

    /// Makes every file current, in the order written.
    pub fn commit(mut self) -> Result<()> {
        for file in std::mem::take(&mut self.files) {
            file.dest.finish(file.tmp)?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for file in std::mem::take(&mut self.files) {
            let dir = file.tmp.path().parent().map(Path::to_path_buf);
            drop(file.tmp);
            if let (Some(dir), Some(top)) = (dir, file.created) {
                remove_empty_dirs(&dir, &top);
            }
        }
    }
}

/// Syncs the folder holding `path`, so that a rename into it survives a power cut. Best
/// effort: not every platform or file system can sync a folder.
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Syncs a written file to disk.
fn sync(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).map_err(io_error(path))?;
    f.sync_all().map_err(io_error(path))
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

    #[test]
    #[cfg(target_os = "linux")]
    fn a_symlink_is_written_through_and_kept() {
        let target = scratch("target.json");
        let dir = target.parent().unwrap().to_path_buf();
        write_atomic(&target, b"old").unwrap();
        let link = dir.join("link.json");
        std::os::unix::fs::symlink("target.json", &link).unwrap();
        write_atomic(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        // A dangling link creates its target.
        let dangling = dir.join("dangling.json");
        std::os::unix::fs::symlink("made.json", &dangling).unwrap();
        write_atomic(&dangling, b"made").unwrap();
        assert_eq!(std::fs::read(dir.join("made.json")).unwrap(), b"made");
        assert_eq!(
            entries(&dir),
            ["dangling.json", "link.json", "made.json", "target.json"]
        );
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn devices_are_written_in_place_and_folders_refused() {
        assert_eq!(
            Destination::of(Path::new("/dev/null")).unwrap(),
            Destination::Direct("/dev/null".into())
        );
        write_atomic(Path::new("/dev/null"), b"gone").unwrap();
        let full = write_atomic(Path::new("/dev/full"), b"x").unwrap_err();
        assert!(full.to_string().starts_with("/dev/full: "), "{full}");
        assert_eq!(
            Destination::of(Path::new("-")).unwrap(),
            Destination::Stdout
        );
        assert_eq!(
            Destination::of(Path::new("/dev/stdout")).unwrap(),
            Destination::Stdout
        );
        assert_eq!(
            Destination::of(Path::new("/dev/stderr")).unwrap(),
            Destination::Direct("/dev/stderr".into())
        );
        let dir = scratch("d");
        std::fs::create_dir(&dir).unwrap();
        let err = write_atomic(&dir, b"x").unwrap_err().to_string();
        assert!(err.contains("a folder; refusing to replace it"), "{err}");
        assert!(dir.is_dir());
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_fifo_gets_the_bytes_and_stays_a_fifo() {
        let fifo = scratch("pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("skipped: no mkfifo");
            return;
        }
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        write_atomic(&fifo, b"through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
    }

    #[test]
    fn a_folder_created_for_a_failed_write_is_removed() {
        let root = scratch("root");
        let dest = root.join("a/b/out.png");
        let err = write_atomic_with(&dest, |_| Err(Error::Invalid("no".into())));
        assert!(err.is_err());
        assert!(!root.exists(), "created folders removed");
        write_atomic(&dest, b"png").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"png");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let keep = scratch("keep.bin");
        let dir = keep.parent().unwrap().to_path_buf();
        std::fs::write(&keep, b"k").unwrap();
        // Process ids above the kernel's limit (2^22) are never running.
        std::fs::write(dir.join(".last.safetensors.4999999-0.tmp"), b"stale").unwrap();
        let mine = dir.join(format!(".x.{}.tmp", unique_suffix()));
        std::fs::write(&mine, b"mine").unwrap();
        let removed = remove_stale_temporaries(&dir).unwrap();
        assert_eq!(removed, [".last.safetensors.4999999-0.tmp"]);
        assert!(mine.exists() && keep.exists());
        assert_eq!(temporary_pid(".a.b.c.12-3.tmp"), Some(12));
        assert_eq!(temporary_pid(".a.tmp"), None);
    }
}
