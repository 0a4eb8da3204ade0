//! `finetune` killed with SIGKILL at random instants (seeded), checkpointing every step and
//! resumed after each kill, ends with the same bytes as an uninterrupted run: the final model,
//! the last checkpoint and the logged losses. After every kill the checkpoint on disk, if
//! any, is complete.
//!
//! `RETINANET_KILLS` (default 6) sets the kills, `RETINANET_KILL_SEED` (default 5) their
//! instants. The figures are printed and appended to `target/kill-report.txt`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: &str = "6";

/// Three BCCD images with their VOC annotations, or `None` (and a skip) without the data.
fn bccd_subset() -> Option<PathBuf> {
    let bccd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/bccd");
    if !bccd.is_dir() {
        let why = format!("{} is missing", bccd.display());
        common::skip("kill_and_resume_gives_the_uninterrupted_bytes", &why);
        return None;
    }
    let dir = common::scratch_dir("kill", "data");
    for i in 0..3 {
        for (sub, ext) in [("JPEGImages", "jpg"), ("Annotations", "xml")] {
            let name = format!("BloodImage_0000{i}.{ext}");
            std::fs::copy(bccd.join(sub).join(&name), dir.join(&name)).unwrap();
        }
    }
    Some(dir)
}

fn spawn(data: &Path, out: &Path, resume: bool) -> Child {
    let weights = common::fixture_dir("parity", "make_parity_fixtures.py")
        .join("v1_r18_k7/model.safetensors");
    let mut cmd = Command::new(common::example_bin("finetune"));
    cmd.arg("--data").arg(data).arg("--weights").arg(weights);
    cmd.args([
        "--steps",
        STEPS,
        "--batch-size",
        "2",
        "--lr",
        "0.005",
        "--seed",
        "3",
    ]);
    cmd.args(["--min-size", "128", "--max-size", "160", "--device", "cpu"]);
    cmd.args(["--checkpoint-every", "1"]).arg("--out").arg(out);
    if resume {
        cmd.arg("--resume");
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` at most `limit`: `true` if it exited (successfully: checked).
fn wait_at_most(child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).unwrap();
            }
            assert!(status.success(), "finetune failed:\n{err}");
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// The checkpoint left after a kill is absent or complete: a readable safetensors file with
/// the optimiser state, its step within the run.
fn check_checkpoint(out: &Path) -> Option<u64> {
    let bytes = std::fs::read(out.join("last.safetensors")).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    safetensors::SafeTensors::deserialize(&bytes).expect("a complete checkpoint");
    let meta = meta.metadata().clone().unwrap();
    assert!(meta.contains_key("optimizer"), "{meta:?}");
    Some(meta["step"].parse().unwrap())
}

/// Step lines of `metrics.jsonl` without their timings.
fn losses(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|mut r| {
            let m = r.as_object_mut().unwrap();
            m.remove("images_per_s");
            m.remove("seconds");
            r
        })
        .collect()
}

/// What one interrupted run went through.
#[derive(Default)]
struct Tally {
    kills: usize,
    resumes: usize,
    /// The checkpoint's step after each kill (`None`: none yet).
    steps: Vec<Option<u64>>,
}

/// Runs in `out` until the run completes, killing each launch at a random instant within
/// the time the rest of the run would take (`full` scaled by the steps left).
fn interrupted_run(
    data: &Path,
    out: &Path,
    full: Duration,
    rng: &mut fastrand::Rng,
    tally: &mut Tally,
) {
    let total: f64 = STEPS.parse().unwrap();
    loop {
        // A run killed before writing run.json never began: start it again without --resume.
        let resume = out.join("run.json").exists();
        tally.resumes += usize::from(resume);
        let done = check_checkpoint(out).unwrap_or(0) as f64;
        let window = full.mul_f64((total - done + 1.0) / (total + 1.0));
        let mut child = spawn(data, out, resume);
        if wait_at_most(&mut child, window.mul_f64(rng.f64())) {
            return;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        tally.kills += 1;
        tally.steps.push(check_checkpoint(out));
    }
}

#[test]
fn kill_and_resume_gives_the_uninterrupted_bytes() {
    let Some(data) = bccd_subset() else {
        return;
    };
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (kills_wanted, seed) = (
        env("RETINANET_KILLS", 6) as usize,
        env("RETINANET_KILL_SEED", 5),
    );
    let straight = common::scratch_dir("kill", "straight");
    let start = Instant::now();
    assert!(wait_at_most(
        &mut spawn(&data, &straight, false),
        Duration::from_secs(600)
    ));
    let full = start.elapsed();

    // Interrupted runs, each in a fresh folder, until enough kills happened.
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut tally, mut runs) = (Tally::default(), 0);
    while tally.kills < kills_wanted {
        let killed = common::scratch_dir("kill", &format!("killed-{runs}"));
        interrupted_run(&data, &killed, full, &mut rng, &mut tally);
        runs += 1;
        for name in ["final.safetensors", "last.safetensors"] {
            let (a, b) = (straight.join(name), killed.join(name));
            assert!(
                std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
                "{} differs from {} after {} kills",
                b.display(),
                a.display(),
                tally.kills
            );
        }
        assert_eq!(losses(&straight), losses(&killed));
        // Temporaries of killed writes were cleaned on the next start.
        let stray: Vec<String> = std::fs::read_dir(&killed)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(stray.is_empty(), "left behind: {stray:?}");
    }
    let line = format!(
        "kill/resume: {} kills (SIGKILL, seed {seed}, checkpoint step after each: {:?}), {} \
         resumes, {runs} interrupted runs, final and last checkpoint bytes identical to the \
         uninterrupted run's: yes",
        tally.kills, tally.steps, tally.resumes
    );
    eprintln!("{line}");
    let report = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kill-report.txt");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(report)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
}
