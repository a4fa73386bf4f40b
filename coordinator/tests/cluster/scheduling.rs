//! Placement through the whole service: gang placement, one run per GPU,
//! priorities with FIFO inside a priority, rendezvous, sweeps.

use jepa_common::proto;
use tonic::Code;

use crate::harness::*;

#[tokio::test]
async fn gang_runs_are_placed_all_or_nothing() {
    let mut cluster = Cluster::start().await;
    let mut a = cluster.worker("host-a", 2, 0).await;
    let mut b = cluster.worker("host-b", 2, 0).await;

    let wide = cluster.submit(&gpu_spec("one-host", 4, 1)).await.unwrap();
    assert_eq!(wide.state, S::Pending as i32);
    assert_eq!(wide.pending_reason, "needs 4 GPUs on 1 host; largest free host has 2");
    assert!(cluster.workers().await.iter().all(|w| w.allocations.is_empty()));

    let gang = cluster.submit(&gpu_spec("two-hosts", 4, 2)).await.unwrap();
    assert_eq!(gang.state, S::Scheduled as i32);
    let (sa, sb) = (a.expect_start().await, b.expect_start().await);
    let mut ranks: Vec<u32> = sa.ranks.iter().chain(&sb.ranks).map(|r| r.rank).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, vec![0, 1, 2, 3]);
    assert_eq!(sa.world_size, 4);
    assert_eq!(sa.rank0_worker_id, sb.rank0_worker_id);
    for start in [&sa, &sb] {
        let gpus: Vec<Option<u32>> = start.ranks.iter().map(|r| r.gpu_index).collect();
        assert_eq!(gpus, vec![Some(0), Some(1)]);
    }

    // Every GPU is taken: nothing else may land on one.
    let single = cluster.submit(&gpu_spec("single", 1, 1)).await.unwrap();
    assert_eq!(single.state, S::Pending as i32);
    assert_eq!(single.pending_reason, "needs 1 GPU on 1 host; largest free host has 0");
    let wide_now = cluster.run(&wide.id).await;
    assert_eq!(wide_now.pending_reason, "needs 4 GPUs on 1 host; largest free host has 0");
}

