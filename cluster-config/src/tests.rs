use super::*;

fn with_secret(text: &str) -> RawNodeConfig {
    let raw = RawNodeConfig::from_toml(text).unwrap();
    raw.merge(RawNodeConfig { secret: Some("0123456789abcdef".into()), ..Default::default() })
}

#[test]
fn shipped_examples_parse_and_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let raw = RawNodeConfig::from_file(&path).unwrap();
            let secret =
                RawNodeConfig { secret: Some("0123456789abcdef".into()), ..Default::default() };
            raw.merge(secret).validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 4, "expected the single-node file and a 3-node set, found {seen}");
}

#[test]
fn unknown_field_is_named() {
    let err = RawNodeConfig::from_toml("nmae = \"x\"").unwrap_err();
    assert!(err.contains("nmae"), "{err}");
    let err = RawNodeConfig::from_toml("[gossip]\nprobe_period = 3").unwrap_err();
    assert!(err.contains("probe_period"), "{err}");
}

#[test]
fn bad_address_is_named() {
    let err = with_secret("client_addr = \"localhost\"").validate().unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { field: "client_addr", reason }
            if reason.starts_with("\"localhost\" is not an ip:port address")),
        "{err}"
    );
    let err = with_secret("seeds = [\"1.2.3.4\"]").validate().unwrap_err();
    assert!(err.to_string().contains("`seeds`"), "{err}");
}

#[test]
fn missing_secret_is_named() {
    let err = RawNodeConfig::default().validate().unwrap_err();
    assert!(err.to_string().contains("`secret`"), "{err}");
}

#[test]
fn flags_override_file() {
    let file = with_secret("name = \"a\"\ngossip_addr = \"127.0.0.1:9000\"");
    let flags = RawNodeConfig { name: Some("b".into()), ..Default::default() };
    let cfg = file.merge(flags).validate().unwrap();
    assert_eq!(cfg.name, "b");
    assert_eq!(cfg.gossip_addr, "127.0.0.1:9000".parse().unwrap());
}

#[test]
fn gossip_relations_are_checked() {
    let err =
        with_secret("[gossip]\nprobe_period_ms = 100\nprobe_rtt_ms = 100").validate().unwrap_err();
    assert!(err.to_string().contains("gossip.probe_rtt_ms"), "{err}");
}

#[test]
fn colliding_ports_rejected() {
    let err = with_secret("client_addr = \"127.0.0.1:7003\"").validate().unwrap_err();
    assert!(err.to_string().contains("must all differ"), "{err}");
}

#[test]
fn round_trips_through_toml() {
    let raw =
        with_secret("name = \"n1\"\nseeds = [\"127.0.0.1:7002\"]\n[gossip]\nprobe_period_ms = 700");
    let back = RawNodeConfig::from_toml(&raw.to_toml()).unwrap();
    assert_eq!(back, raw);
}

#[test]
fn roles_are_bounded() {
    let many: Vec<String> = (0..=ROLES_MAX).map(|i| format!("\"r{i}\"")).collect();
    let err = with_secret(&format!("roles = [{}]", many.join(","))).validate().unwrap_err();
    assert!(err.to_string().contains("`roles`"), "{err}");
    let err = with_secret("roles = [\"has space\"]").validate().unwrap_err();
    assert!(err.to_string().contains("`roles`"), "{err}");
}

#[test]
fn retransmissions_grow_with_log_of_the_cluster_size() {
    let g = GossipConfig::default();
    // The floor holds for small clusters; then 4 per decimal digit of (members + 1).
    let expected =
        [(0, 8), (3, 8), (99, 8), (100, 12), (998, 12), (999, 12), (1000, 16), (5000, 16)];
    for (members, tx) in expected {
        assert_eq!(g.transmissions(members), tx, "{members} members");
    }
    let big = GossipConfig { transmissions_min: 1, transmissions_log_factor: 200, ..g.clone() };
    assert_eq!(big.transmissions(1_000_000), u8::MAX, "capped at 255");
    let none = GossipConfig { transmissions_min: 0, transmissions_log_factor: 0, ..g };
    assert_eq!(none.transmissions(10), 1, "never zero");
}

