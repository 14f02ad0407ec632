//! The ADS gRPC service glue with small codec buffers. tonic's default codec starts every
//! stream with 8 KiB encode and decode buffers and lets the encode buffer grow to its 32 KiB
//! yield threshold, and each buffer keeps its largest size for the stream's life; with one
//! long-lived stream per proxy that dominated the agent's memory per proxy. This service is
//! the same routing as envoy-types' generated server, with 2 KiB/8 KiB buffer settings; RDS/EDS responses are also cut at 4 KiB
//! (or in 16 responses for a larger push, server.rs).

use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tonic::codec::{BufferSettings, Codec};
use tonic::codegen::{http, Body, BoxFuture, StdError};
use tonic_prost::ProstCodec;

/// Largest request a proxy may send.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

const SOTW: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Protobuf codec with small initial buffers and an early yield (bounded growth).
#[derive(Debug)]
pub struct SmallCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        SmallCodec(PhantomData)
    }
}

impl<T, U> Codec for SmallCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(2 * 1024, 8 * 1024))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(2 * 1024, 8 * 1024))
    }
}

/// The ADS service for tonic's router, over any ADS handler.
#[derive(Debug)]
pub struct AdsService<A> {
    ads: Arc<A>,
}

impl<A> Clone for AdsService<A> {
    fn clone(&self) -> Self {
        AdsService {
            ads: self.ads.clone(),
        }
    }
}

impl<A: AggregatedDiscoveryService> AdsService<A> {
    pub fn new(ads: A) -> AdsService<A> {
        AdsService { ads: Arc::new(ads) }
    }
}

impl<A> tonic::server::NamedService for AdsService<A> {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

struct Sotw<A>(Arc<A>);

impl<A: AggregatedDiscoveryService> tonic::server::StreamingService<DiscoveryRequest> for Sotw<A> {
    type Response = DiscoveryResponse;
    type ResponseStream = <A as AggregatedDiscoveryService>::StreamAggregatedResourcesStream;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, req: tonic::Request<tonic::Streaming<DiscoveryRequest>>) -> Self::Future {
        let ads = self.0.clone();
        Box::pin(async move { ads.stream_aggregated_resources(req).await })
    }
}

struct Delta<A>(Arc<A>);

impl<A: AggregatedDiscoveryService> tonic::server::StreamingService<DeltaDiscoveryRequest>
    for Delta<A>
{
    type Response = DeltaDiscoveryResponse;
    type ResponseStream = <A as AggregatedDiscoveryService>::DeltaAggregatedResourcesStream;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(
        &mut self,
        req: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Self::Future {
        let ads = self.0.clone();
        Box::pin(async move { ads.delta_aggregated_resources(req).await })
    }
}

impl<A, B> tonic::codegen::Service<http::Request<B>> for AdsService<A>
where
    A: AggregatedDiscoveryService,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ads = self.ads.clone();
        match req.uri().path() {
            SOTW => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(SmallCodec::<
                    DiscoveryResponse,
                    DiscoveryRequest,
                >::default())
                .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                Ok(grpc.streaming(Sotw(ads), req).await)
            }),
            DELTA => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(SmallCodec::<
                    DeltaDiscoveryResponse,
                    DeltaDiscoveryRequest,
                >::default())
                .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                Ok(grpc.streaming(Delta(ads), req).await)
            }),
            _ => Box::pin(async move {
                let mut resp = http::Response::new(tonic::body::Body::default());
                let headers = resp.headers_mut();
                headers.insert(
                    tonic::Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                headers.insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(resp)
            }),
        }
    }
}
