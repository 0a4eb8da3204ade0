//! The README's "What happens on bad input" table, case by case, against the built
//! `detect`, `finetune` and `evaluate`: each case's exit code, message and what is left on
//! disk.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retinanet-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn shared(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(path)
}

fn have_shared(test: &str) -> bool {
    let ok = shared("").is_dir();
    if !ok {
        common::skip(test, "../shared/data is missing");
    }
    ok
}

fn r18() -> PathBuf {
    common::fixture_dir("parity", "make_parity_fixtures.py").join("v1_r18_k7/model.safetensors")
}

fn jpeg() -> PathBuf {
    shared("bccd/JPEGImages/BloodImage_00000.jpg")
}

/// `detect` on small inputs with `args`.
fn detect(args: &[&str]) -> Command {
    let mut cmd = Command::new(common::example_bin("detect"));
    cmd.arg("--weights").arg(r18());
    cmd.args(["--device", "cpu", "--min-size", "128", "--max-size", "160"]);
    cmd.args(args);
    cmd
}

fn run(mut cmd: impl std::borrow::BorrowMut<Command>) -> Output {
    cmd.borrow_mut().output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit 1 with a message holding every one of `needles`, and no panic.
fn fails_with(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

fn succeeds(out: &Output) {
    let err = stderr(out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn outputs_follow_links_reach_fifos_and_devices_and_never_replace_folders() {
    if !have_shared("outputs_follow_links") {
        return;
    }
    let img = jpeg();
    let img = img.to_str().unwrap();
    // A symlink: its target written, the link kept.
    let (target, link) = (tmp("target.json"), tmp("link.json"));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&target, &link).unwrap();
    succeeds(&run(detect(&["--json", link.to_str().unwrap(), img])));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&target).unwrap()).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    // A FIFO: the JSON goes through it and it stays a FIFO.
    let fifo = tmp("fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    succeeds(&run(detect(&["--json", fifo.to_str().unwrap(), img])));
    assert!(reader.join().unwrap().starts_with(b"["));
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    // A full device and a full standard output: exit 1 with a message.
    fails_with(
        &run(detect(&["--json", "/dev/full", img])),
        &["/dev/full", "No space"],
    );
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = run(detect(&[img]).stdout(full));
    fails_with(&out, &["standard output", "No space"]);
    // A folder is never replaced.
    let folder = tmp("folder.json");
    std::fs::create_dir_all(&folder).unwrap();
    let out = run(detect(&["--coco-results", folder.to_str().unwrap(), img]));
    fails_with(&out, &["folder.json: a folder; refusing to replace it"]);
    assert!(folder.is_dir());
}

#[test]
fn a_closed_pipe_ends_quietly() {
    if !have_shared("a_closed_pipe_ends_quietly") {
        return;
    }
    let img = jpeg();
    let img = img.to_str().unwrap();
    let mut child = detect(&[img, img, img])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    succeeds(&out);
    assert!(!stderr(&out).contains("error"), "{}", stderr(&out));
}

#[test]
fn truncated_and_corrupt_images_are_errors_naming_the_file() {
    if !have_shared("truncated_images") {
        return;
    }
    let bytes = std::fs::read(jpeg()).unwrap();
    let cut = tmp("cut.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out_dir = tmp("never-made");
    let out = run(detect(&[
        "--out",
        out_dir.to_str().unwrap(),
        cut.to_str().unwrap(),
    ]));
    fails_with(&out, &["cut.jpg", "corrupt JPEG"]);
    assert!(!out_dir.exists(), "--out made for a run that failed first");
}

#[test]
fn numbers_out_of_range_are_refused_naming_the_flag_or_file() {
    if !have_shared("numbers_out_of_range") {
        return;
    }
    let img = jpeg();
    let img = img.to_str().unwrap();
    fails_with(
        &run(detect(&["--bn-eps", "NaN", img])),
        &["--bn-eps", "NaN"],
    );
    let mut cmd = Command::new(common::example_bin("detect"));
    cmd.arg("--weights")
        .arg(r18())
        .args(["--min-size", "100000", img]);
    fails_with(&run(&mut cmd), &["--min-size 100000", "111.8 GiB"]);
    // The same value from a checkpoint's metadata, which a downloaded file controls.
    let big = tmp("big.safetensors");
    std::fs::write(
        &big,
        with_metadata(&r18(), &[("min_size", "100000"), ("max_size", "100000")]),
    )
    .unwrap();
    let mut cmd = Command::new(common::example_bin("detect"));
    cmd.arg("--weights")
        .arg(&big)
        .args(["--device", "cpu", img]);
    fails_with(
        &run(&mut cmd),
        &["big.safetensors: metadata", "100000", "GiB"],
    );
    let nan = tmp("nan.safetensors");
    std::fs::write(&nan, with_metadata(&r18(), &[("bn_eps", "NaN")])).unwrap();
    let mut cmd = Command::new(common::example_bin("detect"));
    cmd.arg("--weights")
        .arg(&nan)
        .args(["--device", "cpu", img]);
    fails_with(
        &run(&mut cmd),
        &["nan.safetensors: metadata `bn_eps`", "NaN"],
    );
    // A safetensors file named .pth loads by its content.
    let pth = tmp("really-safetensors.pth");
    std::fs::copy(r18(), &pth).unwrap();
    let mut cmd = Command::new(common::example_bin("detect"));
    cmd.arg("--weights").arg(&pth);
    cmd.args([
        "--device",
        "cpu",
        "--min-size",
        "128",
        "--max-size",
        "160",
        img,
    ]);
    succeeds(&run(&mut cmd));
}

/// The safetensors file `path` with `pairs` added to its metadata.
fn with_metadata(path: &Path, pairs: &[(&str, &str)]) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    for (k, v) in pairs {
        header["__metadata__"][*k] = (*v).into();
    }
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// `finetune` for one step on `data` (given with its extra flags).
fn finetune(data: &[&str], extra: &[&str], out: &Path) -> Output {
    let mut cmd = Command::new(common::example_bin("finetune"));
    cmd.args(data).arg("--weights").arg(r18());
    cmd.args(["--steps", "1", "--batch-size", "1", "--device", "cpu"]);
    if !extra.contains(&"--min-size") {
        cmd.args(["--min-size", "128", "--max-size", "160"]);
    }
    cmd.arg("--out").arg(out);
    run(cmd.args(extra))
}

#[test]
fn training_inputs_are_checked_before_work_starts() {
    if !have_shared("training_inputs") {
        return;
    }
    let data = tmp("voc");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..2 {
        for (sub, ext) in [("JPEGImages", "jpg"), ("Annotations", "xml")] {
            let name = format!("BloodImage_0000{i}.{ext}");
            std::fs::copy(shared(&format!("bccd/{sub}/{name}")), data.join(&name)).unwrap();
        }
    }
    let voc = ["--data", data.to_str().unwrap()];
    fails_with(&finetune(&voc, &["--lr=-1"], &tmp("o1")), &["--lr", "-1"]);
    fails_with(
        &finetune(&voc, &["--hflip", "NaN"], &tmp("o2")),
        &["--hflip"],
    );
    fails_with(
        &finetune(&voc, &["--min-size", "100000"], &tmp("o3")),
        &["--min-size 100000"],
    );

    // COCO without classes, without annotations.
    let coco = tmp("coco.json");
    let image = r#"{"id": 1, "file_name": "BloodImage_00000.jpg", "width": 640, "height": 480}"#;
    let doc = format!(r#"{{"images": [{image}], "annotations": [], "categories": []}}"#);
    std::fs::write(&coco, doc).unwrap();
    let c = ["--data", coco.to_str().unwrap()];
    let opts = ["--format", "coco"];
    fails_with(
        &finetune(&c, &opts, &tmp("o4")),
        &["coco.json", "`categories` is empty"],
    );
    let doc = format!(r#"{{"images": [{image}], "categories": [{{"id": 1, "name": "RBC"}}]}}"#);
    std::fs::write(&coco, doc).unwrap();
    fails_with(
        &finetune(&c, &opts, &tmp("o5")),
        &["coco.json", "missing field `annotations`"],
    );

    // A truncated training image: a warning naming it, skipped and counted; training goes on.
    let bytes = std::fs::read(data.join("BloodImage_00001.jpg")).unwrap();
    std::fs::write(data.join("BloodImage_00001.jpg"), &bytes[..bytes.len() / 2]).unwrap();
    let out = finetune(&voc, &[], &tmp("o6"));
    succeeds(&out);
    let err = stderr(&out);
    assert!(
        err.contains("BloodImage_00001.jpg") && err.contains("corrupt JPEG"),
        "{err}"
    );
    assert!(err.contains("1 unreadable image(s) skipped"), "{err}");
}

#[test]
fn evaluate_refuses_incomplete_ground_truth_and_ends_quietly_on_a_closed_pipe() {
    if !have_shared("evaluate_inputs") {
        return;
    }
    let dets = shared("coco-eval-fake100/dets.json");
    let gt = tmp("gt-no-annotations.json");
    std::fs::write(&gt, r#"{"images": [{"id": 1}], "categories": [{"id": 1}]}"#).unwrap();
    let evaluate = |gt: &Path| {
        let mut cmd = Command::new(common::example_bin("evaluate"));
        cmd.arg("--annotations")
            .arg(gt)
            .arg("--detections")
            .arg(&dets);
        cmd
    };
    fails_with(
        &run(&mut evaluate(&gt)),
        &["gt-no-annotations.json", "annotations"],
    );
    std::fs::write(
        &gt,
        r#"{"images": [], "annotations": [], "categories": []}"#,
    )
    .unwrap();
    fails_with(&run(&mut evaluate(&gt)), &["`categories` is empty"]);
    let mut child = evaluate(&shared("coco-eval-fake100/gt.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    succeeds(&out);
    assert!(!stderr(&out).contains("error"), "{}", stderr(&out));
}
