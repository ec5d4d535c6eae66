//! A real headless Chromium, driven over the DevTools protocol (a WebSocket on a loopback
//! port), for tests of the web console: open a page, evaluate JavaScript in it, take
//! screenshots. The browser is killed by pid when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::send_signal;

/// The Chromium executable, if one is installed.
pub fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| crate::have_tool(b, &["--version"]))
}

pub struct Browser {
    child: Child,
    ws: WebSocketStream<TcpStream>,
    next_id: u64,
    /// The page's session (after [`Browser::open`]).
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        send_signal(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Browser {
    /// A headless Chromium with a fresh profile, or `None` without one installed.
    pub async fn launch() -> Option<Browser> {
        let exe = chromium()?;
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        // It says where its DevTools endpoint listens on stderr.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => url,
            Err(_) => {
                send_signal(child.id(), libc::SIGKILL);
                panic!("chromium did not say where DevTools listens");
            }
        };
        let host = url.trim_start_matches("ws://").split('/').next().unwrap().to_string();
        let tcp = TcpStream::connect(&host).await.expect("connect to DevTools");
        let (ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp).await.expect("DevTools");
        Some(Browser { child, ws, next_id: 0, session: None, _profile: profile })
    }

    /// Sends a DevTools command (to the page's session once there is one) and waits for
    /// its answer; events in between are skipped.
    async fn call(&mut self, method: &str, params: Value, on_page: bool) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if on_page {
            msg["sessionId"] = json!(self.session.clone().expect("a page is open"));
        }
        self.ws.send(Message::text(msg.to_string())).await.expect("send to DevTools");
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(frame) = self.ws.next().await {
                let Ok(Message::Text(text)) = frame else { continue };
                let v: Value = serde_json::from_str(&text).unwrap_or_default();
                if v["id"] == json!(id) {
                    return v;
                }
            }
            panic!("DevTools closed");
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools did not answer {method}"));
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// Opens `url` in a new page; later calls act on it.
    pub async fn open(&mut self, url: &str) {
        let target = self.call("Target.createTarget", json!({"url": url}), false).await;
        let params = json!({"targetId": target["targetId"], "flatten": true});
        let attached = self.call("Target.attachToTarget", params, false).await;
        self.session = attached["sessionId"].as_str().map(str::to_string);
    }

    /// The value of a JavaScript expression in the page (awaited if a promise).
    pub async fn eval(&mut self, expression: &str) -> Value {
        let params = json!({"expression": expression, "returnByValue": true, "awaitPromise": true});
        let r = self.call("Runtime.evaluate", params, true).await;
        r["result"]["value"].clone()
    }

    /// Polls `expression` until it is truthy (its value) or `timeout` passes (`None`).
    pub async fn wait_for(&mut self, expression: &str, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.eval(expression).await;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return Some(v);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A PNG of the page as shown, written to `path` (its folder made).
    pub async fn screenshot(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}), true).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}
