//! The Sync method served with [`proto::wire`]'s messages: `FederatorMessage` on the wire,
//! with each imported export's stored bytes shared instead of decoded and encoded again for
//! every importer. Every other method of the Federation service goes to the generated server.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use proto::federation_server::FederationServer;
use proto::wire::FederatorMessageWire;
use proto::ClusterMessage;
use tonic::codegen::{http, Body, BoxFuture, Service as TowerService, StdError};
use tonic::{Request, Response, Status, Streaming};

use super::{Service, WireStream};
use meshfed_model::validate::MAX_MESSAGE_BYTES;

const SYNC_PATH: &str = "/meshfed.federation.v1.Federation/Sync";

/// The Federation service: Sync here, the rest by the generated server.
#[derive(Clone)]
pub(super) struct FederationService {
    service: Arc<Service>,
    generated: FederationServer<Service>,
}

impl FederationService {
    pub(super) fn new(service: Service) -> Self {
        let service = Arc::new(service);
        FederationService {
            generated: FederationServer::from_arc(service.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            service,
        }
    }
}

struct SyncMethod(Arc<Service>);

impl tonic::server::StreamingService<ClusterMessage> for SyncMethod {
    type Response = FederatorMessageWire;
    type ResponseStream = WireStream;
    type Future = BoxFuture<Response<WireStream>, Status>;

    fn call(&mut self, request: Request<Streaming<ClusterMessage>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.open_sync(request).await })
    }
}

impl<B> TowerService<http::Request<B>> for FederationService
where
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != SYNC_PATH {
            return self.generated.call(req);
        }
        let method = SyncMethod(self.service.clone());
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<FederatorMessageWire, ClusterMessage>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), Some(MAX_MESSAGE_BYTES));
            Ok(grpc.streaming(method, req).await)
        })
    }
}

impl tonic::server::NamedService for FederationService {
    const NAME: &'static str = "meshfed.federation.v1.Federation";
}
