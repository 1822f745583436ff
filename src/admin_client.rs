//! A small blocking client for the admin API, shared by `dev`, `admin` and the tools.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

/// How long one admin request may take end to end.
const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AdminClient {
    base: String,
    key: String,
    http: reqwest::blocking::Client,
}

impl AdminClient {
    /// `ca` is trusted for HTTPS when the file exists (the dev cluster's own CA).
    pub fn new(base: &str, key: &str, ca: PathBuf) -> anyhow::Result<AdminClient> {
        let mut builder = reqwest::blocking::Client::builder().timeout(ADMIN_REQUEST_TIMEOUT);
        if base.starts_with("https://") {
            if let Ok(pem) = std::fs::read(&ca) {
                builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
            }
        }
        Ok(AdminClient {
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
            http: builder.build()?,
        })
    }

    fn send(
        &self,
        request: reqwest::blocking::RequestBuilder,
    ) -> anyhow::Result<serde_json::Value> {
        Ok(self.send_paged(request)?.0)
    }

    /// The answer and, for a page of a listing, the cursor of the next page (`X-Next-After`).
    fn send_paged(
        &self,
        request: reqwest::blocking::RequestBuilder,
    ) -> anyhow::Result<(serde_json::Value, Option<String>)> {
        let response =
            request.bearer_auth(&self.key).send().context("sending the admin request")?;
        let status = response.status();
        let next = response
            .headers()
            .get("x-next-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = response.text().unwrap_or_default();
        if !status.is_success() {
            bail!("{status}: {}", text.trim());
        }
        let value = serde_json::from_str(&text)
            .with_context(|| format!("the gateway answered non-JSON: {text}"))?;
        Ok((value, next))
    }

    /// The status of `GET path` with this client's key, whatever the body.
    pub fn status_of(&self, path: &str) -> anyhow::Result<u16> {
        let url = format!("{}{path}", self.base);
        let response = self.http.get(url).bearer_auth(&self.key).send()?;
        Ok(response.status().as_u16())
    }

    /// The body of `GET path` with this client's key, as text, if it is answered 200.
    pub fn text_of(&self, path: &str) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.base);
        let response = self.http.get(url).bearer_auth(&self.key).send()?;
        let status = response.status();
        let text = response.text()?;
        if !status.is_success() {
            bail!("{status}: {}", text.trim());
        }
        Ok(text)
    }

    /// One page of a paged listing, with the cursor of the next page when there is one.
    pub fn get_page(&self, path: &str) -> anyhow::Result<(serde_json::Value, Option<String>)> {
        self.send_paged(self.http.get(format!("{}{path}", self.base)))
    }

    pub fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
    }

    pub fn patch(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        self.send(self.http.patch(format!("{}{path}", self.base)).json(body))
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
    }
}
