//! Trainer behaviour on a tiny model and synthetic data: exact resume, and
//! refusal of damaged or foreign checkpoints.

use std::sync::atomic::AtomicBool;

use jepa_common::spec::{DatasetKind, RunSpec};
use jepa_worker::collective::SingleRank;
use jepa_worker::train::metrics::{Collect, Event};
use jepa_worker::train::{checkpoint, TrainOptions, Trainer};
use tch::Device;

/// Weight initialisation draws from libtorch's process-wide generator, so
/// tests that build trainers must not run side by side.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tiny_spec() -> RunSpec {
    let mut spec = RunSpec { name: "tiny".into(), seed: 11, ..Default::default() };
    spec.model.image_size = 16;
    spec.model.patch_size = 2;
    (spec.model.embed_dim, spec.model.depth, spec.model.num_heads) = (32, 2, 2);
    (spec.model.pred_depth, spec.model.pred_dim) = (1, 32);
    spec.data.dataset = DatasetKind::Synthetic;
    spec.data.num_workers = 1;
    spec.optim.batch_size = 8;
    spec.optim.warmup_steps = 2;
    spec.schedule.steps = 6;
    spec.schedule.log_every = 1;
    spec.schedule.checkpoint_every = 3;
    spec.schedule.rankme_every = 0;
    spec.eval.enabled = false;
    spec.validate().unwrap();
    spec
}

fn options(dir: &std::path::Path, resume: Option<std::path::PathBuf>) -> TrainOptions {
    TrainOptions {
        device: Device::Cpu,
        out_dir: dir.to_path_buf(),
        resume,
        keep_checkpoints: 10,
        crash_at_step: None,
        strict_resume: true,
    }
}

fn losses(events: &[Event]) -> Vec<(u64, f64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Step { step, loss, .. } => Some((*step, *loss)),
            _ => None,
        })
        .collect()
}

#[test]
fn interrupted_and_resumed_run_matches_an_uninterrupted_one() {
    let _serial = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let spec = tiny_spec();
    let straight_dir = tempfile::tempdir().unwrap();
    let mut straight = Collect::default();
    Trainer::new(spec.clone(), options(straight_dir.path(), None), Box::new(SingleRank))
        .unwrap()
        .run(&mut straight, &AtomicBool::new(false))
        .unwrap();
    let saved: Vec<u64> = straight
        .0
        .iter()
        .filter_map(|e| match e {
            Event::Checkpoint { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(saved, vec![3, 6], "periodic and final checkpoints");
    let straight = losses(&straight.0);
    assert_eq!(straight.len(), 6);

    // Three steps by hand, then a stop request: the run checkpoints and ends.
    let split_dir = tempfile::tempdir().unwrap();
    let mut first =
        Trainer::new(spec.clone(), options(split_dir.path(), None), Box::new(SingleRank)).unwrap();
    let early: Vec<f64> = (0..3).map(|_| first.train_step().unwrap()).collect();
    let summary = first.run(&mut Collect::default(), &AtomicBool::new(true)).unwrap();
    assert!(summary.interrupted);
    assert_eq!(summary.step, 3);
    let record = summary.checkpoint.expect("a stop writes a checkpoint");

    let mut resumed_events = Collect::default();
    let mut resumed =
        Trainer::new(spec, options(split_dir.path(), Some(record)), Box::new(SingleRank)).unwrap();
    assert_eq!(resumed.step(), 3);
    resumed.run(&mut resumed_events, &AtomicBool::new(false)).unwrap();
    let late = losses(&resumed_events.0);

    let joined: Vec<f64> = early.into_iter().chain(late.iter().map(|l| l.1)).collect();
    assert_eq!(late.iter().map(|l| l.0).collect::<Vec<_>>(), vec![4, 5, 6]);
    for (i, (a, b)) in joined.iter().zip(straight.iter().map(|l| l.1)).enumerate() {
        assert!((a - b).abs() <= 1e-6, "step {}: resumed {a} vs straight {b}", i + 1);
    }
}

#[test]
fn resume_refuses_a_corrupt_or_foreign_checkpoint() {
    let _serial = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let spec = tiny_spec();
    let dir = tempfile::tempdir().unwrap();
    let mut trainer =
        Trainer::new(spec.clone(), options(dir.path(), None), Box::new(SingleRank)).unwrap();
    trainer.train_step().unwrap();
    let record = trainer.run(&mut Collect::default(), &AtomicBool::new(true)).unwrap().checkpoint;
    let record = record.unwrap();

    let mut other = spec.clone();
    other.mask.context_scale = [0.4, 1.0];
    let err = Trainer::new(other, options(dir.path(), Some(record.clone())), Box::new(SingleRank))
        .unwrap_err();
    assert!(err.to_string().contains("another run spec"), "{err:#}");

    let weights = checkpoint::paths(dir.path().join("checkpoints").as_path(), 1).0;
    let mut bytes = std::fs::read(&weights).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&weights, bytes).unwrap();
    let err =
        Trainer::new(spec, options(dir.path(), Some(record)), Box::new(SingleRank)).unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err:#}");
}
