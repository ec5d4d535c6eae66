//! The deployment artifacts under `cluster-config/deploy/` are checked as far as this
//! machine can: the Kubernetes manifests against their schemas (kubernetes-validate), the
//! systemd unit by `systemd-analyze verify`, and the node configuration each artifact
//! gives (its environment, flags and files) by `botclaw node --check-config`, so a
//! misspelt setting fails here, not on the operator's cluster. Tools that are missing skip
//! a check outside CI and fail it in CI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use botclaw_tests::{botclaw_bin, have_tool as have, SECRET};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-config/deploy")
}

/// Files an artifact refers to, made for real in a temporary directory: the secret, the
/// TLS files (`botclaw tls init`) under every name the artifacts use.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        let out = Command::new(botclaw_bin())
            .args(["tls", "init", "--dir"])
            .arg(dir.path().join("tls"))
            .args(["--name", "botclaw", "--name", "node"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Files { dir }
    }

    /// `text` with the artifact's absolute paths moved into the temporary directory.
    fn localize(&self, text: &str) -> String {
        let d = self.dir.path().display().to_string();
        text.replace("/etc/botclaw/secret/secret", &format!("{d}/secret"))
            .replace("/etc/botclaw/tls/", &format!("{d}/tls/"))
            .replace("/etc/botclaw/secret", &format!("{d}/secret"))
            .replace("/run/secrets/cluster_secret", &format!("{d}/secret"))
            .replace("/run/secrets/tls_ca", &format!("{d}/tls/ca.pem"))
            .replace("/run/secrets/tls_cert", &format!("{d}/tls/botclaw.pem"))
            .replace("/run/secrets/tls_key", &format!("{d}/tls/botclaw-key.pem"))
            .replace("/var/lib/botclaw", &format!("{d}/data"))
    }
}

