//! `jepa.v1.WorkerService`: what worker daemons call to join, keep their
//! lease, receive assignments, report, upload checkpoints and meet their
//! peers.

use std::sync::Arc;

use jepa_common::proto::{
    self, upload_checkpoint_request::Part, worker_service_server::WorkerService,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::BoxStream;
use crate::core::Coordinator;
use crate::error::CoordError;

/// Serves the worker API on a shared coordinator.
#[derive(Debug, Clone)]
pub struct WorkerApi {
    coord: Arc<Coordinator>,
}

impl WorkerApi {
    /// Wraps a coordinator.
    pub fn new(coord: Arc<Coordinator>) -> Self {
        WorkerApi { coord }
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        Ok(Response::new(self.coord.register_worker(request.into_inner()).await?))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let reply = self.coord.heartbeat(&req.worker_id, &req.running).await?;
        Ok(Response::new(proto::HeartbeatResponse {
            lease_expires_ms: reply.lease_expires_ms,
            assignments: reply.assignments,
            stop: reply.stop,
        }))
    }

    type StreamAssignmentsStream = BoxStream<proto::AssignmentEvent>;

    async fn stream_assignments(
        &self,
        request: Request<proto::StreamAssignmentsRequest>,
    ) -> Result<Response<Self::StreamAssignmentsStream>, Status> {
        let receiver = self.coord.subscribe_assignments(&request.into_inner().worker_id)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn report_run_state(
        &self,
        request: Request<proto::ReportRunStateRequest>,
    ) -> Result<Response<proto::ReportRunStateResponse>, Status> {
        Ok(Response::new(self.coord.report_state(&request.into_inner()).await?))
    }

    async fn report_metrics(
        &self,
        request: Request<proto::ReportMetricsRequest>,
    ) -> Result<Response<proto::ReportMetricsResponse>, Status> {
        let counts = self.coord.report_metrics(request.into_inner()).await?;
        Ok(Response::new(proto::ReportMetricsResponse {
            accepted: counts.accepted,
            duplicates: counts.duplicates,
        }))
    }

    async fn upload_checkpoint(
        &self,
        request: Request<Streaming<proto::UploadCheckpointRequest>>,
    ) -> Result<Response<proto::UploadCheckpointResponse>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(proto::UploadCheckpointRequest { part: Some(Part::Header(header)) }) => header,
            _ => {
                return Err(
                    CoordError::invalid("header", "the first message must be the header").into()
                )
            }
        };
        let mut upload = self.coord.begin_upload(header)?;
        loop {
            let message = match stream.message().await {
                Ok(message) => message,
                Err(status) => {
                    self.coord.abort_upload(&upload);
                    return Err(status);
                }
            };
            let written = match message {
                None => break,
                Some(proto::UploadCheckpointRequest { part: Some(Part::Chunk(chunk)) }) => {
                    self.coord.upload_chunk(&mut upload, &chunk)
                }
                Some(_) => {
                    Err(CoordError::invalid("chunk", "only the first message may be a header"))
                }
            };
            if let Err(err) = written {
                self.coord.abort_upload(&upload);
                return Err(err.into());
            }
        }
        let checkpoint = self.coord.commit_upload(upload).await?;
        Ok(Response::new(proto::UploadCheckpointResponse { checkpoint: Some(checkpoint) }))
    }

    async fn rendezvous(
        &self,
        request: Request<proto::RendezvousRequest>,
    ) -> Result<Response<proto::RendezvousResponse>, Status> {
        Ok(Response::new(self.coord.rendezvous(request.into_inner()).await?))
    }
}