#[test]
fn controller_settings_are_checked() {
    let err = |text: &str| with_secret(text).validate().unwrap_err().to_string();
    assert!(err("[controller]\nvoters = [\"a\", \"a\"]").contains("listed twice"));
    assert!(err("[controller]\nvoters = [\"a b\"]").contains("controller.voters"));
    assert!(err("[controller]\ntick_ms = 0").contains("controller.tick_ms"));
    assert!(err("[controller]\nheartbeat_ticks = 10").contains("controller.heartbeat_ticks"));
    let ok = with_secret("[controller]\nvoters = [\"n0\", \"n1\", \"n2\"]").validate().unwrap();
    assert_eq!(ok.controller.voters, ["n0", "n1", "n2"]);
}

#[test]
fn replication_bounds_are_checked_by_name() {
    let err = |text: &str| with_secret(text).validate().unwrap_err().to_string();
    for field in ["factor", "incoming_max", "pending_per_shard_max"] {
        let e = err(&format!("[replication]\n{field} = 0"));
        assert!(e.contains(&format!("replication.{field}")), "{e}");
    }
    let ok = with_secret("[replication]\npending_per_shard_max = 16").validate().unwrap();
    assert_eq!(ok.replication.pending_per_shard_max, 16);
    for field in ["connections_max", "header_timeout_ms"] {
        let e = err(&format!("[admin]\n{field} = 0"));
        assert!(e.contains(&format!("admin.{field}")), "{e}");
    }
    assert_eq!(with_secret("").validate().unwrap().admin.connections_max, 64);
}

#[test]
fn the_secret_comes_from_a_file_or_a_value_never_both() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "  0123456789abcdef-from-file \nsecond line\n").unwrap();
    let by_file = RawNodeConfig { secret_file: Some(file.clone()), ..Default::default() };
    assert_eq!(by_file.clone().validate().unwrap().secret, "0123456789abcdef-from-file");
    // A flag given one way replaces the file's other way.
    let in_file = RawNodeConfig { secret: Some("0123456789abcdef".into()), ..Default::default() };
    assert_eq!(
        in_file.merge(by_file.clone()).validate().unwrap().secret,
        "0123456789abcdef-from-file"
    );
    let value = RawNodeConfig { secret: Some("fedcba9876543210".into()), ..Default::default() };
    assert_eq!(by_file.clone().merge(value).validate().unwrap().secret, "fedcba9876543210");
    // Both in one place: refused, naming the field.
    let both = RawNodeConfig {
        secret: Some("0123456789abcdef".into()),
        secret_file: Some(file.clone()),
        ..Default::default()
    };
    assert!(both.validate().unwrap_err().to_string().contains("secret_file"));
    for (path, says) in
        [(dir.path().join("missing"), "missing"), (dir.path().join("empty"), "empty")]
    {
        if says == "empty" {
            std::fs::write(&path, "\n").unwrap();
        }
        let raw = RawNodeConfig { secret_file: Some(path), ..Default::default() };
        let e = raw.validate().unwrap_err().to_string();
        assert!(e.contains("secret_file") && e.contains(says), "{e}");
    }
}

#[test]
fn an_admin_port_reachable_from_other_hosts_needs_tokens() {
    let open = with_secret("admin_addr = \"0.0.0.0:7003\"\n");
    let e = open.validate().unwrap_err().to_string();
    assert!(e.contains("admin_addr") && e.contains("admin.tokens"), "{e}");
    let with_tokens = with_secret("admin_addr = \"0.0.0.0:7003\"\n[admin]\ntokens = [\"t\"]\n");
    assert_eq!(with_tokens.validate().unwrap().admin.tokens, vec!["t".to_string()]);
    let allowed =
        with_secret("admin_addr = \"10.0.0.5:7003\"\n[admin]\nopen_bind_allowed = true\n");
    assert!(allowed.validate().is_ok());
    assert!(with_secret("admin_addr = \"[::1]:7003\"\n").validate().is_ok(), "loopback stays open");
}