/// `botclaw node --check-config ARGS` with exactly `env` (and PATH): the printed
/// configuration, or the error.
fn check_config(args: &[String], env: &BTreeMap<String, String>) -> Result<String, String> {
    let out = Command::new(botclaw_bin())
        .args(args)
        .arg("--check-config")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// YAML documents as JSON, by PyYAML (merge keys resolved).
fn yaml_documents(path: &Path) -> Option<Vec<Value>> {
    if !have("python3", &["-c", "import yaml"]) {
        return None;
    }
    let script = "import sys, json, yaml\njson.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)";
    let out = Command::new("python3").args(["-c", script]).arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn the_systemd_unit_verifies() {
    if !have("systemd-analyze", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(deploy_dir().join("botclaw.service")).unwrap();
    // verify wants the executable to exist.
    let unit = unit.replace("/usr/local/bin/botclaw", &botclaw_bin().display().to_string());
    let path = dir.path().join("botclaw.service");
    std::fs::write(&path, &unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    // The checker catches what it should: an unknown key is reported.
    std::fs::write(&path, unit.replace("ProtectClock=", "ProtectClok=")).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ProtectClok"),
        "a misspelt key went unnoticed"
    );

    // Its command and config file configure a node.
    let files = Files::new();
    let toml = std::fs::read_to_string(deploy_dir().join("node.toml")).unwrap();
    let config = files.dir.path().join("node.toml");
    std::fs::write(&config, files.localize(&toml)).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let mut args: Vec<String> = exec.split_whitespace().skip(1).map(String::from).collect();
    let at = args.iter().position(|a| a == "--config").unwrap() + 1;
    args[at] = config.display().to_string();
    let cfg = check_config(&args, &BTreeMap::new()).unwrap_or_else(|e| panic!("node.toml: {e}"));
    assert!(cfg.contains("\"bc1:7002\"") && cfg.contains("voters = ["), "{cfg}");
}

#[test]
fn the_kubernetes_manifests_validate_and_configure_a_node() {
    let manifest = deploy_dir().join("kubernetes/botclaw.yaml");
    if have("kubernetes-validate", &["--version"]) {
        let out =
            Command::new("kubernetes-validate").arg("--strict").arg(&manifest).output().unwrap();
        assert!(
            out.status.success(),
            "kubernetes-validate: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let Some(docs) = yaml_documents(&manifest) else { return };
    let set = docs.iter().find(|d| d["kind"] == "StatefulSet").expect("a StatefulSet");
    let container = &set["spec"]["template"]["spec"]["containers"][0];
    // The pod's environment as the kubelet gives it: downward API values, secrets, then
    // $(VAR) references.
    let mut env = BTreeMap::new();
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = match (&e["value"], &e["valueFrom"]) {
            (Value::String(v), _) => v.clone(),
            (_, from) => match from["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => "botclaw-1".into(),
                Some("metadata.namespace") => "default".into(),
                Some("status.podIP") => "10.244.1.7".into(),
                Some(other) => panic!("unexpected field {other}"),
                None => "a-long-random-admin-token".into(),
            },
        };
        let value = env
            .iter()
            .fold(value, |v, (k, x): (&String, &String)| v.replace(&format!("$({k})"), x));
        env.insert(name, value);
    }
    let files = Files::new();
    let env: BTreeMap<String, String> =
        env.into_iter().map(|(k, v)| (k, files.localize(&v))).collect();
    let mut args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    args.extend(["--data-dir".to_string(), files.dir.path().join("data").display().to_string()]);
    let cfg = check_config(&args, &env).unwrap_or_else(|e| panic!("the pod's config: {e}"));
    assert!(cfg.contains("name = \"botclaw-1\""), "{cfg}");
    assert!(cfg.contains("botclaw.default.svc.cluster.local:7002"), "{cfg}");
    // The probes and the drain use the ports the node listens on.
    let ports: Vec<i64> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, [7000, 7001, 7002, 7003]);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/health/ready");
    // A misspelt setting fails the check (the checker can fail).
    let mut typo = env.clone();
    let voters = typo.remove("BOTCLAW_CONTROLLER__VOTERS").unwrap();
    typo.insert("BOTCLAW_CONTROLER__VOTERS".into(), voters);
    let err = check_config(&args, &typo).unwrap_err();
    assert!(err.contains("BOTCLAW_CONTROLER__VOTERS"), "{err}");
}

#[test]
fn the_compose_file_and_the_dockerfile_configure_nodes() {
    let files = Files::new();
    // The Dockerfile's ENV, with what compose adds.
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let joined = dockerfile.replace("\\\n", " ");
    let mut image_env = BTreeMap::new();
    for line in joined.lines().filter_map(|l| l.strip_prefix("ENV ")) {
        for pair in line.split_whitespace() {
            let (k, v) = pair.split_once('=').expect("ENV k=v");
            image_env.insert(k.to_string(), files.localize(v));
        }
    }
    assert!(image_env.contains_key("BOTCLAW_GOSSIP_ADDR"), "{image_env:?}");
    let Some(docs) = yaml_documents(&deploy_dir().join("compose.yaml")) else { return };
    let services = docs[0]["services"].as_object().unwrap();
    assert_eq!(services.len(), 3);
    for (name, service) in services {
        let mut env = image_env.clone();
        for (k, v) in service["environment"].as_object().unwrap() {
            // ${VAR:?message} is compose's interpolation of the operator's variable.
            let v = v.as_str().unwrap();
            let v = if v.starts_with("${") { "a-long-random-admin-token" } else { v };
            env.insert(k.clone(), files.localize(v));
        }
        // The hostname compose gives is the default name; here it is given outright.
        env.insert("BOTCLAW_NAME".into(), service["hostname"].as_str().unwrap().into());
        let cfg = check_config(&["node".into()], &env).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            cfg.contains(&format!("name = \"{name}\"")) && cfg.contains("\"botclaw-2:7002\""),
            "{cfg}"
        );
    }
}
