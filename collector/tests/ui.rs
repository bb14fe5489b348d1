//! The web UI's assets through the collector's full HTTP router, without a
//! socket: `/` and every file under `/ui/` are served without a token, with
//! the right content type, the Content-Security-Policy and `nosniff`; the
//! API next to them still wants the token; the page references only assets
//! that exist and has no inline script.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use ctw_collector::http::router;
use ctw_collector::store::MemStore;
use ctw_collector::ui::{self, ASSETS, CSP};
use http_body_util::BodyExt;
use tower::ServiceExt;

mod support {
    //! The shared router fixture.
    #[path = "mem_api.rs"]
    pub mod mem_api;
}

fn app() -> Router {
    router(support::mem_api::state(
        Arc::new(MemStore::default()),
        "secret-token",
    ))
}

struct Got {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

fn get(path: &str) -> Got {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let req = Request::builder()
            .uri(path)
            .body(Body::empty())
            .expect("request");
        let resp = app().oneshot(req).await.expect("router answers");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        Got {
            status,
            headers,
            body,
        }
    })
}

fn header(g: &Got, name: header::HeaderName) -> &str {
    g.headers
        .get(&name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn assert_hardened(path: &str, g: &Got) {
    assert_eq!(header(g, header::CONTENT_SECURITY_POLICY), CSP, "{path}");
    assert_eq!(
        header(g, header::X_CONTENT_TYPE_OPTIONS),
        "nosniff",
        "{path}"
    );
    assert_eq!(header(g, header::X_FRAME_OPTIONS), "DENY", "{path}");
}

fn expected_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, e)| e) {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("svg") => "image/svg+xml",
        other => panic!("asset {name} has an unexpected extension {other:?}"),
    }
}

#[test]
fn index_is_served_at_the_root_and_under_ui() {
    for path in ["/", "/ui", "/ui/", "/ui/index.html"] {
        let g = get(path);
        assert_eq!(g.status, StatusCode::OK, "{path}");
        assert_eq!(
            header(&g, header::CONTENT_TYPE),
            "text/html; charset=utf-8",
            "{path}"
        );
        assert_hardened(path, &g);
        let html = String::from_utf8(g.body).expect("utf-8");
        assert!(
            html.contains(r#"<script type="module" src="/ui/app.js"></script>"#),
            "{path}"
        );
    }
}

#[test]
fn every_asset_has_its_content_type_and_the_policy() {
    for a in ASSETS {
        let path = format!("/ui/{}", a.name);
        let g = get(&path);
        assert_eq!(g.status, StatusCode::OK, "{path}");
        assert_eq!(
            header(&g, header::CONTENT_TYPE),
            expected_type(a.name),
            "{path}"
        );
        assert_hardened(&path, &g);
        assert_eq!(g.body, a.body, "{path}");
        assert!(!g.body.is_empty(), "{path} is empty");
    }
}

#[test]
fn unknown_assets_are_404_with_the_policy() {
    for path in ["/ui/nope.js", "/ui/..%2Fhttp.rs", "/ui/app.js.map"] {
        let g = get(path);
        assert_eq!(g.status, StatusCode::NOT_FOUND, "{path}");
        assert_hardened(path, &g);
        assert_eq!(
            header(&g, header::CONTENT_TYPE),
            "text/plain; charset=utf-8",
            "{path}"
        );
    }
}

#[test]
fn the_api_beside_the_ui_still_needs_the_token() {
    let g = get("/api/v1/agents");
    assert_eq!(g.status, StatusCode::UNAUTHORIZED);
}

/// The policy forbids inline scripts and foreign origins, so the page may
/// not depend on them: no inline <script>, no event-handler attributes, no
/// inline styles, no absolute URLs; every `/ui/` reference (in HTML, and
/// every module import) is an embedded asset.
#[test]
fn assets_reference_only_embedded_files_and_nothing_inline() {
    let text = |a: &ui::Asset| String::from_utf8(a.body.to_vec()).expect("utf-8 asset");
    let html = text(ui::asset("index.html").expect("index.html"));
    for needle in [
        " onclick=",
        " onload=",
        " onsubmit=",
        " style=",
        "<style",
        "javascript:",
        "http://",
        "https://",
    ] {
        assert!(!html.contains(needle), "index.html contains {needle:?}");
    }
    for (i, _) in html.match_indices("<script") {
        let tag = &html[i..i + html[i..].find('>').expect("closed tag")];
        assert!(
            tag.contains(" src=\"/ui/"),
            "inline or foreign script: {tag}"
        );
    }
    let mut refs: Vec<String> = html
        .split(['"', '\''])
        .filter_map(|s| s.strip_prefix("/ui/"))
        .map(str::to_string)
        .collect();
    for a in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
        // The SVG namespace is a name, not a URL that is fetched.
        let js = text(a).replace("http://www.w3.org/2000/svg", "");
        assert!(
            !js.contains("http://") && !js.contains("https://"),
            "{} has an absolute URL",
            a.name
        );
        assert!(
            !js.contains("eval(") && !js.contains("new Function"),
            "{} evaluates strings",
            a.name
        );
        assert!(!js.contains("innerHTML"), "{} writes innerHTML", a.name);
        for line in js.lines().filter(|l| l.starts_with("import ")) {
            let from = line
                .rsplit_once("from '")
                .map(|(_, r)| r.trim_end_matches("';"))
                .expect("import from");
            refs.push(
                from.strip_prefix("./")
                    .expect("relative import")
                    .to_string(),
            );
        }
    }
    assert!(
        refs.len() > ASSETS.len() / 2,
        "too few references found: {refs:?}"
    );
    for r in &refs {
        assert!(ui::asset(r).is_some(), "{r} is referenced but not embedded");
    }
    let total: usize = ASSETS.iter().map(|a| a.body.len()).sum();
    assert!(total < 96 * 1024, "assets grew to {total} bytes");
}
