//! Assembles the gRPC server: the `jepa.v1` services plus the standard
//! health and reflection services, so tools such as grpcurl work.

use std::net::SocketAddr;

use jepa_common::proto::{
    system_server::{System, SystemServer},
    GetVersionRequest, GetVersionResponse,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Answers `jepa.v1.System` calls about this process.
#[derive(Debug, Default)]
pub struct SystemService;

#[tonic::async_trait]
impl System for SystemService {
    async fn get_version(
        &self,
        _request: Request<GetVersionRequest>,
    ) -> Result<Response<GetVersionResponse>, Status> {
        Ok(Response::new(GetVersionResponse {
            version: jepa_common::VERSION.to_string(),
            api_revision: jepa_common::API_REVISION,
        }))
    }
}

/// Serves the coordinator on an already bound listener until `shutdown`
/// resolves.
///
/// # Errors
///
/// Fails when the reflection service cannot be built or the server stops
/// with a transport error.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<SystemServer<SystemService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(jepa_common::proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(SystemServer::new(SystemService))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// Binds `addr`, returning the listener and the address actually bound
/// (useful with port 0).
///
/// # Errors
///
/// Fails when the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
