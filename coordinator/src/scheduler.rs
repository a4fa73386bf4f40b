//! Placement of one attempt on the free resources of the live workers: pure
//! functions, no locks and no I/O, so they are tested and benchmarked
//! alone.
//!
//! The resource model: a worker offers GPUs (each with its memory) and CPU
//! slots. A GPU rank holds one whole GPU, so a GPU never serves two runs; a
//! CPU rank holds one slot. A run asks for `ranks_per_host` ranks on each of
//! `hosts` distinct workers and gets all of them or nothing (gang
//! placement). Among the workers that fit, the fullest ones are chosen
//! first (best fit), keeping large holes free for large runs.

use jepa_common::proto::ResourceRequest;

/// What one live worker has free right now.
#[derive(Clone, Debug, PartialEq)]
pub struct Capacity {
    /// The worker's sequence number.
    pub worker: u64,
    /// Free GPUs as (local index, memory in bytes), ascending by index.
    pub free_gpus: Vec<(u32, u64)>,
    /// Free CPU slots.
    pub free_cpu_slots: u32,
}

/// The ranks of an attempt placed on one worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPlan {
    /// Position of the worker in the capacity list given to [`place`].
    pub slot: usize,
    /// The worker's sequence number.
    pub worker: u64,
    /// Global ranks, ascending.
    pub ranks: Vec<u32>,
    /// Local GPU index for each rank; empty on CPU.
    pub gpu_indices: Vec<u32>,
    /// CPU slots held; 0 on GPU.
    pub cpu_slots: u32,
}

/// How many ranks of `req` the capacity `cap` can take.
fn usable(req: &ResourceRequest, cap: &Capacity) -> u32 {
    if req.gpu {
        let fit = cap.free_gpus.iter().filter(|(_, mem)| *mem >= req.min_gpu_memory_bytes);
        u32::try_from(fit.count()).unwrap_or(u32::MAX)
    } else {
        cap.free_cpu_slots
    }
}

/// Places one attempt, all ranks or none.
///
/// # Errors
///
/// Returns the pending reason, in words, when the request does not fit,
/// e.g. "needs 4 GPUs on 1 host; largest free host has 2".
pub fn place(req: &ResourceRequest, caps: &[Capacity]) -> Result<Vec<HostPlan>, String> {
    let per_host = req.ranks_per_host.max(1);
    let hosts = usize::try_from(req.hosts.max(1)).unwrap_or(usize::MAX);
    if caps.is_empty() {
        return Err("no live workers".to_string());
    }

    let mut fits: Vec<(u32, u64, usize)> = Vec::new();
    let mut largest = 0;
    for (slot, cap) in caps.iter().enumerate() {
        let n = usable(req, cap);
        largest = largest.max(n);
        if n >= per_host {
            fits.push((n, cap.worker, slot));
        }
    }
    if fits.len() < hosts {
        return Err(reason(req, per_host, largest, fits.len()));
    }
    if hosts == 1 {
        let best = fits.iter().min().copied().into_iter().collect::<Vec<_>>();
        fits = best;
    } else {
        fits.sort_unstable();
        fits.truncate(hosts);
    }

    let plans = fits
        .iter()
        .enumerate()
        .map(|(host, &(_, worker, slot))| {
            let first = u32::try_from(host).unwrap_or(u32::MAX) * per_host;
            let ranks: Vec<u32> = (first..first + per_host).collect();
            let gpu_indices = if req.gpu {
                caps[slot]
                    .free_gpus
                    .iter()
                    .filter(|(_, mem)| *mem >= req.min_gpu_memory_bytes)
                    .take(ranks.len())
                    .map(|(index, _)| *index)
                    .collect()
            } else {
                Vec::new()
            };
            let cpu_slots = if req.gpu { 0 } else { per_host };
            HostPlan { slot, worker, ranks, gpu_indices, cpu_slots }
        })
        .collect();
    Ok(plans)
}

/// Removes what `plans` hold from `caps`, so later placements in the same
/// pass see the rest.
pub fn consume(caps: &mut [Capacity], plans: &[HostPlan]) {
    for plan in plans {
        let Some(cap) = caps.get_mut(plan.slot) else { continue };
        cap.free_gpus.retain(|(index, _)| !plan.gpu_indices.contains(index));
        cap.free_cpu_slots = cap.free_cpu_slots.saturating_sub(plan.cpu_slots);
    }
}

