//! Downloads through the real `hf-hub` client and the plain-HTTP torchvision fetch, against a
//! local server: verified files are cached in the standard layouts and load as models;
//! corrupt ones are rejected without touching the cache; offline mode uses the cache or
//! fails naming the file; an unreachable server is named.

mod common;
#[path = "common/http.rs"]
mod http;

use std::path::{Path, PathBuf};

use candle_core::Device;
use http::Server;
use retinanet::io::hub::{self, HubOptions, Source};
use retinanet::{Error, RetinaNet};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn options(server: &Server, dir: &Path) -> HubOptions {
    HubOptions {
        hf_cache: dir.join("hf"),
        hf_endpoint: server.url.clone(),
        hf_token: None,
        torch_cache: dir.join("torch"),
        torchvision_url: format!("{}/models/", server.url),
        offline: false,
        progress: false,
    }
}

/// Every file below `dir` (following no links), relative.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out
}

#[test]
fn hub_file_is_downloaded_verified_cached_and_loads() {
    let fixtures = common::fixture_dir("parity", "make_parity_fixtures.py");
    let body = std::fs::read(fixtures.join("v1_r18_k7/model.safetensors")).unwrap();
    let hash = common::sha256_hex(&body);
    let server = Server::start();
    server.serve(
        "/test/tiny-retinanet/resolve/main/model.safetensors",
        body.clone(),
        &hash,
        COMMIT,
    );
    let dir = common::scratch_dir("hub", "ok");
    let opts = options(&server, &dir);
    let source = Source::HuggingFace {
        repo: "test/tiny-retinanet",
        revision: "main",
        file: "model.safetensors",
    };

    let path = hub::fetch(&source, Some(&hash[..8]), &opts).unwrap();
    let expected = opts.hf_cache.join(format!(
        "models--test--tiny-retinanet/snapshots/{COMMIT}/model.safetensors"
    ));
    assert_eq!(path, expected);
    assert!(path.symlink_metadata().unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let blob = opts
        .hf_cache
        .join(format!("models--test--tiny-retinanet/blobs/{hash}"));
    assert!(blob.is_file());
    let refs = opts.hf_cache.join("models--test--tiny-retinanet/refs/main");
    assert_eq!(std::fs::read_to_string(refs).unwrap(), COMMIT);
    let leftovers: Vec<_> = std::fs::read_dir(&opts.hf_cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers,
        ["models--test--tiny-retinanet"],
        "no staging left behind"
    );

    let model = RetinaNet::load(&path, &Device::Cpu).unwrap();
    assert_eq!(model.config().num_classes, 7);

    // Cached: neither online nor offline touches the network again.
    let before = server.requests();
    assert_eq!(hub::fetch(&source, None, &opts).unwrap(), path);
    let offline = HubOptions {
        offline: true,
        ..opts.clone()
    };
    assert_eq!(hub::fetch(&source, None, &offline).unwrap(), path);
    assert_eq!(hub::cached(&source, &offline), Some(path));
    assert_eq!(server.requests(), before);
    std::fs::remove_dir_all(&dir).unwrap(); // a 77 MB copy
}

#[test]
fn corrupt_hub_download_is_rejected_and_the_cache_untouched() {
    let server = Server::start();
    let good = b"the weights as published".to_vec();
    let mut bad = good.clone();
    bad[3] ^= 0x20;
    // The Hub announces the sha256 of the good bytes, the transfer delivers others.
    server.serve(
        "/test/corrupt/resolve/main/model.safetensors",
        bad,
        &common::sha256_hex(&good),
        COMMIT,
    );
    // Intact bytes, but not the pinned file.
    server.serve(
        "/test/pinned/resolve/main/model.safetensors",
        good.clone(),
        &common::sha256_hex(&good),
        COMMIT,
    );
    let dir = common::scratch_dir("hub", "corrupt");
    let opts = options(&server, &dir);

    let corrupt = Source::HuggingFace {
        repo: "test/corrupt",
        revision: "main",
        file: "model.safetensors",
    };
    let err = hub::fetch(&corrupt, None, &opts).unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("/test/corrupt/resolve/main/model.safetensors"),
        "{err}"
    );

    let pinned = Source::HuggingFace {
        repo: "test/pinned",
        revision: "main",
        file: "model.safetensors",
    };
    let err = hub::fetch(&pinned, Some("deadbeef"), &opts).unwrap_err();
    assert!(
        matches!(err, Error::ChecksumMismatch { ref expected, .. } if expected == "deadbeef"),
        "{err}"
    );

    assert_eq!(
        files_under(&opts.hf_cache),
        Vec::<PathBuf>::new(),
        "cache must stay empty"
    );
    assert_eq!(hub::cached(&corrupt, &opts), None);
    assert_eq!(hub::cached(&pinned, &opts), None);
}

