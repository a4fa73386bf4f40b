//! `jepa.v1.UserService`: runs, sweeps, metrics, checkpoints and the list
//! of workers, for `jepactl` and any other client.

use std::sync::Arc;

use jepa_common::proto::{self, user_service_server::UserService, watch_run_response};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::BoxStream;
use crate::core::sweeps::sweep_state;
use crate::core::{is_terminal, Coordinator, WatchItem};

/// Messages a watch or download stream may buffer for a slow client.
const STREAM_BUFFER: usize = 64;

/// Serves the user API on a shared coordinator.
#[derive(Debug, Clone)]
pub struct UserApi {
    coord: Arc<Coordinator>,
}

impl UserApi {
    /// Wraps a coordinator.
    pub fn new(coord: Arc<Coordinator>) -> Self {
        UserApi { coord }
    }
}

#[tonic::async_trait]
impl UserService for UserApi {
    async fn submit_run(
        &self,
        request: Request<proto::SubmitRunRequest>,
    ) -> Result<Response<proto::SubmitRunResponse>, Status> {
        let req = request.into_inner();
        let run = self.coord.submit_run(req.spec, req.min_gpu_memory_bytes, req.request_id).await?;
        tracing::debug!(run_id = %run.id, "run submitted");
        Ok(Response::new(proto::SubmitRunResponse { run: Some(run) }))
    }

    async fn submit_sweep(
        &self,
        request: Request<proto::SubmitSweepRequest>,
    ) -> Result<Response<proto::SubmitSweepResponse>, Status> {
        let sweep = self.coord.submit_sweep(request.into_inner()).await?;
        Ok(Response::new(proto::SubmitSweepResponse { sweep: Some(sweep) }))
    }

    async fn get_sweep(
        &self,
        request: Request<proto::GetSweepRequest>,
    ) -> Result<Response<proto::GetSweepResponse>, Status> {
        let (sweep, runs) = self.coord.get_sweep(&request.into_inner().sweep_id)?;
        let (state, counts) = sweep_state(&runs);
        Ok(Response::new(proto::GetSweepResponse {
            sweep: Some(sweep),
            runs,
            state: state as i32,
            counts: Some(counts),
        }))
    }

    async fn cancel_sweep(
        &self,
        request: Request<proto::CancelSweepRequest>,
    ) -> Result<Response<proto::CancelSweepResponse>, Status> {
        let req = request.into_inner();
        let (cancelled, state) = self.coord.cancel_sweep(&req.sweep_id, &req.reason).await?;
        Ok(Response::new(proto::CancelSweepResponse { cancelled, state: state as i32 }))
    }