fn reason(req: &ResourceRequest, per_host: u32, largest: u32, fitting: usize) -> String {
    let unit = match (req.gpu, per_host) {
        (true, 1) => "GPU",
        (true, _) => "GPUs",
        (false, 1) => "CPU slot",
        (false, _) => "CPU slots",
    };
    let memory = if req.gpu && req.min_gpu_memory_bytes > 0 {
        format!(" of at least {} MiB", req.min_gpu_memory_bytes >> 20)
    } else {
        String::new()
    };
    if req.hosts <= 1 {
        format!("needs {per_host} {unit}{memory} on 1 host; largest free host has {largest}")
    } else {
        format!(
            "needs {per_host} {unit}{memory} on each of {} hosts; {fitting} host(s) have that \
             many free",
            req.hosts
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn gpu_req(ranks: u32, hosts: u32) -> ResourceRequest {
        ResourceRequest {
            gpu: true,
            ranks,
            hosts,
            ranks_per_host: ranks / hosts,
            min_gpu_memory_bytes: 0,
        }
    }

    fn gpus(worker: u64, n: u32) -> Capacity {
        Capacity { worker, free_gpus: (0..n).map(|i| (i, 80 * GIB)).collect(), free_cpu_slots: 8 }
    }

    #[test]
    fn single_host_run_goes_to_the_fullest_worker_that_fits() {
        let caps = vec![gpus(1, 8), gpus(2, 2), gpus(3, 4)];
        let plans = place(&gpu_req(2, 1), &caps).unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].worker, 2);
        assert_eq!(plans[0].gpu_indices, vec![0, 1]);
        assert_eq!(plans[0].ranks, vec![0, 1]);
    }

    #[test]
    fn too_big_a_run_is_pending_with_a_reason() {
        let caps = vec![gpus(1, 2), gpus(2, 1)];
        let err = place(&gpu_req(4, 1), &caps).unwrap_err();
        assert_eq!(err, "needs 4 GPUs on 1 host; largest free host has 2");
        assert_eq!(place(&gpu_req(4, 1), &[]).unwrap_err(), "no live workers");
    }

    #[test]
    fn multi_host_runs_are_placed_all_or_nothing() {
        let caps = vec![gpus(1, 2), gpus(2, 1), gpus(3, 2)];
        let plans = place(&gpu_req(4, 2), &caps).unwrap();
        let workers: Vec<u64> = plans.iter().map(|p| p.worker).collect();
        assert_eq!(workers, vec![1, 3]);
        assert_eq!(plans[1].ranks, vec![2, 3]);

        let err = place(&gpu_req(6, 3), &caps).unwrap_err();
        assert_eq!(err, "needs 2 GPUs on each of 3 hosts; 2 host(s) have that many free");
    }

    #[test]
    fn gpu_memory_filters_devices() {
        let mut cap = gpus(1, 2);
        cap.free_gpus[0].1 = 16 * GIB;
        let req = ResourceRequest { min_gpu_memory_bytes: 40 * GIB, ..gpu_req(1, 1) };
        assert_eq!(place(&req, &[cap.clone()]).unwrap()[0].gpu_indices, vec![1]);
        let req = ResourceRequest { min_gpu_memory_bytes: 40 * GIB, ..gpu_req(2, 1) };
        let err = place(&req, &[cap]).unwrap_err();
        assert!(err.contains("of at least 40960 MiB"), "{err}");
    }

    #[test]
    fn consumed_gpus_are_never_handed_out_twice() {
        let mut caps = vec![gpus(1, 2)];
        let first = place(&gpu_req(1, 1), &caps).unwrap();
        consume(&mut caps, &first);
        let second = place(&gpu_req(1, 1), &caps).unwrap();
        assert_ne!(first[0].gpu_indices, second[0].gpu_indices);
        consume(&mut caps, &second);
        assert!(place(&gpu_req(1, 1), &caps).is_err());
    }

    #[test]
    fn cpu_runs_use_slots() {
        let req = ResourceRequest {
            gpu: false,
            ranks: 3,
            hosts: 1,
            ranks_per_host: 3,
            ..Default::default()
        };
        let mut caps = vec![Capacity { worker: 1, free_gpus: vec![], free_cpu_slots: 4 }];
        let plans = place(&req, &caps).unwrap();
        assert_eq!(plans[0].cpu_slots, 3);
        assert!(plans[0].gpu_indices.is_empty());
        consume(&mut caps, &plans);
        let err = place(&req, &caps).unwrap_err();
        assert_eq!(err, "needs 3 CPU slots on 1 host; largest free host has 1");
    }
}