#[test]
fn a_conversation_must_fit_half_a_link_frame() {
    let err = |text: &str| with_secret(text).validate().unwrap_err().to_string();
    let e = err("[conversations]\nturns_kept_max = 200");
    assert!(e.contains("turn_bytes_max") && e.contains("half of link.frame_bytes_max"), "{e}");
    assert!(err("[link]\nframe_bytes_max = 1048576").contains("half of link.frame_bytes_max"));
    assert!(err("[conversations]\nhistory_bytes_max = 4194304").contains("history_bytes_max"));
    assert!(err("[frontend]\noutput_buffer_bytes_max = 1024").contains("output_buffer_bytes_max"));
    assert!(err("[conversations]\nactive_bytes_max = 0").contains("active_bytes_max"));
    // Smaller turns make room for more of them.
    let ok = with_secret("[conversations]\nturns_kept_max = 200\nturn_bytes_max = 8192");
    assert_eq!(ok.validate().unwrap().conversations.turns_kept_max, 200);
}

#[test]
fn principals_are_checked() {
    let err = |text: &str| with_secret(text).validate().unwrap_err().to_string();
    assert!(err("[frontend.principals]\n\"a/b\" = [\"t1\"]").contains("frontend.principals"));
    assert!(err("[frontend.principals]\nweb = []").contains("at least one"));
    let twice = "[frontend]\nclient_tokens = [\"tok-1\"]\n[frontend.principals]\nweb = [\"tok-1\"]";
    assert!(err(twice).contains("listed twice"), "{}", err(twice));
    let ok = with_secret("[frontend.principals]\nweb = [\"a\", \"b\"]\napp = [\"c\"]");
    let cfg = ok.validate().unwrap();
    assert!(!cfg.frontend.open());
    assert_eq!(cfg.frontend.principals["web"], ["a", "b"]);
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn environment_sets_fields_over_the_file() {
    let dir = std::env::temp_dir().join(format!("botclaw-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("node.toml");
    std::fs::write(
        &file,
        "name = \"from-file\"\n[gossip]\nprobe_period_ms = 700\nprobe_rtt_ms = 300\n",
    )
    .unwrap();
    let raw = RawNodeConfig::load(
        Some(&file),
        vars(&[
            ("BOTCLAW_NAME", "from-env"),
            ("BOTCLAW_SEEDS", "botclaw-0.botclaw:7002, 10.0.0.2:7002"),
            ("BOTCLAW_GOSSIP__PROBE_RTT_MS", "250"),
            ("BOTCLAW_ADVERTISE_HOST", "botclaw-1.botclaw"),
            ("BOTCLAW_TEST_BY_RING", "1"),
            ("BOTCLAW_ADMIN__TOKENS", "one-token"),
            ("BOTCLAW_ADMIN_TOKEN", "the CLI's, not a field"),
            ("BOTCLAW_SECRET", "not read here"),
            ("OTHER", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(raw.name.as_deref(), Some("from-env"));
    let gossip = raw.gossip.clone().unwrap();
    assert_eq!((gossip.probe_period_ms, gossip.probe_rtt_ms), (700, 250), "field by field");
    assert_eq!(raw.secret, None);
    let cfg =
        raw.merge(RawNodeConfig { secret: Some("0123456789abcdef".into()), ..Default::default() });
    let cfg = cfg.validate().unwrap();
    assert_eq!(
        cfg.seeds.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["botclaw-0.botclaw:7002", "10.0.0.2:7002"]
    );
    assert_eq!(cfg.advertise.host.as_deref(), Some("botclaw-1.botclaw"));
    assert_eq!(cfg.admin.tokens, ["one-token"], "one string is a list of one");

    let err = RawNodeConfig::load(None, vars(&[("BOTCLAW_GOSIP__PROBE_RTT_MS", "250")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("BOTCLAW_GOSIP__PROBE_RTT_MS") && err.contains("gosip"), "{err}");
    let err = RawNodeConfig::load(None, vars(&[("BOTCLAW_GOSSIP__PROBE_RTT_MS", "soon")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("probe_rtt_ms"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn addresses_take_host_names_and_advertise_no_wildcard() {
    let hp: HostPort = "botclaw-0.botclaw.default.svc:7002".parse().unwrap();
    assert_eq!((hp.host.as_str(), hp.port, hp.ip()), ("botclaw-0.botclaw.default.svc", 7002, None));
    let v6: HostPort = "[::1]:7002".parse().unwrap();
    assert_eq!((v6.to_string(), v6.ip().is_some()), ("[::1]:7002".to_string(), true));
    for bad in ["host", "host:0", "host:99999", "bad host:1", ":7002", "a..b:1"] {
        assert!(bad.parse::<HostPort>().is_err(), "{bad}");
    }
    let err = with_secret("seeds = [\"no_port\"]").validate().unwrap_err().to_string();
    assert!(err.contains("`seeds`") && err.contains("no port"), "{err}");
    let err = with_secret("advertise_host = \"0.0.0.0\"").validate().unwrap_err().to_string();
    assert!(err.contains("advertise_host") && err.contains("wildcard"), "{err}");
    let err = with_secret("advertise_client_addr = \"[::]:7000\"").validate().unwrap_err();
    assert!(err.to_string().contains("advertise_client_addr"), "{err}");
    let err = with_secret("client_addr = \"localhost:7000\"").validate().unwrap_err().to_string();
    assert!(err.contains("advertise_host"), "the error says how to name the node: {err}");
}

#[test]
fn default_names_differ_by_host_and_port() {
    assert_eq!(default_node_name("web-3.example.com\n", 7002).as_deref(), Some("web-3"));
    assert_eq!(default_node_name("web-3", 7012).as_deref(), Some("web-3-7012"));
    assert_eq!(default_node_name("localhost", 7002), None);
    assert_eq!(default_node_name("", 7002), None);
    let long = "h".repeat(200);
    let name = default_node_name(&long, 7012).unwrap();
    assert!(name.len() <= NAME_BYTES_MAX, "{name}");
}

#[test]
fn bot_services_are_checked_and_named() {
    let ok = with_secret(
        "[[bots]]\nname = \"support\"\nurls = [\"http://127.0.0.1:8081/turn\", \"http://10.0.0.2:80/\"]\ntimeout_ms = 500\n",
    )
    .validate()
    .unwrap();
    assert_eq!(ok.bots.len(), 1);
    assert_eq!((ok.bots[0].timeout_ms, ok.bots[0].attempts_max), (500, 2), "defaults filled");
    let modules = with_secret(
        "[[modules]]\nname = \"weather\"\nurls = [\"http://127.0.0.1:9001/w\"]\ncache_ttl_ms = 900000\nhealth_path = \"/health\"\n",
    )
    .validate()
    .unwrap();
    assert_eq!(modules.modules[0].cache_ttl_ms, 900_000);
    assert_eq!(modules.modules[0].health_path, "/health");
    let cases = [
        ("[[bots]]\nname = \"Bad Name\"\nurls = [\"http://a:1/\"]\n", "bots.name"),
        ("[[bots]]\nname = \"b\"\nurls = []\n", "bots.urls"),
        ("[[bots]]\nname = \"b\"\nurls = [\"https://a:1/\"]\n", "bots.urls"),
        ("[[bots]]\nname = \"b\"\nkind = \"grpc\"\nurls = [\"http://a:1/\"]\n", "bots.kind"),
        ("[[bots]]\nname = \"b\"\nurls = [\"http://a:1/\"]\ntimeout_ms = 0\n", "bots.timeout_ms"),
        (
            "[[bots]]\nname = \"b\"\nurls = [\"http://a:1/\"]\n[[bots]]\nname = \"b\"\nurls = [\"http://a:2/\"]\n",
            "bots.name",
        ),
        ("[[bots]]\nname = \"b\"\nurls = [\"http://a:1/\"]\ncache_ttl_ms = 5\n", "bots.cache_ttl_ms"),
        ("[[modules]]\nname = \"m\"\nurls = [\"ftp://a:1/\"]\n", "modules.urls"),
        ("[[modules]]\nname = \"m\"\nurls = [\"http://a:1/\"]\nhealth_path = \"up\"\n", "modules.health_path"),
        ("[[modules]]\nname = \"m\"\nurls = [\"http://a:1/\"]\nhealth_failures = 0\n", "modules.health_failures"),
        (
            "[[modules]]\nname = \"m\"\nurls = [\"http://a:1/\"]\n[[modules]]\nname = \"m\"\nurls = [\"http://a:2/\"]\n",
            "modules.name",
        ),
    ];
    for (text, field) in cases {
        let err = with_secret(text).validate().unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { field: f, .. } if *f == field),
            "{text}: {err}"
        );
    }
    let err =
        RawNodeConfig::from_toml("[[bots]]\nname = \"b\"\nurl = \"http://a:1/\"\n").unwrap_err();
    assert!(err.contains("url"), "{err}");
}
