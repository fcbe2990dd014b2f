//! Every error the server returns, in the shape of the API the client speaks: OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` or Ollama's `{"error": "..."}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Which API's error shape to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Ollama,
}

impl Api {
    /// Ollama's routes live under `/api/`, everything else answers like OpenAI.
    pub fn for_path(path: &str) -> Self {
        if path.starts_with("/api/") {
            Api::Ollama
        } else {
            Api::OpenAi
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    BadRequest,
    Unauthorized,
    NotFound,
    TooLarge,
    /// The queue is full: try again later.
    Busy,
    Unavailable,
    Internal,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub api: Api,
    pub kind: Kind,
    pub message: String,
    /// The request field at fault (OpenAI's `param`).
    pub param: Option<String>,
}

/// Seconds a client should wait after a 503 for a full queue.
pub const RETRY_AFTER_SECS: u32 = 1;

impl ApiError {
    pub fn new(api: Api, kind: Kind, message: impl Into<String>) -> Self {
        Self {
            api,
            kind,
            message: message.into(),
            param: None,
        }
    }

    pub fn bad(api: Api, message: impl Into<String>) -> Self {
        Self::new(api, Kind::BadRequest, message)
    }

    pub fn param(api: Api, param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::bad(api, message)
        }
    }

    pub fn status(&self) -> StatusCode {
        match self.kind {
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::Unauthorized => StatusCode::UNAUTHORIZED,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::Busy | Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The body alone (also sent inside a stream that fails after it started).
    pub fn body(&self) -> serde_json::Value {
        match self.api {
            Api::Ollama => json!({ "error": self.message }),
            Api::OpenAi => {
                let (ty, code) = match self.kind {
                    Kind::BadRequest => ("invalid_request_error", None),
                    Kind::Unauthorized => ("authentication_error", Some("invalid_api_key")),
                    Kind::NotFound => ("invalid_request_error", Some("model_not_found")),
                    Kind::TooLarge => ("invalid_request_error", Some("request_too_large")),
                    Kind::Busy => ("server_overloaded", Some("queue_full")),
                    Kind::Unavailable => ("server_error", Some("unavailable")),
                    Kind::Internal => ("server_error", None),
                };
                json!({ "error": {
                    "message": self.message,
                    "type": ty,
                    "param": self.param,
                    "code": code,
                }})
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), Json(self.body())).into_response();
        if self.kind == Kind::Busy {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if self.kind == Kind::Unauthorized {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
