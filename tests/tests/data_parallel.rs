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

/// The committed checkpoint of a run at `step`, downloaded through the API.
async fn download(
    user: &mut jepa_common::proto::user_service_client::UserServiceClient<
        tonic::transport::Channel,
    >,
    run_id: &str,
    step: u64,
    to: &Path,
) {
    use jepa_common::proto::{self, download_checkpoint_response::Part};
    let request = proto::DownloadCheckpointRequest { run_id: run_id.into(), step: Some(step) };
    let mut stream = user.download_checkpoint(request).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        if let Some(Part::Chunk(chunk)) = message.part {
            bytes.extend_from_slice(&chunk);
        }
    }
    std::fs::write(to, bytes).unwrap();
}

fn largest_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for ((name_a, va), (name_b, vb)) in a.iter().zip(&b) {
        assert_eq!((name_a, va.len()), (name_b, vb.len()));
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_train_a_two_rank_run_like_one_rank_on_the_doubled_batch() {
    use jepa_common::proto::RunState;
    use jepa_e2e::{is, start_worker, submit, wait_run, Coordinator, DEADLINE};
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&dir.path().join("coord"), "30s");
    let _a = start_worker(&coord.url, "a", &dir.path().join("a"), &[]);
    let _b = start_worker(&coord.url, "b", &dir.path().join("b"), &[]);
    let mut user = coord.user().await;

    let mut two = equivalence_spec(4, 2);
    two.resources.hosts = 2;
    let two_id = submit(&mut user, &two).await;
    let one_id = submit(&mut user, &equivalence_spec(8, 1)).await;
    for id in [&two_id, &one_id] {
        let run = wait_run(&mut user, id, DEADLINE, |r| {
            is(r, RunState::Succeeded) || is(r, RunState::Failed)
        })
        .await;
        assert!(is(&run, RunState::Succeeded), "{id} failed: {}", run.message);
    }
    let run = jepa_e2e::get_run(&mut user, &two_id).await;
    let placed: Vec<&str> =
        run.attempts[0].placements.iter().map(|p| p.worker_id.as_str()).collect();
    assert_eq!(placed.len(), 2, "one rank on each worker: {placed:?}");

    let (a, b) = (dir.path().join("one.safetensors"), dir.path().join("two.safetensors"));
    download(&mut user, &one_id, 6, &a).await;
    download(&mut user, &two_id, 6, &b).await;
    let worst = largest_difference(&a, &b);
    println!("largest weight difference, daemons: {worst:e}");
    assert!(worst < 1e-5, "2 ranks and 1 rank differ by {worst}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rank_ends_the_attempt_and_the_run_restarts_from_its_checkpoint() {
    use jepa_common::proto::RunState;
    use jepa_e2e::{
        is, processes_mentioning, series, start_worker, submit, wait_run, Coordinator, DEADLINE,
    };
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&dir.path().join("coord"), "30s");
    let slow = [("JEPA_FAULT_SLOW_STEP_MS", "100")];
    let _a = start_worker(&coord.url, "a", &dir.path().join("a"), &slow);
    let _b = start_worker(&coord.url, "b", &dir.path().join("b"), &slow);
    let mut user = coord.user().await;

    let mut spec = equivalence_spec(4, 2);
    spec.resources.hosts = 2;
    spec.schedule.steps = 60;
    spec.schedule.checkpoint_every = 5;
    spec.max_restarts = 1;
    let id = submit(&mut user, &spec).await;
    wait_run(&mut user, &id, DEADLINE, |r| r.last_checkpoint_step.unwrap_or(0) >= 10).await;
    let marker = format!("{}", dir.path().display());
    let rank1: Vec<u32> = processes_mentioning(&marker)
        .into_iter()
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.iter().any(|a| a == "train")
                && args.windows(2).any(|w| w[0] == "--rank" && w[1] == "1")
        })
        .collect();
    assert_eq!(rank1.len(), 1, "one rank-1 trainer: {rank1:?}");
    let killed = Instant::now();
    Command::new("kill").args(["-9", &rank1[0].to_string()]).status().unwrap();

    let run = wait_run(&mut user, &id, DEADLINE, |r| r.attempts.len() >= 2).await;
    let ended = killed.elapsed();
    assert!(ended < Duration::from_secs(20), "the attempt ended after {ended:?}");
    assert!(run.attempts[0].end_reason.contains("rank 1"), "{}", run.attempts[0].end_reason);
    let run = wait_run(&mut user, &id, DEADLINE, |r| {
        is(r, RunState::Succeeded) || is(r, RunState::Failed)
    })
    .await;
    assert!(is(&run, RunState::Succeeded), "{}", run.message);
    assert_eq!(run.restarts, 1);
    let resumed = run.attempts[1].resume_step.expect("the second attempt resumed");
    assert!(resumed >= 10 && resumed % 5 == 0, "resumed at {resumed}");
    let loss = series(&mut user, &id, jepa_common::series::LOSS).await;
    assert_eq!(loss.iter().map(|p| p.step).collect::<Vec<_>>(), (1..=60).collect::<Vec<_>>());
}