#[test]
fn offline_mode_uses_only_the_cache() {
    let server = Server::start();
    server.serve(
        "/test/offline/resolve/main/w.safetensors",
        b"x".to_vec(),
        &common::sha256_hex(b"x"),
        COMMIT,
    );
    server.serve("/models/w-2d711642.pth", b"x".to_vec(), "", "");
    let dir = common::scratch_dir("hub", "offline");
    let opts = HubOptions {
        offline: true,
        ..options(&server, &dir)
    };
    let hf = Source::HuggingFace {
        repo: "test/offline",
        revision: "main",
        file: "w.safetensors",
    };
    let tv = Source::Torchvision {
        file: "w-2d711642.pth",
    };
    for source in [hf, tv] {
        let err = hub::fetch(&source, None, &opts).unwrap_err().to_string();
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
        assert!(err.contains(&source.url(&opts)), "{err}");
    }
    assert_eq!(server.requests(), 0, "offline mode must not connect");
    assert!(!opts.hf_cache.exists() && !opts.torch_cache.exists());

    // Online once, then offline finds them.
    let online = HubOptions {
        offline: false,
        ..opts.clone()
    };
    let a = hub::fetch(&hf, None, &online).unwrap();
    let b = hub::fetch(&tv, Some("2d711642"), &online).unwrap();
    assert_eq!(hub::fetch(&hf, None, &opts).unwrap(), a);
    assert_eq!(hub::fetch(&tv, Some("2d711642"), &opts).unwrap(), b);
}

#[test]
fn torchvision_file_is_verified_against_its_name_prefix() {
    let server = Server::start();
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let hash = common::sha256_hex(&body);
    let good_name = format!("tiny-{}.pth", &hash[..8]);
    server.serve(&format!("/models/{good_name}"), body.clone(), "", "");
    server.serve("/models/tiny-00000000.pth", body.clone(), "", "");
    let dir = common::scratch_dir("hub", "torchvision");
    let opts = options(&server, &dir);

    let leaked: &'static str = Box::leak(good_name.clone().into_boxed_str());
    let path = hub::fetch(
        &Source::Torchvision { file: leaked },
        Some(&hash[..8]),
        &opts,
    )
    .unwrap();
    assert_eq!(path, opts.torch_cache.join(&good_name));
    assert_eq!(std::fs::read(&path).unwrap(), body);

    let bad = Source::Torchvision {
        file: "tiny-00000000.pth",
    };
    let err = hub::fetch(&bad, Some("00000000"), &opts).unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("/models/tiny-00000000.pth"),
        "{err}"
    );
    assert_eq!(
        files_under(&opts.torch_cache),
        vec![PathBuf::from(&good_name)],
        "no partial or corrupt file left"
    );

    let missing = Source::Torchvision {
        file: "absent-12345678.pth",
    };
    let err = hub::fetch(&missing, None, &opts).unwrap_err().to_string();
    assert!(
        err.contains("absent-12345678.pth") && err.contains("404"),
        "{err}"
    );
}

#[test]
fn unreachable_servers_are_named() {
    // Bind and drop: nothing listens on this port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = common::scratch_dir("hub", "unreachable");
    let opts = HubOptions {
        hf_cache: dir.join("hf"),
        hf_endpoint: format!("http://127.0.0.1:{port}"),
        hf_token: None,
        torch_cache: dir.join("torch"),
        torchvision_url: format!("http://127.0.0.1:{port}/models"),
        offline: false,
        progress: false,
    };
    for source in [
        Source::Torchvision {
            file: "a-12345678.pth",
        },
        Source::HuggingFace {
            repo: "o/n",
            revision: "main",
            file: "m.safetensors",
        },
    ] {
        let err = hub::fetch(&source, None, &opts).unwrap_err();
        assert!(matches!(err, Error::Download { .. }), "{err}");
        assert!(err.to_string().contains(&source.url(&opts)), "{err}");
    }
    assert_eq!(files_under(&dir), Vec::<PathBuf>::new());
}

#[test]
fn options_come_from_the_standard_variables() {
    // The only test here that reads the environment; the others pass options explicitly.
    let dir = common::scratch_dir("hub", "env");
    std::fs::create_dir_all(dir.join("hfhome")).unwrap();
    std::fs::write(dir.join("hfhome/token"), "hf_secret\n").unwrap();
    let set = |k: &str, v: &str| std::env::set_var(k, v);
    set("HF_HOME", dir.join("hfhome").to_str().unwrap());
    set("HF_ENDPOINT", "http://127.0.0.1:1234");
    set("HF_HUB_OFFLINE", "1");
    set("TORCH_HOME", dir.join("torchhome").to_str().unwrap());
    set("RETINANET_TORCHVISION_URL", "http://127.0.0.1:1234/mirror/");
    std::env::remove_var("HF_HUB_CACHE");
    std::env::remove_var("HF_TOKEN");
    let o = HubOptions::from_env().unwrap();
    assert_eq!(o.hf_cache, dir.join("hfhome/hub"));
    assert_eq!(o.hf_endpoint, "http://127.0.0.1:1234");
    assert_eq!(o.hf_token.as_deref(), Some("hf_secret"));
    assert!(o.offline);
    assert_eq!(o.torch_cache, dir.join("torchhome/hub/checkpoints"));
    assert_eq!(
        Source::Torchvision { file: "a.pth" }.url(&o),
        "http://127.0.0.1:1234/mirror/a.pth"
    );
    set("HF_HUB_CACHE", dir.join("elsewhere").to_str().unwrap());
    set("HF_HUB_OFFLINE", "0");
    let o = HubOptions::from_env().unwrap();
    assert_eq!(o.hf_cache, dir.join("elsewhere"));
    assert!(!o.offline);
}
