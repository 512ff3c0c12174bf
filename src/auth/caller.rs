//! The caller of a request, as each transport presents its credentials:
//! gRPC metadata or HTTP headers, or the TLS connection's client
//! certificate.

use std::sync::Arc;

use super::{Auth, AuthError, principal::Principal};

impl Auth {
    /// The caller of a gRPC request: its `authorization` metadata, or the
    /// client certificate of its TLS connection.
    pub async fn authenticate_grpc<T>(
        &self,
        req: &tonic::Request<T>,
    ) -> Result<Arc<Principal>, AuthError> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let certs = req.peer_certs();
        let cert = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
        self.authenticate(header, cert).await
    }
}

/// The authenticated caller of an HTTP request, as an axum extractor: from
/// `Authorization: Bearer`, or the connection's client certificate. Put it
/// before the body extractor, so that no body is read for a stranger.
pub struct Caller(pub Arc<Principal>);

impl<S> axum::extract::FromRequestParts<S> for Caller
where
    Auth: axum::extract::FromRef<S>,
    S: Send + Sync,
{
    /// Answered as [`crate::status::http`] says.
    type Rejection = AuthError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        use axum::extract::FromRef;
        let auth = Auth::from_ref(state);
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let cert = parts.extensions.get::<crate::tls::ClientCert>().cloned();
        auth.authenticate(header, cert.as_ref().map(|c| c.0.as_slice()))
            .await
            .map(Caller)
    }
}
