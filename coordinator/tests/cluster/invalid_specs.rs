//! Malformed specs, one per row, each refused with INVALID_ARGUMENT and a
//! message that starts with the offending field's dotted path; none is
//! stored.

use jepa_common::proto;
use jepa_common::spec::RunSpec;
use tonic::Code;

use crate::harness::*;

type Mutation = Box<dyn Fn(&mut proto::RunSpec)>;

fn range(low: f64, high: f64) -> Option<proto::Range> {
    Some(proto::Range { low, high })
}

fn cases() -> Vec<(&'static str, Mutation)> {
    vec![
        ("version", Box::new(|s| s.version = 2)),
        ("name", Box::new(|s| s.name = "has space".into())),
        ("name", Box::new(|s| s.name = String::new())),
        ("max_restarts", Box::new(|s| s.max_restarts = 1000)),
        ("model", Box::new(|s| s.model = None)),
        ("model.preset", Box::new(|s| s.model.as_mut().unwrap().preset = "gigantic".into())),
        ("model.patch_size", Box::new(|s| s.model.as_mut().unwrap().patch_size = 5)),
        ("model.in_channels", Box::new(|s| s.model.as_mut().unwrap().in_channels = 2)),
        ("model.embed_dim", Box::new(|s| s.model.as_mut().unwrap().embed_dim = 90)),
        ("model.depth", Box::new(|s| s.model.as_mut().unwrap().depth = 0)),
        ("mask.mode", Box::new(|s| s.mask.as_mut().unwrap().mode = 0)),
        (
            "mask.context_scale",
            Box::new(|s| s.mask.as_mut().unwrap().context_scale = range(0.9, 0.4)),
        ),
        ("mask.context_scale", Box::new(|s| s.mask.as_mut().unwrap().context_scale = None)),
        (
            "mask.target_scale",
            Box::new(|s| s.mask.as_mut().unwrap().target_scale = range(0.1, 1.5)),
        ),
        ("mask.num_targets", Box::new(|s| s.mask.as_mut().unwrap().num_targets = 0)),
        ("mask.min_keep", Box::new(|s| s.mask.as_mut().unwrap().min_keep = 100)),
        ("conditioning.kind", Box::new(|s| s.conditioning.as_mut().unwrap().kind = 0)),
        ("conditioning.token", Box::new(|s| s.conditioning.as_mut().unwrap().token = 99)),
        ("conditioning.kernel", Box::new(|s| s.conditioning.as_mut().unwrap().kernel = 0)),
        ("optim", Box::new(|s| s.optim = None)),
        ("optim.lr", Box::new(|s| s.optim.as_mut().unwrap().lr = f64::NAN)),
        ("optim.ema", Box::new(|s| s.optim.as_mut().unwrap().ema = range(1.0, 0.99))),
        ("optim.batch_size", Box::new(|s| s.optim.as_mut().unwrap().batch_size = 0)),
        ("optim.warmup_steps", Box::new(|s| s.optim.as_mut().unwrap().warmup_steps = 1_000_000)),
        ("data.dataset", Box::new(|s| s.data.as_mut().unwrap().dataset = 0)),
        (
            "data.path",
            Box::new(|s| {
                let data = s.data.as_mut().unwrap();
                data.dataset = proto::DatasetKind::ImageFolder as i32;
                data.path = None;
            }),
        ),
        ("data.crop_scale", Box::new(|s| s.data.as_mut().unwrap().crop_scale = range(0.0, 1.0))),
        (
            "schedule.steps",
            Box::new(|s| {
                s.schedule.as_mut().unwrap().steps = 0;
                s.optim.as_mut().unwrap().warmup_steps = 0;
            }),
        ),
        ("eval.probe_lr", Box::new(|s| s.eval.as_mut().unwrap().probe_lr = 0.0)),
        ("resources.device", Box::new(|s| s.resources.as_mut().unwrap().device = "tpu".into())),
        ("resources.gpus", Box::new(|s| s.resources.as_mut().unwrap().device = "cuda".into())),
        (
            "resources.hosts",
            Box::new(|s| {
                let r = s.resources.as_mut().unwrap();
                (r.ranks, r.hosts) = (3, 2);
            }),
        ),
    ]
}

#[tokio::test]
async fn malformed_specs_are_refused_with_the_field_named() {
    let mut cluster = Cluster::start().await;
    let cases = cases();
    assert!(cases.len() >= 20);
    for (field, mutate) in &cases {
        let mut spec = proto::RunSpec::from(&RunSpec::default());
        mutate(&mut spec);
        let request = proto::SubmitRunRequest { spec: Some(spec), ..Default::default() };
        let err = cluster.user.submit_run(request).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {}", err.message());
        let prefix = format!("{field}: ");
        assert!(err.message().starts_with(&prefix), "expected {prefix:?}, got {:?}", err.message());
    }

    let request = proto::SubmitRunRequest { spec: None, ..Default::default() };
    let err = cluster.user.submit_run(request).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "spec: is missing"));
    let too_long = proto::SubmitRunRequest {
        spec: Some((&RunSpec::default()).into()),
        request_id: "x".repeat(200),
        ..Default::default()
    };
    let err = cluster.user.submit_run(too_long).await.unwrap_err();
    assert!(err.message().starts_with("request_id: "), "{}", err.message());

    let listed = cluster.user.list_runs(proto::ListRunsRequest::default()).await.unwrap();
    assert!(listed.into_inner().runs.is_empty(), "a refused spec must store nothing");
}

#[tokio::test]
async fn ranges_in_messages_tell_what_is_allowed() {
    let mut cluster = Cluster::start().await;
    let mut spec = proto::RunSpec::from(&RunSpec::default());
    spec.mask.as_mut().unwrap().context_scale = range(0.0, 1.0);
    let request = proto::SubmitRunRequest { spec: Some(spec), ..Default::default() };
    let err = cluster.user.submit_run(request).await.unwrap_err();
    assert!(err.message().contains("(0, 1]"), "{}", err.message());
}

#[tokio::test]
async fn a_retried_submit_with_the_same_request_id_creates_one_run() {
    let mut cluster = Cluster::start().await;
    let request = proto::SubmitRunRequest {
        spec: Some((&cpu_spec("once")).into()),
        request_id: "client-42".into(),
        ..Default::default()
    };
    let first = cluster.user.submit_run(request.clone()).await.unwrap().into_inner().run.unwrap();
    let second = cluster.user.submit_run(request).await.unwrap().into_inner().run.unwrap();
    assert_eq!(first.id, second.id);
    let listed = cluster.user.list_runs(proto::ListRunsRequest::default()).await.unwrap();
    assert_eq!(listed.into_inner().runs.len(), 1);
}
