//! The standard services beside the API: health, reflection and version,
//! so tools such as grpcurl work without the proto files.

use jepa_common::proto::{self, system_client::SystemClient};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

use crate::harness::*;

#[tokio::test]
async fn health_reflection_and_version_answer() {
    let cluster = Cluster::start().await;
    let mut health = HealthClient::new(cluster.channel.clone());
    for service in ["jepa.v1.System", "jepa.v1.UserService", "jepa.v1.WorkerService"] {
        let request = HealthCheckRequest { service: service.into() };
        let status = health.check(request).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }

    let mut reflection = ServerReflectionClient::new(cluster.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("reflection did not list services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["jepa.v1.UserService", "jepa.v1.WorkerService", "jepa.v1.System"] {
        assert!(names.iter().any(|n| n == service), "{service} missing from {names:?}");
    }

    let mut system = SystemClient::new(cluster.channel.clone());
    let version = system.get_version(proto::GetVersionRequest {}).await.unwrap().into_inner();
    assert_eq!(version.api_revision, jepa_common::API_REVISION);
}
