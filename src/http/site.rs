//! What the application serves: the [`Site`] trait and the live page of `/`.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write as _};

use super::HttpStats;

/// The answer of `/healthz`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// `200 OK`, body `ok`.
    Ok,
    /// `503 Service Unavailable`; the text (one line) says why.
    Unavailable(String),
}

/// The application behind the responder. The kernel implements it over the metrics
/// registry and its configuration; tests implement it with fixed content.
pub trait Site {
    /// Writes the `/metrics` body into `out` and returns its `Content-Type`.
    ///
    /// `accept` is the request's `Accept` header (several fields joined with `", "`; empty
    /// when absent), from which the site picks the exposition format. The site may time
    /// this call itself to report the scrape's encode time.
    fn metrics(&mut self, accept: &str, out: &mut Vec<u8>) -> &'static str;

    /// Adds the facts shown on `/` (export name, size, ports, ...) to `page`.
    fn index(&mut self, page: &mut IndexPage);

    /// The answer of `/healthz`.
    fn healthz(&mut self) -> Health;

    /// Where the responder counts what it does; read by the metrics layer.
    fn http_stats(&self) -> &HttpStats;
}

/// The live page of `/` (`page.html`): inline CSS and a script that scrapes `/metrics` every
/// two seconds and draws rates, latency quantiles, space, reclaim, NBD and HTTP as SVG
/// charts. No external asset. `{{title}}` and `{{facts}}` are filled in by
/// [`IndexPage::render`].
pub(super) const PAGE: &str = include_str!("page.html");

/// The content of the `/` page: a title and a list of facts, rendered as escaped HTML into
/// [`PAGE`], which links to `/metrics` and `/healthz`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexPage {
    title: String,
    facts: Vec<(String, String)>,
}

impl IndexPage {
    /// An empty page titled `qcow-metal`.
    pub fn new() -> Self {
        Self {
            title: String::from("qcow-metal"),
            facts: Vec::new(),
        }
    }

    /// Replaces the page's title.
    pub fn title(&mut self, title: &str) -> &mut Self {
        self.title.clear();
        self.title.push_str(title);
        self
    }

    /// Adds one fact, e.g. `("NBD export", "disk0 on port 10809")`.
    pub fn fact(&mut self, label: &str, value: impl fmt::Display) -> &mut Self {
        let mut text = String::new();
        // Writing into a String cannot fail, except through a Display impl that reports an
        // error; then the partial text is shown.
        let _ = write!(text, "{value}");
        self.facts.push((String::from(label), text));
        self
    }

    /// The facts added so far, in order.
    pub fn facts(&self) -> &[(String, String)] {
        &self.facts
    }

    /// Renders the page: [`PAGE`] with the title and the facts (a table, readable without
    /// JavaScript) filled in.
    pub fn render(&self, out: &mut Vec<u8>) {
        let mut html = String::with_capacity(PAGE.len() + 64 * self.facts.len());
        let mut rest = PAGE;
        while let Some((before, after)) = rest.split_once("{{") {
            html.push_str(before);
            let Some((marker, after)) = after.split_once("}}") else {
                html.push_str("{{");
                rest = after;
                continue;
            };
            match marker {
                "title" => escape_html(&self.title, &mut html),
                "facts" => {
                    for (label, value) in &self.facts {
                        html.push_str("<tr><th>");
                        escape_html(label, &mut html);
                        html.push_str("</th><td>");
                        escape_html(value, &mut html);
                        html.push_str("</td></tr>\n");
                    }
                }
                other => {
                    html.push_str("{{");
                    html.push_str(other);
                    html.push_str("}}");
                }
            }
            rest = after;
        }
        html.push_str(rest);
        out.extend_from_slice(html.as_bytes());
    }
}

/// Appends `text` to `out` with the five HTML-special characters escaped.
fn escape_html(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_escapes_and_links_to_metrics() {
        let mut page = IndexPage::new();
        page.title("guest <1>")
            .fact("NBD export", "a&b \"x\"")
            .fact("size", 42);
        let mut out = Vec::new();
        page.render(&mut out);
        let html = String::from_utf8(out).unwrap();
        assert!(html.contains("<title>guest &lt;1&gt;</title>"));
        assert!(html.contains("<th>NBD export</th><td>a&amp;b &quot;x&quot;</td>"));
        assert!(html.contains("<th>size</th><td>42</td>"));
        assert!(html.contains("<a href=\"/metrics\">/metrics</a>"));
        assert!(!html.contains("<1>"));
        assert!(
            !html.contains("{{"),
            "every marker of page.html is filled in"
        );
    }
}
