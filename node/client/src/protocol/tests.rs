use proptest::prelude::*;

use super::*;

#[test]
fn parses_every_op() {
    let cases = [
        (
            r#"{"op":"hello","token":"t","client":"c"}"#,
            Request::Hello { token: Some("t".into()), client: Some("c".into()) },
        ),
        (
            r#"{"op":"say","conv":"c-42","id":"m-1","text":"hi","bot":"shop","user":"u-7"}"#,
            Request::Say {
                conv: "c-42".into(),
                id: "m-1".into(),
                text: "hi".into(),
                bot: Some("shop".into()),
                user: Some("u-7".into()),
            },
        ),
        (
            r#"{"op":"say","conv":"c","id":"1","text":""}"#,
            Request::Say {
                conv: "c".into(),
                id: "1".into(),
                text: "".into(),
                bot: None,
                user: None,
            },
        ),
        (
            r#"{"op":"history","conv":"c-42","limit":20,"before":7}"#,
            Request::History { conv: "c-42".into(), limit: Some(20), before: Some(7) },
        ),
        (r#"{"op":"topology"}"#, Request::Topology),
        (r#"{"op":"ping"}"#, Request::Ping),
    ];
    for (line, want) in cases {
        assert_eq!(parse_request(line.as_bytes()).unwrap(), want, "{line}");
        let again = want.to_line();
        assert_eq!(parse_request(&again[..again.len() - 1]).unwrap(), want);
    }
}

#[test]
fn errors_are_clear_and_keep_the_id() {
    let err = parse_request(b"{\"op\":\"say\",\"conv\":\"c\",\"id\":\"m-9\"}").unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(err.message.contains("missing field `text`"), "{}", err.message);
    assert_eq!(err.id.as_deref(), Some("m-9"));
    assert_eq!(err.conv.as_deref(), Some("c"));

    let err = parse_request(b"{\"op\":\"dance\"}").unwrap_err();
    assert!(err.message.contains("unknown op `dance`"), "{}", err.message);

    let err = parse_request(b"not json").unwrap_err();
    assert!(err.message.starts_with("invalid request"), "{}", err.message);

    let err = parse_request(b"{\"op\":\"ping\"}\xff").unwrap_err();
    assert!(err.message.contains("UTF-8"), "{}", err.message);

    let err = parse_request(br#"{"op":"say","conv":"","id":"1","text":"x"}"#).unwrap_err();
    assert!(err.message.contains("`conv` must not be empty"), "{}", err.message);
}

#[test]
fn responses_have_the_documented_shape() {
    let reply = Response::Reply {
        conv: "c-42".into(),
        id: "m-1".into(),
        messages: vec!["hello".into()],
        turn: 3,
        node: "node-1".into(),
    };
    assert_eq!(
        String::from_utf8(reply.to_line()).unwrap(),
        "{\"op\":\"reply\",\"conv\":\"c-42\",\"id\":\"m-1\",\"messages\":[\"hello\"],\"turn\":3,\"node\":\"node-1\"}\n"
    );
    let err = Response::Error {
        id: Some("m-1".into()),
        conv: None,
        code: ErrorCode::Busy,
        message: "too many requests in flight".into(),
        retry_after_ms: Some(50),
    };
    let v: serde_json::Value = serde_json::from_slice(&err.to_line()).unwrap();
    assert_eq!(v["op"], "error");
    assert_eq!(v["code"], "busy");
    assert_eq!(v["retry_after_ms"], 50);
    assert_eq!(v["id"], "m-1");
}

#[test]
fn responses_parse_back() {
    let all = vec![
        Response::Welcome { node: "n".into(), protocol: 1 },
        Response::Reply {
            conv: "c".into(),
            id: "i".into(),
            messages: vec!["m".into()],
            turn: 2,
            node: "n".into(),
        },
        Response::History {
            conv: "c".into(),
            turns: vec![HistoryTurn {
                turn: 1,
                id: "i".into(),
                text: "t".into(),
                messages: vec![],
                user: None,
            }],
            more: true,
            node: "n".into(),
        },
        Response::Topology {
            nodes: vec![TopologyNode { name: "n".into(), client_addr: "1.2.3.4:5".into() }],
        },
        Response::Pong { node: "n".into() },
        Response::Error {
            id: None,
            conv: Some("c".into()),
            code: ErrorCode::Busy,
            message: "m".into(),
            retry_after_ms: Some(5),
        },
    ];
    for r in all {
        let line = r.to_line();
        assert_eq!(parse_response(&line[..line.len() - 1]).unwrap(), r);
    }
    assert!(parse_response(b"{\"op\":\"reply\"}").unwrap_err().contains("lacks"));
}

#[test]
fn escaped_strings_are_decoded() {
    let r = parse_request(br#"{"op":"say","conv":"c\u0041","id":"1","text":"line\nbreak \"q\""}"#)
        .unwrap();
    assert_eq!(
        r,
        Request::Say {
            conv: "cA".into(),
            id: "1".into(),
            text: "line\nbreak \"q\"".into(),
            bot: None,
            user: None
        }
    );
}

mod fuzz {
    use super::*;

    /// Request and response lines of every kind, to damage.
    fn valid_lines() -> Vec<Vec<u8>> {
        let requests = [
            r#"{"op":"hello","token":"t","client":"c"}"#,
            r#"{"op":"say","conv":"c-42","id":"m-1","text":"hi \u00e9\n","bot":"shop","user":"u-7"}"#,
            r#"{"op":"history","conv":"c-42","limit":20,"before":7}"#,
            r#"{"op":"topology"}"#,
            r#"{"op":"reply","conv":"c","id":"i","messages":["m"],"turn":2,"node":"n"}"#,
            r#"{"op":"history","conv":"c","turns":[{"turn":1,"id":"i","text":"t","messages":[]}],"more":true,"node":"n"}"#,
            r#"{"op":"error","id":"i","conv":"c","code":"busy","message":"m","retry_after_ms":5}"#,
            r#"{"op":"topology","nodes":[{"name":"n","client_addr":"127.0.0.1:1"}]}"#,
        ];
        requests.iter().map(|r| r.as_bytes().to_vec()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(botclaw_core::fuzz::cases()))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&bytes);
            let _ = parse_response(&bytes);
        }

        /// Valid lines damaged: an error (or a request that passes every check), never a panic;
        /// whatever parses keeps ids within their limits.
        #[test]
        fn damaged_valid_lines_never_panic(seed in any::<u64>(), pick in any::<usize>()) {
            let lines = valid_lines();
            let line = botclaw_core::fuzz::mutate(&lines[pick % lines.len()], seed);
            if let Ok(Request::Say { conv, id, .. }) = parse_request(&line) {
                prop_assert!(conv.len() <= ID_BYTES_MAX && id.len() <= ID_BYTES_MAX);
                prop_assert!(!conv.chars().any(char::is_control));
            }
            let _ = parse_response(&line);
        }

        #[test]
        fn arbitrary_json_objects_never_panic(
            op in "(say|history|hello|ping|topology|x)",
            fields in proptest::collection::btree_map("[a-z]{1,6}", "[a-z0-9]{0,8}", 0..6),
        ) {
            let mut obj = serde_json::Map::new();
            obj.insert("op".into(), op.into());
            for (k, v) in fields {
                obj.insert(k, v.into());
            }
            let line = serde_json::to_vec(&obj).unwrap();
            let _ = parse_request(&line);
        }
    }
}