    async fn get_sweep_report(
        &self,
        request: Request<proto::GetSweepReportRequest>,
    ) -> Result<Response<proto::GetSweepReportResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.coord.sweep_report(&req.sweep_id, &req.metric)?))
    }

    async fn get_run(
        &self,
        request: Request<proto::GetRunRequest>,
    ) -> Result<Response<proto::GetRunResponse>, Status> {
        let (run, events) = self.coord.get_run(&request.into_inner().run_id)?;
        Ok(Response::new(proto::GetRunResponse { run: Some(run), events }))
    }

    async fn list_runs(
        &self,
        request: Request<proto::ListRunsRequest>,
    ) -> Result<Response<proto::ListRunsResponse>, Status> {
        let (runs, next_page_token) = self.coord.list_runs(&request.into_inner())?;
        Ok(Response::new(proto::ListRunsResponse { runs, next_page_token }))
    }

    type WatchRunStream = BoxStream<proto::WatchRunResponse>;

    async fn watch_run(
        &self,
        request: Request<proto::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let req = request.into_inner();
        // Subscribe before the snapshot so no change falls in between.
        let receiver = self.coord.subscribe_watch();
        let (seq, snapshot) = self.coord.run_snapshot(&req.run_id)?;
        let (sender, out) = mpsc::channel(STREAM_BUFFER);
        let coord = Arc::clone(&self.coord);
        tokio::spawn(async move {
            let watch = Watch { coord, req, seq, sender };
            watch.run(snapshot, receiver).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn cancel_run(
        &self,
        request: Request<proto::CancelRunRequest>,
    ) -> Result<Response<proto::CancelRunResponse>, Status> {
        let req = request.into_inner();
        let run = self.coord.cancel_run(&req.run_id, &req.reason).await?;
        Ok(Response::new(proto::CancelRunResponse { run: Some(run) }))
    }

    async fn get_metrics(
        &self,
        request: Request<proto::GetMetricsRequest>,
    ) -> Result<Response<proto::GetMetricsResponse>, Status> {
        let series = self.coord.get_metrics(&request.into_inner())?;
        Ok(Response::new(proto::GetMetricsResponse { series }))
    }

    async fn list_checkpoints(
        &self,
        request: Request<proto::ListCheckpointsRequest>,
    ) -> Result<Response<proto::ListCheckpointsResponse>, Status> {
        let checkpoints = self.coord.list_checkpoints(&request.into_inner().run_id)?;
        Ok(Response::new(proto::ListCheckpointsResponse { checkpoints }))
    }

    type DownloadCheckpointStream = BoxStream<proto::DownloadCheckpointResponse>;

    async fn download_checkpoint(
        &self,
        request: Request<proto::DownloadCheckpointRequest>,
    ) -> Result<Response<Self::DownloadCheckpointStream>, Status> {
        use proto::download_checkpoint_response::Part;
        let req = request.into_inner();
        let record = self.coord.checkpoint_record(&req.run_id, req.step)?;
        let (sender, out) = mpsc::channel(4);
        let coord = Arc::clone(&self.coord);
        tokio::spawn(async move {
            let info = Part::Info(record.info.clone().unwrap_or_default());
            if sender
                .send(Ok(proto::DownloadCheckpointResponse { part: Some(info) }))
                .await
                .is_err()
            {
                return;
            }
            for index in 0..record.chunks {
                let message = coord
                    .read_chunk(&record, index)
                    .map(|chunk| proto::DownloadCheckpointResponse {
                        part: Some(Part::Chunk(chunk)),
                    })
                    .map_err(Status::from);
                let failed = message.is_err();
                if sender.send(message).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn list_workers(
        &self,
        request: Request<proto::ListWorkersRequest>,
    ) -> Result<Response<proto::ListWorkersResponse>, Status> {
        let workers = self.coord.list_workers(request.into_inner().include_lost);
        Ok(Response::new(proto::ListWorkersResponse { workers }))
    }
}

/// One watch stream's task.
struct Watch {
    coord: Arc<Coordinator>,
    req: proto::WatchRunRequest,
    seq: u64,
    sender: mpsc::Sender<Result<proto::WatchRunResponse, Status>>,
}

impl Watch {
    async fn run(self, snapshot: proto::Run, mut receiver: broadcast::Receiver<Arc<WatchItem>>) {
        if !self.send_run(snapshot).await {
            return;
        }
        loop {
            let item = tokio::select! {
                item = receiver.recv() => item,
                () = self.sender.closed() => return,
            };
            let keep_going = match item {
                Ok(item) if item.run == self.seq => self.forward(&item.event).await,
                Ok(_) => true,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(run_id = %self.req.run_id, missed, "watcher fell behind; resending a snapshot");
                    match self.coord.run_snapshot(&self.req.run_id) {
                        Ok((_, run)) => self.send_run(run).await,
                        Err(err) => {
                            let _ = self.sender.send(Err(err.into())).await;
                            false
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => false,
            };
            if !keep_going {
                return;
            }
        }
    }

    /// Sends a run snapshot; returns whether the stream goes on.
    async fn send_run(&self, run: proto::Run) -> bool {
        let done = is_terminal(run.state);
        let message = proto::WatchRunResponse { event: Some(watch_run_response::Event::Run(run)) };
        self.sender.send(Ok(message)).await.is_ok() && !done
    }

    async fn forward(&self, event: &watch_run_response::Event) -> bool {
        match event {
            watch_run_response::Event::Run(run) => self.send_run(run.clone()).await,
            watch_run_response::Event::Metrics(batch) => {
                if !self.req.metrics {
                    return true;
                }
                let points: Vec<proto::MetricPoint> = batch
                    .points
                    .iter()
                    .filter(|p| self.req.series.is_empty() || self.req.series.contains(&p.series))
                    .cloned()
                    .collect();
                if points.is_empty() {
                    return true;
                }
                let batch = proto::MetricBatch { run_id: batch.run_id.clone(), points };
                let message = proto::WatchRunResponse {
                    event: Some(watch_run_response::Event::Metrics(batch)),
                };
                self.sender.send(Ok(message)).await.is_ok()
            }
        }
    }
}
