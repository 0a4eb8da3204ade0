//! A small HTTP server on 127.0.0.1 that answers like the Hugging Face Hub (and a plain file
//! host), for the download tests: `hf-hub` 0.4 first sends `GET` with `Range: bytes=0-0` and
//! reads `ETag`/`X-Linked-Etag`, `X-Repo-Commit` and `Content-Range`, then `GET`s the file
//! with `Range: bytes=N-`.
// Each test crate uses its own part of the server.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A file the server offers.
#[derive(Clone)]
pub struct Served {
    pub body: Arc<Vec<u8>>,
    /// Sent as `X-Linked-Etag` (the Hub does this for LFS files, with their sha256).
    pub etag: String,
    /// Sent as `X-Repo-Commit`.
    pub commit: String,
}

/// The running server; it lives until the test process ends.
pub struct Server {
    pub url: String,
    files: Arc<Mutex<HashMap<String, Served>>>,
    requests: Arc<AtomicUsize>,
    /// `Authorization` headers received, in order.
    authorizations: Arc<Mutex<Vec<String>>>,
}

impl Server {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let files: Arc<Mutex<HashMap<String, Served>>> = Arc::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let authorizations: Arc<Mutex<Vec<String>>> = Arc::default();
        let (f, r, a) = (files.clone(), requests.clone(), authorizations.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                r.fetch_add(1, Ordering::SeqCst);
                let (f, a) = (f.clone(), a.clone());
                std::thread::spawn(move || {
                    let _ = handle(stream, &f, &a);
                });
            }
        });
        Self {
            url,
            files,
            requests,
            authorizations,
        }
    }

    /// Serves `body` at `path` (starting with `/`).
    pub fn serve(&self, path: &str, body: Vec<u8>, etag: &str, commit: &str) {
        self.files.lock().unwrap().insert(
            path.to_string(),
            Served {
                body: Arc::new(body),
                etag: etag.to_string(),
                commit: commit.to_string(),
            },
        );
    }

    /// Connections accepted so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// The `Authorization` headers received so far.
    pub fn authorizations(&self) -> Vec<String> {
        self.authorizations.lock().unwrap().clone()
    }
}

fn handle(
    stream: TcpStream,
    files: &Mutex<HashMap<String, Served>>,
    authorizations: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut range_start = None;
    let mut range_end = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or(("", ""));
        if name.eq_ignore_ascii_case("authorization") {
            authorizations
                .lock()
                .unwrap()
                .push(value.trim().to_string());
        }
        if name.eq_ignore_ascii_case("range") {
            let spec = value.trim().trim_start_matches("bytes=");
            let (a, b) = spec.split_once('-').unwrap_or(("0", ""));
            range_start = a.parse::<usize>().ok();
            range_end = b.parse::<usize>().ok();
        }
    }
    let file = files.lock().unwrap().get(path).cloned();
    let mut out = stream;
    let Some(file) = file.filter(|_| method == "GET" || method == "HEAD") else {
        let body = b"not found";
        write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        return out.write_all(body);
    };
    let len = file.body.len();
    let start = range_start.unwrap_or(0).min(len);
    let end = range_end.map_or(len, |e| (e + 1).min(len));
    let slice = &file.body[start..end.max(start)];
    let status = if range_start.is_some() {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{len}\r\n\
         ETag: \"{}\"\r\nX-Linked-Etag: \"{}\"\r\nX-Repo-Commit: {}\r\nConnection: close\r\n\r\n",
        slice.len(),
        end.max(start + 1) - 1,
        file.etag,
        file.etag,
        file.commit
    )?;
    if method == "GET" {
        out.write_all(slice)?;
    }
    out.flush()
}
