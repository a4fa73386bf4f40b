//! Data-parallel training on the CPU ring: real `jepa-worker train`
//! processes, one per rank, on loopback.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jepa_common::spec::RunSpec;
use jepa_e2e::{bin, tiny_spec};

/// A spec whose mask index lists do not depend on how the batch is split:
/// one fixed-size target block and a context of the whole grid minus it,
/// so collation never cuts a list.
fn equivalence_spec(batch: u32, ranks: u32) -> RunSpec {
    let mut spec = tiny_spec("dp", 6);
    spec.optim.batch_size = batch;
    spec.resources.ranks = ranks;
    spec.mask.num_targets = 1;
    spec.mask.target_scale = [0.25, 0.25];
    spec.mask.target_aspect = [1.0, 1.0];
    spec.mask.context_scale = [1.0, 1.0];
    spec.mask.context_aspect = [1.0, 1.0];
    spec.schedule.checkpoint_every = 0;
    spec.validate().unwrap();
    spec
}

/// Starts one rank; rank 0 is asked for its address on stdout.
fn start_rank(
    spec_path: &Path,
    out: &Path,
    rank: usize,
    world: usize,
    master: Option<&str>,
) -> std::process::Child {
    let mut command = Command::new(bin("jepa-worker"));
    command
        .args(["train", "--json", "--threads", "1", "--collective-timeout", "20s", "--token", "t"])
        .arg("--config")
        .arg(spec_path)
        .arg("--out")
        .arg(out)
        .args(["--rank", &rank.to_string(), "--world", &world.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(master) = master {
        command.args(["--master", master]);
    }
    command.spawn().expect("start a rank")
}

/// Reads rank 0's `listening` event from its stdout.
fn listening_address(
    child: &mut std::process::Child,
) -> (String, std::io::BufReader<std::process::ChildStdout>) {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "rank 0 ended before listening");
        if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
            if event["kind"] == "listening" {
                return (event["address"].as_str().unwrap().to_string(), reader);
            }
        }
    }
}

/// Every model tensor (encoders and predictor) of a checkpoint.
fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = tensors
        .tensors()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("optim."))
        .map(|(name, view)| {
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, data)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn two_ranks_end_with_the_weights_of_one_rank_on_the_doubled_batch() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    std::fs::write(one.join("spec.toml"), equivalence_spec(8, 1).to_toml_string()).unwrap();
    std::fs::write(two.join("spec.toml"), equivalence_spec(4, 2).to_toml_string()).unwrap();

    let single = start_rank(&one.join("spec.toml"), &one, 0, 1, None).wait_with_output().unwrap();
    assert!(single.status.success(), "{}", String::from_utf8_lossy(&single.stderr));

    let mut zero = start_rank(&two.join("spec.toml"), &two, 0, 2, None);
    let (master, _stdout) = listening_address(&mut zero);
    let first = start_rank(&two.join("spec.toml"), &two.join("rank1"), 1, 2, Some(&master));
    let first = first.wait_with_output().unwrap();
    let zero = zero.wait_with_output().unwrap();
    assert!(
        zero.status.success() && first.status.success(),
        "rank 0: {}\nrank 1: {}",
        String::from_utf8_lossy(&zero.stderr),
        String::from_utf8_lossy(&first.stderr)
    );

    let a = weights(&one.join("checkpoints/step-00000006.safetensors"));
    let b = weights(&two.join("checkpoints/step-00000006.safetensors"));
    assert_eq!(a.len(), b.len());
    assert!(a.len() > 10, "model tensors: {}", a.len());
    let mut worst = 0f32;
    for ((name_a, va), (name_b, vb)) in a.iter().zip(&b) {
        assert_eq!(name_a, name_b);
        assert_eq!(va.len(), vb.len(), "{name_a}");
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    println!("largest weight difference after 6 steps: {worst:e}");
    assert!(worst < 1e-5, "2 ranks and 1 rank differ by {worst}");
    // The runs did train: the weights moved from their initial values.
    let init_moved =
        a.iter().any(|(n, v)| n.starts_with("encoder.") && v.iter().any(|x| x.abs() > 0.0));
    assert!(init_moved);
}

#[test]
fn a_killed_rank_ends_its_peer_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = equivalence_spec(4, 2);
    spec.schedule.steps = 100_000;
    std::fs::write(dir.path().join("spec.toml"), spec.to_toml_string()).unwrap();
    let spec_path = dir.path().join("spec.toml");
    let mut zero = start_rank(&spec_path, dir.path(), 0, 2, None);
    let (master, _stdout) = listening_address(&mut zero);
    let mut first = start_rank(&spec_path, &dir.path().join("rank1"), 1, 2, Some(&master));
    // Let them train together for a moment, then kill rank 1.
    std::thread::sleep(Duration::from_secs(3));
    assert!(zero.try_wait().unwrap().is_none(), "rank 0 ended early");
    first.kill().unwrap();
    first.wait().unwrap();
    let killed = Instant::now();
    let status = loop {
        if let Some(status) = zero.try_wait().unwrap() {
            break status;
        }
        assert!(killed.elapsed() < Duration::from_secs(20), "rank 0 hangs after its peer died");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "rank 0 must fail when its peer is gone");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut zero.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("collective"), "{stderr}");
}
