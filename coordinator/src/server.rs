//! Assembles the gRPC server: the `jepa.v1` services plus the standard
//! health and reflection services (so tools such as grpcurl work), and the
//! lease reaper that runs beside them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use jepa_common::proto::{
    system_server::{System, SystemServer},
    user_service_server::UserServiceServer,
    worker_service_server::WorkerServiceServer,
    GetVersionRequest, GetVersionResponse,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::clock::{Clock, SystemClock};
use crate::config::CoordinatorConfig;
use crate::core::Coordinator;
use crate::service::{UserApi, WorkerApi};

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

/// Opens the configured store and loads the coordinator's state from it.
///
/// # Errors
///
/// Fails when the store cannot be opened or read.
pub fn open_coordinator(
    config: &CoordinatorConfig,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Arc<Coordinator>> {
    let store = crate::store::open(config.store, &config.data_dir)
        .with_context(|| format!("failed to open store at {}", config.data_dir.display()))?;
    Coordinator::open(store, clock, config.clone())
        .with_context(|| format!("failed to load state from {}", config.data_dir.display()))
}

/// Starts the task that expires leases every `reap_interval_ms`.
pub fn spawn_reaper(coord: Arc<Coordinator>) -> JoinHandle<()> {
    let period = Duration::from_millis(coord.config().reap_interval_ms);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Err(err) = coord.expire_leases().await {
                tracing::warn!(error = %err, "lease reaper failed; retrying at the next tick");
            }
        }
    })
}

/// Serves the coordinator on an already bound listener until `shutdown`
/// resolves.
///
/// # Errors
///
/// Fails when the reflection service cannot be built or the server stops
/// with a transport error.
pub async fn serve(
    coord: Arc<Coordinator>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<SystemServer<SystemService>>().await;
    health_reporter.set_serving::<UserServiceServer<UserApi>>().await;
    health_reporter.set_serving::<WorkerServiceServer<WorkerApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(jepa_common::proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let max_message = (coord.config().checkpoint_chunk_bytes + (1 << 20)).max(4 << 20);
    let user = UserServiceServer::new(UserApi::new(Arc::clone(&coord)))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let worker = WorkerServiceServer::new(WorkerApi::new(Arc::clone(&coord)))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);

    let reaper = spawn_reaper(coord);
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(SystemServer::new(SystemService))
        .add_service(user)
        .add_service(worker)
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await;
    reaper.abort();
    served?;
    Ok(())
}

/// Accepted connections with Nagle's algorithm off: small replies must
/// not wait for the peer's delayed acknowledgement (40 ms on Linux), which
/// tonic does not arrange for a listener it did not bind itself.
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
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

/// A coordinator serving in the background, for tests and benchmarks.
#[derive(Debug)]
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The state it serves.
    pub coord: Arc<Coordinator>,
    shutdown: oneshot::Sender<()>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// The `http://` URL of the server.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server and waits for it to finish.
    ///
    /// # Errors
    ///
    /// The server's own error, if it failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        self.handle.await.context("server task panicked")?
    }
}

/// Serves `coord` on `addr` (port 0 picks a free port) in the background.
///
/// # Errors
///
/// Fails when the address cannot be bound.
pub async fn spawn(coord: Arc<Coordinator>, addr: SocketAddr) -> anyhow::Result<Running> {
    let (listener, addr) = bind(addr).await?;
    let (shutdown, signal) = oneshot::channel::<()>();
    let handle = tokio::spawn(serve(Arc::clone(&coord), listener, async {
        let _ = signal.await;
    }));
    Ok(Running { addr, coord, shutdown, handle })
}

/// Opens the coordinator of `config` on the system clock and serves it in
/// the background on `config.listen`.
///
/// # Errors
///
/// Fails when the store cannot be opened or the address bound.
pub async fn start(config: &CoordinatorConfig) -> anyhow::Result<Running> {
    let coord = open_coordinator(config, Arc::new(SystemClock))?;
    spawn(coord, config.listen).await
}
