//! `botclaw chat`: an interactive REPL over the chat protocol.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use botclaw_client::{ClientOptions, FailoverClient, FailoverOptions};
use clap::Args;

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Client address of any node.
    #[arg(long, default_value = "127.0.0.1:7000", value_parser = crate::addrs::socket_addr_arg)]
    pub connect: SocketAddr,
    /// Conversation id (default: a new one).
    #[arg(long)]
    pub conv: Option<String>,
    /// Bot for a new conversation.
    #[arg(long, default_value = "shop")]
    pub bot: String,
    /// Client token, if the node requires one.
    #[arg(long, env = "BOTCLAW_CLIENT_TOKEN")]
    pub token: Option<String>,
    /// Talk TLS, trusting the CA certificate(s) in this PEM file (nodes with
    /// `[tls] client_port = true`).
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The name the nodes' certificates carry.
    #[arg(long, default_value = botclaw_config::DEFAULT_TLS_SERVER_NAME)]
    pub tls_server_name: String,
}

const HELP: &str = "commands: /history [N], /topology, /ping, /conv ID, /bot NAME, /quit; anything else is said to the bot";

fn millis() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

pub async fn run(args: ChatArgs) -> Result<()> {
    let opts = FailoverOptions {
        client: ClientOptions {
            client_name: "botclaw-chat".into(),
            token: args.token.clone(),
            tls: match &args.tls_ca {
                Some(ca) => {
                    Some(botclaw_client::ClientTls::from_ca_file(ca, &args.tls_server_name)?)
                }
                None => None,
            },
            ..FailoverOptions::default().client
        },
        ..Default::default()
    };
    // Fails over to other nodes (from `topology`) if this one goes away.
    let client = FailoverClient::connect(&[args.connect], opts).await?;
    let mut conv = args.conv.unwrap_or_else(botclaw_client::new_conversation_id);
    let mut bot = args.bot;
    println!("connected to {}; conversation {conv} with bot {bot}. {HELP}", client.node().await);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines().map_while(Result::ok) {
            if tx.blocking_send(line).is_err() {
                return;
            }
        }
    });
    let mut n = 0u64;
    loop {
        print!("you> ");
        let _ = std::io::stdout().flush();
        let Some(line) = rx.recv().await else { break };
        let line = line.trim();
        let mut words = line.split_whitespace();
        match words.next() {
            None => continue,
            Some("/quit") | Some("/exit") => break,
            Some("/help") => println!("{HELP}"),
            Some("/ping") => println!("pong from {}", client.ping().await?),
            Some("/topology") => {
                for node in client.topology().await? {
                    println!("  {} {}", node.name, node.client_addr);
                }
            }
            Some("/history") => {
                let limit = words.next().and_then(|w| w.parse().ok());
                for t in client.history(&conv, limit).await? {
                    println!("  #{} you: {}", t.turn, t.text);
                    for m in t.messages {
                        println!("  #{} bot: {m}", t.turn);
                    }
                }
            }
            Some("/conv") => match words.next() {
                Some(id) => {
                    conv = id.to_string();
                    println!("now in conversation {conv}");
                }
                None => println!("usage: /conv ID"),
            },
            Some("/bot") => match words.next() {
                Some(name) => {
                    bot = name.to_string();
                    println!("new conversations use bot {bot}");
                }
                None => println!("usage: /bot NAME"),
            },
            Some(_) => {
                n += 1;
                let id = format!("m-{}-{n}", millis());
                match client.say(&conv, &id, line, Some(&bot)).await {
                    Ok(reply) => {
                        for m in &reply.messages {
                            println!("bot> {m}");
                        }
                        println!("     (turn {} on {})", reply.turn, reply.node);
                    }
                    Err(e) => println!("error: {e}"),
                }
            }
        }
    }
    Ok(())
}
