//! The web UI: a static single-page app (HTML, CSS, JavaScript modules)
//! compiled into the binary and served at `/` and `/ui/...`.
//!
//! The assets hold no data and are served without a token; every piece of
//! data comes from the token-protected `/api/` routes, called by the page
//! with the token the user typed (kept in `sessionStorage`). Responses carry
//! a strict Content-Security-Policy: scripts, styles and images only from
//! this origin, no inline scripts, no framing.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The policy on every UI response. `connect-src 'self'` is all the page
/// needs: it only talks to this collector's API.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// File name under `/ui/`.
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every asset under `/ui/`.
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("assets/index.html"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/app.css"),
    },
    Asset {
        name: "app.js",
        content_type: JS,
        body: include_bytes!("assets/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: JS,
        body: include_bytes!("assets/api.js"),
    },
    Asset {
        name: "dom.js",
        content_type: JS,
        body: include_bytes!("assets/dom.js"),
    },
    Asset {
        name: "time.js",
        content_type: JS,
        body: include_bytes!("assets/time.js"),
    },
    Asset {
        name: "resolve.js",
        content_type: JS,
        body: include_bytes!("assets/resolve.js"),
    },
    Asset {
        name: "search.js",
        content_type: JS,
        body: include_bytes!("assets/search.js"),
    },
    Asset {
        name: "agents.js",
        content_type: JS,
        body: include_bytes!("assets/agents.js"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("assets/favicon.svg"),
    },
];

/// The asset called `name`, if there is one.
pub fn asset(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// `/`, `/ui/` and `/ui/{file}`. Generic over the state so it merges into
/// the API router without needing it.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/{file}", get(file))
        .route(
            "/favicon.ico",
            get(|| async { file(Path("favicon.svg".to_string())).await }),
        )
}

async fn index() -> Response {
    file(Path("index.html".to_string())).await
}

async fn file(Path(name): Path<String>) -> Response {
    let mut resp = match asset(&name) {
        Some(a) => ([(header::CONTENT_TYPE, a.content_type)], a.body).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "not found\n",
        )
            .into_response(),
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Not fingerprinted: revalidate so a new binary's page is picked up.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
