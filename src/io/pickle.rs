//! A pre-flight walk over a `.pth`'s pickle before Candle reads it: Candle's reader
//! allocates what a string's length prefix says (up to 4 GiB) before reading it, so a
//! corrupt length would abort the process on a small machine. The walk follows the opcodes
//! Candle knows, checks every length against the bytes left, and leaves everything else
//! (unknown opcodes, structure) to Candle's own errors.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Checks the pickle (`*/data.pkl`) of the zip-format `.pth` at `path`.
pub fn check_pth(path: &Path) -> Result<()> {
    let err = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| err(format!("not a readable zip: {e}")))?;
    let Some(name) = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
    else {
        return Ok(()); // Candle names what is missing.
    };
    let mut pickle = Vec::new();
    zip.by_name(&name)
        .and_then(|mut f| f.read_to_end(&mut pickle).map_err(Into::into))
        .map_err(|e| err(format!("cannot read {name}: {e}")))?;
    check_lengths(&pickle).map_err(|m| err(format!("malformed .pth: {name}: {m}")))
}

/// Walks the opcodes of `pickle`, refusing a length prefix longer than what follows it.
fn check_lengths(pickle: &[u8]) -> std::result::Result<(), String> {
    let mut at = 0;
    while let Some(&op) = pickle.get(at) {
        let rest = &pickle[at + 1..];
        let arg = match op {
            b'.' => return Ok(()),
            0x80 | b'q' | b'K' | b'h' => 1,
            b'M' => 2,
            b'r' | b'J' | b'j' => 4,
            b'G' => 8,
            b'X' => 4 + length(rest, 4, at)?,
            0x8a => 1 + length(rest, 1, at)?,
            b'c' => lines(rest, 2).ok_or(format!("unterminated global at byte {at}"))?,
            b')'
            | b'R'
            | b'('
            | b't'
            | b'Q'
            | 0x85..=0x89
            | b'N'
            | b's'
            | b'u'
            | b'}'
            | b'd'
            | b'b'
            | 0x81
            | b']'
            | b'a'
            | b'e' => 0,
            _ => return Ok(()), // Candle refuses what it does not know.
        };
        if arg > rest.len() {
            return Err(format!(
                "opcode at byte {at} needs {arg} bytes, {} remain",
                rest.len()
            ));
        }
        at += 1 + arg;
    }
    Ok(())
}

/// The little-endian length in the first `width` bytes of `rest`.
fn length(rest: &[u8], width: usize, at: usize) -> std::result::Result<usize, String> {
    let bytes = rest
        .get(..width)
        .ok_or(format!("truncated length at byte {at}"))?;
    let n = bytes
        .iter()
        .rev()
        .fold(0u64, |n, &b| (n << 8) | u64::from(b));
    usize::try_from(n).map_err(|e| e.to_string())
}

/// The bytes taken by the next `n` newline-terminated lines of `rest`.
fn lines(rest: &[u8], n: usize) -> Option<usize> {
    let mut taken = 0;
    for _ in 0..n {
        taken += rest.get(taken..)?.iter().position(|&b| b == b'\n')? + 1;
    }
    Some(taken)
}

#[cfg(test)]
mod tests {
    use super::check_lengths;

    #[test]
    fn a_string_longer_than_the_pickle_is_refused() {
        // {"a": "b"}: proto 2, empty dict, X "a", X "b", setitem, stop.
        let good = b"\x80\x02}X\x01\x00\x00\x00aX\x01\x00\x00\x00bs.";
        assert_eq!(check_lengths(good), Ok(()));
        let mut bad = good.to_vec();
        bad[4..8].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
        let e = check_lengths(&bad).unwrap_err();
        assert!(e.contains("byte 3 needs 4294967299 bytes"), "{e}");
        assert!(check_lengths(b"\x80\x02cglobal\nno newline").is_err());
    }
}