#[tokio::test]
async fn ranks_meet_through_the_rendezvous_of_their_generation() {
    let mut cluster = Cluster::start().await;
    let mut a = cluster.worker("host-a", 1, 0).await;
    let mut b = cluster.worker("host-b", 1, 0).await;
    let run = cluster.submit(&gpu_spec("meet", 2, 2)).await.unwrap();
    let sa = a.expect_start().await;
    b.expect_start().await;
    let (zero, other) = if sa.ranks[0].rank == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let rendezvous = |worker_id: &str, rank, generation, payload: &[u8]| proto::RendezvousRequest {
        worker_id: worker_id.into(),
        run_id: run.id.clone(),
        generation,
        rank,
        payload: payload.to_vec(),
    };

    let mut waiter = other.client.clone();
    let request = rendezvous(&other.id, 1, 1, b"");
    let waiting = tokio::spawn(async move { waiter.rendezvous(request).await });
    zero.client.rendezvous(rendezvous(&zero.id, 0, 1, b"nccl-id")).await.unwrap();
    let reply = waiting.await.unwrap().unwrap().into_inner();
    assert_eq!((reply.payload.as_slice(), reply.world_size), (&b"nccl-id"[..], 2));

    let stale = zero.client.rendezvous(rendezvous(&zero.id, 0, 7, b"x")).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let foreign = zero.client.rendezvous(rendezvous(&zero.id, 1, 1, b"")).await.unwrap_err();
    assert_eq!(foreign.code(), Code::FailedPrecondition);
    let silent = zero.client.rendezvous(rendezvous(&zero.id, 0, 1, b"")).await.unwrap_err();
    assert_eq!(silent.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn higher_priorities_run_first_and_equal_ones_in_submit_order() {
    let mut cluster = Cluster::start().await;
    let mut worker = cluster.worker("solo", 1, 0).await;
    let running = cluster.submit(&gpu_spec("running", 1, 1)).await.unwrap();
    worker.expect_start().await;

    let mut ids = Vec::new();
    for (name, priority) in [("low-a", 0), ("low-b", 0), ("high", 5), ("low-c", 0), ("urgent", 9)] {
        let mut spec = gpu_spec(name, 1, 1);
        spec.priority = priority;
        let run = cluster.submit(&spec).await.unwrap();
        assert_eq!(run.state, S::Pending as i32);
        ids.push((name, run.id));
    }
    let id_of = |name: &str| ids.iter().find(|(n, _)| *n == name).unwrap().1.clone();

    let mut order = Vec::new();
    let mut current = (running.id.clone(), 1);
    for _ in 0..ids.len() {
        worker.report(&current.0, current.1, S::Succeeded, false).await.unwrap();
        let start = worker.expect_start().await;
        order.push(start.run_id.clone());
        current = (start.run_id, start.attempt);
    }
    let expected: Vec<String> = ["urgent", "high", "low-a", "low-b", "low-c"].map(id_of).to_vec();
    assert_eq!(order, expected);
}

#[tokio::test]
async fn list_filters_and_pages() {
    let mut cluster = Cluster::start().await;
    for i in 0..5 {
        cluster.submit(&cpu_spec(&format!("page-{i}"))).await.unwrap();
    }
    cluster.submit(&cpu_spec("other")).await.unwrap();
    let request = |token: String| proto::ListRunsRequest {
        states: vec![S::Pending as i32],
        name_prefix: "page-".into(),
        page_size: 2,
        page_token: token,
        ..Default::default()
    };
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let reply = cluster.user.list_runs(request(token)).await.unwrap().into_inner();
        names.extend(reply.runs.into_iter().map(|r| r.name));
        if reply.next_page_token.is_empty() {
            break;
        }
        token = reply.next_page_token;
    }
    assert_eq!(names, vec!["page-4", "page-3", "page-2", "page-1", "page-0"]);
    let bad = cluster.user.list_runs(request("nonsense".into())).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn sweeps_create_one_run_per_point() {
    let mut cluster = Cluster::start().await;
    let axis = |field: &str, values: &[&str]| proto::SweepAxis {
        field: field.into(),
        values: values.iter().map(|v| v.to_string()).collect(),
    };
    let request = proto::SubmitSweepRequest {
        name: "ctx".into(),
        base: Some((&cpu_spec("base")).into()),
        axes: vec![
            axis("mask.context_scale", &["0.4:1.0", "0.65:1.0", "0.85:1.0"]),
            axis("conditioning.kind", &["none", "ec"]),
        ],
        min_gpu_memory_bytes: 0,
        max_parallel: 0,
    };
    let sweep =
        cluster.user.submit_sweep(request.clone()).await.unwrap().into_inner().sweep.unwrap();
    assert_eq!(sweep.run_ids.len(), 6);
    let got = cluster
        .user
        .get_sweep(proto::GetSweepRequest { sweep_id: sweep.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.runs[5].name, "ctx-5");
    let spec = got.runs[5].spec.clone().unwrap();
    assert_eq!(spec.mask.unwrap().context_scale.unwrap().low, 0.85);

    let mut bad = request.clone();
    bad.axes.push(axis("mask.target_scale", &["0.15:0.2", "0.1:1.5"]));
    let err = cluster.user.submit_sweep(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("mask.target_scale: "), "{}", err.message());
    assert!(err.message().contains("mask.target_scale=0.1:1.5"), "{}", err.message());
    let mut twice = request;
    twice.axes.push(axis("mask.context_scale", &["0.5:1.0"]));
    let err = cluster.user.submit_sweep(twice).await.unwrap_err();
    assert!(err.message().starts_with("axes[2].field: "), "{}", err.message());
    let listed =
        cluster.user.list_runs(proto::ListRunsRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.runs.len(), 6, "a rejected sweep must create no run");
}
