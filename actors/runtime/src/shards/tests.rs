//! Three drivers over in-memory stores and in-process links, steered by a map changed by
//! hand as the controller would: writes reach every in-sync member before they are
//! acknowledged, a learner catches up by stream and is proposed for promotion, a handoff
//! moves ownership with every acknowledged turn, and a silent member is dropped. With
//! conversation actors on top: a new owner answers nothing from its copy (a previous
//! owner's write may be in it and missing elsewhere) before every in-sync member holds it.

use std::sync::Mutex;

use botclaw_core::shardmap::{AssignRun, ShardChange};

use super::*;
use crate::envelope::{ConvOutcome, ConvRequest, Reply};
use crate::host::ConversationHost;
use crate::replicator::{ReplicaTicket, Replication};
use crate::store::MemoryStore;

/// A turn submitted through [`ShardReplicator::submit_then`], as a ticket that resolves
/// when the driver would tell the conversation.
async fn submit(
    shards: &ShardReplicator,
    conv: &str,
    epoch: Epoch,
    base: Version,
    commit: TurnCommit,
) -> Result<ReplicaTicket, Refusal> {
    let (done, done_rx) = oneshot::channel();
    let notify = Notify::new(move |result| drop(done.send(result)));
    shards.submit_then(conv, epoch, base, commit, notify).await?;
    Ok(Box::pin(async move { done_rx.await.map_err(|_| gone())? }))
}

const SHARDS: u32 = 4;
const CONV: &str = "alice";

#[derive(Default)]
struct Links {
    me: String,
    peers: Mutex<HashMap<String, ShardReplicator>>,
    proposals: Mutex<Vec<MapCommand>>,
    /// Batches to these peers are lost.
    cut: Mutex<Vec<String>>,
    /// Streams are held back until this many more batches went to the same peer (they
    /// arrive after writes forwarded later).
    stream_delay: Mutex<usize>,
    held: Mutex<Vec<(String, Vec<u8>, usize)>>,
    /// While set, batches carrying stream chunks after the first are kept here (released
    /// by the test).
    hold_later_chunks: Mutex<bool>,
    chunks_sent: Mutex<usize>,
    kept: Mutex<Vec<(String, Vec<u8>)>>,
    /// Batches carrying writes to these peers wait in `paused` until the test releases
    /// them (a later batch without writes may overtake them).
    pause: Mutex<Vec<String>>,
    paused: Mutex<Vec<(String, Vec<u8>)>>,
}

impl Links {
    /// Delivers the batches held by `pause`, in order, and stops holding.
    fn resume(&self) {
        self.pause.lock().unwrap().clear();
        for (peer, bytes) in std::mem::take(&mut *self.paused.lock().unwrap()) {
            self.send(&peer, bytes);
        }
    }
}

impl ShardLinks for Links {
    fn send(&self, peer: &str, bytes: Vec<u8>) {
        if self.cut.lock().unwrap().iter().any(|p| p == peer) {
            return;
        }
        let write = |m: &PeerMsg| matches!(m, PeerMsg::Own(Msg::Replicate { .. }));
        if self.pause.lock().unwrap().iter().any(|p| p == peer) {
            let batch: PeerBatch = postcard::from_bytes(&bytes).unwrap();
            if batch.msgs.iter().any(write) {
                self.paused.lock().unwrap().push((peer.to_string(), bytes));
                return;
            }
        }
        let delay = *self.stream_delay.lock().unwrap();
        let batch: PeerBatch = postcard::from_bytes(&bytes).unwrap();
        if batch.msgs.iter().any(|m| matches!(m, PeerMsg::Stream { .. })) {
            let mut sent = self.chunks_sent.lock().unwrap();
            *sent += 1;
            if *sent > 1 && *self.hold_later_chunks.lock().unwrap() {
                self.kept.lock().unwrap().push((peer.to_string(), bytes));
                return;
            }
        }
        let mut held = self.held.lock().unwrap();
        if delay > 0 && matches!(batch.msgs[..], [PeerMsg::Stream { .. }]) {
            held.push((peer.to_string(), bytes, delay));
            return;
        }
        let peers = self.peers.lock().unwrap();
        let Some(p) = peers.get(peer) else { return };
        let _ = p.peer(bytes);
        for h in held.iter_mut().filter(|h| h.0 == peer) {
            h.2 -= 1;
        }
        for (_, bytes, _) in held.extract_if(.., |h| h.0 == peer && h.2 == 0) {
            let _ = p.peer(bytes);
        }
    }

    fn propose(&self, command: MapCommand) {
        self.proposals.lock().unwrap().push(command);
    }

    fn controller_heard(&self) -> bool {
        true
    }
}

struct Node {
    links: Arc<Links>,
    store: Arc<MemoryStore>,
    shards: ShardReplicator,
    metrics: ConversationMetrics,
}

fn limits() -> ShardLimits {
    ShardLimits {
        shard_count: SHARDS,
        inbox_max: 1024,
        batch_bytes_max: 64 * 1024,
        parked_max: 1024,
        tick: Duration::from_millis(10),
        machine: OwnershipConfig {
            ack_patience_ticks: 20,
            catch_up_patience_ticks: 100,
            ..Default::default()
        },
    }
}

fn cluster(names: &[&str]) -> Vec<Node> {
    let nodes: Vec<Node> = names
        .iter()
        .map(|name| {
            let links = Arc::new(Links { me: name.to_string(), ..Default::default() });
            let store = Arc::new(MemoryStore::new(64, SHARDS));
            let metrics = ConversationMetrics::default();
            let shards = ShardReplicator::start(
                name,
                1,
                store.clone(),
                links.clone(),
                limits(),
                metrics.clone(),
            );
            Node { links, store, shards, metrics }
        })
        .collect();
    for n in &nodes {
        for (m, name) in nodes.iter().zip(names) {
            if n.links.me != *name {
                n.links.peers.lock().unwrap().insert(name.to_string(), m.shards.clone());
            }
        }
    }
    nodes
}

async fn apply(nodes: &[Node], map: &mut ShardMap, cmd: &MapCommand) {
    let applied = map.apply(cmd);
    assert!(applied.skipped.is_empty(), "{applied:?}");
    for n in nodes {
        n.shards.map_applied(Arc::new(map.clone())).await;
    }
}

/// a, b, c joined; every shard on [a, b].
async fn started(nodes: &[Node]) -> ShardMap {
    let mut map = ShardMap::new(SHARDS);
    for name in ["a", "b", "c"] {
        apply(
            nodes,
            &mut map,
            &MapCommand::Join { name: name.into(), incarnation: 1, capacity: 100 },
        )
        .await;
    }
    apply(
        nodes,
        &mut map,
        &MapCommand::Assign(vec![AssignRun { start: 0, len: SHARDS, replicas: vec![0, 1] }]),
    )
    .await;
    map
}

/// The controller adds `member` as a learner of `shard`.
async fn add_learner(nodes: &[Node], map: &mut ShardMap, shard: ShardId, member: MemberIx) {
    let epoch = map.shard(shard).unwrap().epoch;
    let add = ShardChange::AddLearner { shard, epoch, member };
    apply(nodes, map, &MapCommand::Changes(vec![add])).await;
}

async fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..500 {
        if let Some(t) = f() {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not reached in 5 s")
}

async fn acquired(n: &Node) -> Owned {
    for _ in 0..500 {
        if let Ok(owned) = n.shards.acquire(CONV).await {
            return owned;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never acquired")
}

/// Runs `k` turns on the owner `n`, each acknowledged before the next.
async fn turns(n: &Node, owned: &mut Owned, k: usize) {
    paced_turns(n, owned, k, Duration::ZERO).await
}

async fn paced_turns(n: &Node, owned: &mut Owned, k: usize, pace: Duration) {
    for _ in 0..k {
        tokio::time::sleep(pace).await;
        let id = format!("m{}", owned.state.turn + 1);
        let commit =
            owned.state.next_commit("echo", id, "hi".into(), None, vec!["re".into()], vec![]);
        let ticket =
            submit(&n.shards, CONV, owned.epoch, owned.version, commit.clone()).await.unwrap();
        let turn = commit.record.turn;
        owned.state.apply(commit, 64);
        owned.version = Version { epoch: owned.epoch, turn };
        tokio::time::timeout(Duration::from_secs(5), ticket).await.unwrap().unwrap();
    }
}

async fn turn_of(store: &MemoryStore, conv: &str) -> u64 {
    store.load(conv).await.unwrap().map_or(0, |s: Stored| s.state.turn)
}

fn promotions(n: &Node) -> Vec<MapCommand> {
    n.links.proposals.lock().unwrap().drain(..).collect()
}

/// Waits until `n` proposes a command of one shard change matching `f`, and returns it.
async fn proposed(n: &Node, f: impl Fn(&ShardChange) -> bool) -> MapCommand {
    eventually(|| {
        promotions(n)
            .into_iter()
            .find(|cmd| matches!(cmd, MapCommand::Changes(c) if c.len() == 1 && f(&c[0])))
    })
    .await
}

#[tokio::test]
async fn writes_reach_the_in_sync_set_a_learner_catches_up_and_ownership_hands_off() {
    let nodes = cluster(&["a", "b", "c"]);
    let mut map = started(&nodes).await;
    let shard = shard_of(CONV, SHARDS);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut owned = acquired(a).await;
    assert!(b.shards.acquire(CONV).await.unwrap_err().moved, "b is not the owner");
    turns(a, &mut owned, 5).await;
    // Acknowledged: durable on a and b; c holds nothing of the shard.
    assert_eq!(turn_of(&a.store, CONV).await, 5);
    assert_eq!(turn_of(&b.store, CONV).await, 5);
    assert_eq!(turn_of(&c.store, CONV).await, 0);
    a.shards.read(CONV).await.unwrap();
    assert!(b.shards.read(CONV).await.unwrap_err().moved);

    // c is added as a learner: it receives the shard by stream, then a proposes it.
    add_learner(&nodes, &mut map, shard, 2).await;
    let promote = proposed(a, |c| matches!(c, ShardChange::Promote { member: 2, .. })).await;
    assert_eq!(turn_of(&c.store, CONV).await, 5, "the stream carried every acknowledged turn");
    apply(&nodes, &mut map, &promote).await;
    assert_eq!(map.shard(shard).unwrap().isr.len(), 3);
    turns(a, &mut owned, 1).await;
    assert_eq!(turn_of(&c.store, CONV).await, 6, "a promoted member takes every write");

    // Live handoff to c: a stops owning; c continues from its copy with a higher epoch.
    let epoch = map.shard(shard).unwrap().epoch;
    apply(
        &nodes,
        &mut map,
        &MapCommand::Changes(vec![ShardChange::SetOwner { shard, epoch, member: 2 }]),
    )
    .await;
    let _ = eventually(|| (map.shard(shard).unwrap().owner == Some(2)).then_some(())).await;
    let mut moved = acquired(c).await;
    assert_eq!(moved.state.turn, 6);
    assert!(moved.epoch > owned.epoch);
    // a's turns are refused now (its map says c owns).
    let commit = owned.state.next_commit("echo", "late".into(), "x".into(), None, vec![], vec![]);
    let refused = submit(&a.shards, CONV, owned.epoch, owned.version, commit).await;
    assert!(refused.is_err_and(|r| r.moved));
    turns(c, &mut moved, 2).await;
    for n in &nodes {
        assert_eq!(turn_of(&n.store, CONV).await, 8, "{}", n.links.me);
    }
}

#[tokio::test]
async fn a_member_that_stops_acknowledging_is_proposed_for_removal() {
    let nodes = cluster(&["a", "b", "c"]);
    let mut map = started(&nodes).await;
    let shard = shard_of(CONV, SHARDS);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut owned = acquired(a).await;
    turns(a, &mut owned, 2).await;
    // Batches from a to b are lost: the next turn waits, then a proposes dropping b.
    a.links.cut.lock().unwrap().push("b".into());
    let commit = owned.state.next_commit("echo", "m3".into(), "hi".into(), None, vec![], vec![]);
    let ticket = submit(&a.shards, CONV, owned.epoch, owned.version, commit).await.unwrap();
    let remove = proposed(a, |c| matches!(c, ShardChange::Remove { member: 1, .. })).await;
    apply(&nodes, &mut map, &remove).await;
    // The controller committed it: the write is acknowledged on the members left.
    tokio::time::timeout(Duration::from_secs(5), ticket).await.unwrap().unwrap();
    assert_eq!(turn_of(&a.store, CONV).await, 3);
    assert_eq!(turn_of(&b.store, CONV).await, 2);
    assert_eq!(map.shard(shard).unwrap().isr.as_slice(), &[0]);
}

#[tokio::test]
async fn a_learner_added_under_load_catches_up_with_every_turn() {
    let nodes = Arc::new(cluster(&["a", "b", "c"]));
    let mut map = started(&nodes).await;
    let shard = shard_of(CONV, SHARDS);
    let mut owned = acquired(&nodes[0]).await;
    turns(&nodes[0], &mut owned, 3).await;
    // Turns keep coming while c is added: writes forwarded to c before its stream arrive
    // first, are parked, and apply once the stream is installed.
    let writer = {
        let nodes = nodes.clone();
        tokio::spawn(async move {
            paced_turns(&nodes[0], &mut owned, 40, Duration::from_millis(2)).await;
            owned
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    *nodes[0].links.stream_delay.lock().unwrap() = 3;
    add_learner(&nodes, &mut map, shard, 2).await;
    let promote =
        proposed(&nodes[0], |c| matches!(c, ShardChange::Promote { member: 2, .. })).await;
    apply(&nodes, &mut map, &promote).await;
    let mut owned = writer.await.unwrap();
    turns(&nodes[0], &mut owned, 1).await;
    let stored = nodes[2].store.load(CONV).await.unwrap().unwrap();
    assert_eq!(stored.state.turn, 44);
    assert_eq!(stored.state, nodes[0].store.load(CONV).await.unwrap().unwrap().state);
}

/// A shard larger than a batch streams in several chunks; the learner reports its catch-up
/// (and the owner proposes its promotion) only after the last chunk is installed, holding
/// every row. Checked while the later chunks are held back: a chunk wrongly marked last
/// would get the learner promoted without them.
#[tokio::test]
async fn a_shard_larger_than_a_batch_streams_in_chunks_and_promotes_after_the_last() {
    let nodes = cluster(&["a", "b", "c"]);
    let mut map = started(&nodes).await;
    let shard = shard_of(CONV, SHARDS);
    // 300 conversations of about 1 KiB each in that shard on the owner: about 5 batches.
    let convs: Vec<String> = (0..)
        .map(|k| format!("big-{k}"))
        .filter(|c| shard_of(c, SHARDS) == shard)
        .take(300)
        .collect();
    for conv in &convs {
        let mut state = botclaw_core::conversation::ConversationState::default();
        state.bot = "echo".into();
        state.bot_state = vec![7; 1024];
        state.turn = 1;
        let epoch = Epoch { term: 1, node: 1 };
        let op = StoreOp::Install { epoch, state, version: Version { epoch, turn: 1 } };
        nodes[0].store.execute(conv, op).await.unwrap();
    }
    *nodes[0].links.hold_later_chunks.lock().unwrap() = true;
    add_learner(&nodes, &mut map, shard, 2).await;
    eventually(|| (!nodes[0].links.kept.lock().unwrap().is_empty()).then_some(())).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let early = promotions(&nodes[0]).into_iter().any(|c| {
        matches!(&c, MapCommand::Changes(ch) if ch.iter().any(|x| matches!(x, ShardChange::Promote { member: 2, .. })))
    });
    assert!(!early, "the learner was proposed for promotion before the last chunk");
    let held = nodes[2].store.load_shard(shard).await.unwrap().len();
    assert!(held < convs.len(), "the first chunk held every row: nothing was split ({held})");
    // The rest arrives: promotion follows, with every row on the learner.
    *nodes[0].links.hold_later_chunks.lock().unwrap() = false;
    let kept = std::mem::take(&mut *nodes[0].links.kept.lock().unwrap());
    let chunks = kept.len() + 1;
    for (peer, bytes) in kept {
        let peers = nodes[0].links.peers.lock().unwrap();
        let _ = peers.get(&peer).unwrap().peer(bytes);
    }
    let promote =
        proposed(&nodes[0], |c| matches!(c, ShardChange::Promote { member: 2, .. })).await;
    apply(&nodes, &mut map, &promote).await;
    let learned = nodes[2].store.load_shard(shard).await.unwrap();
    assert_eq!(learned.len(), convs.len(), "{chunks} chunks");
    assert!(chunks >= 3, "about 300 KiB in 64 KiB batches came in {chunks} chunks");
}

/// Batches written message by message are byte for byte what `PeerBatch::to_bytes` gives
/// for the same cuts, decode back to the messages in order, and stay within the bound
/// (a message larger than the bound travels alone).
#[test]
fn batch_writer_encodes_once_what_peer_batch_encodes() {
    use botclaw_core::ownership::Msg;
    let msgs: Vec<PeerMsg> = (0..500u64)
        .map(|i| PeerMsg::Own(Msg::Ack { shard: (i * 7919) as u32, epoch: i, seq: i * i }))
        .chain(std::iter::once(PeerMsg::Stream {
            shard: 1,
            attempt: 2,
            convs: vec![("a-long-conversation-name".to_string(), Stored::default()); 40],
            last: true,
        }))
        .collect();
    for max in [64, 300, 1 << 20] {
        let mut w = BatchWriter::new("node-a", max);
        let mut out: Vec<Vec<u8>> = msgs.iter().filter_map(|m| w.push(m)).collect();
        out.extend(w.finish());
        let mut decoded = Vec::new();
        for bytes in &out {
            let batch: PeerBatch = postcard::from_bytes(bytes).unwrap();
            assert_eq!(batch.from, "node-a");
            assert_eq!(&batch.to_bytes(), bytes, "the same bytes as PeerBatch's encoding");
            assert!(bytes.len() <= max || batch.msgs.len() == 1, "{} > {max}", bytes.len());
            decoded.extend(batch.msgs);
        }
        assert_eq!(decoded, msgs, "max {max}: every message once, in order");
        assert!(w.finish().is_none());
    }
}

#[tokio::test]
async fn peer_messages_it_cannot_take_are_dropped_and_counted() {
    // d is linked but not in the map (a, b, c are).
    let nodes = cluster(&["a", "b", "c", "d"]);
    let dropped = |n: &Node, reason: &str| {
        n.metrics
            .shard_messages_dropped
            .get_or_create(&crate::metrics::ReasonLabel { reason: reason.into() })
            .get()
    };
    let stream = |from: &str| {
        let last = PeerMsg::Stream { shard: 1, attempt: 1, convs: Vec::new(), last: true };
        PeerBatch { from: from.into(), msgs: vec![last] }.to_bytes()
    };
    let (c, d) = (&nodes[2], &nodes[3]);
    c.shards.peer(vec![0xff; 16]).unwrap();
    eventually(|| (dropped(c, "undecodable") == 1).then_some(())).await;
    // Before any map, every sender is unknown.
    c.shards.peer(stream("a")).unwrap();
    eventually(|| (dropped(c, "unknown-sender") == 1).then_some(())).await;
    let _map = started(&nodes).await;
    c.shards.peer(stream("zed")).unwrap();
    eventually(|| (dropped(c, "unknown-sender") == 2).then_some(())).await;
    // A stream's end reaches d, which the map does not count in: nothing to report it to.
    d.shards.peer(stream("a")).unwrap();
    eventually(|| (dropped(d, "not-a-member") == 1).then_some(())).await;
    // c, a member, takes the same stream's end without dropping anything (the garbage
    // after it, counted, tells that the driver has handled it: one inbox, in order).
    c.shards.peer(stream("a")).unwrap();
    c.shards.peer(vec![0xff; 16]).unwrap();
    eventually(|| (dropped(c, "undecodable") == 2).then_some(())).await;
    assert_eq!((dropped(c, "unknown-sender"), dropped(c, "not-a-member")), (2, 0));
}

/// A conversation actor on `n`'s driver, as the node runs it.
async fn host_on(n: &Node) -> ConversationHost {
    let metrics = ConversationMetrics::default();
    let backends =
        crate::backends::Backends::new(&botclaw_config::BackendConfig::default(), metrics.clone());
    let cfg = botclaw_config::ConversationConfig::default();
    let replicator: Arc<dyn Replication> = Arc::new(n.shards.clone());
    let bots = crate::bots::builtin(true);
    ConversationHost::start(
        n.links.me.as_str().into(),
        &cfg,
        replicator,
        100,
        bots,
        backends,
        metrics,
    )
    .await
    .unwrap()
}

/// Asks `host` for `request`; the answer comes on the receiver.
fn asked(host: &ConversationHost, request: ConvRequest) -> oneshot::Receiver<ConvOutcome> {
    let (tx, rx) = oneshot::channel();
    host.dispatch(CONV, request, Reply::new(move |o| drop(tx.send(o))));
    rx
}

async fn answer(rx: oneshot::Receiver<ConvOutcome>) -> ConvOutcome {
    tokio::time::timeout(Duration::from_secs(5), rx).await.expect("no answer").unwrap()
}

fn say(id: &str) -> ConvRequest {
    ConvRequest::Say { id: id.into(), text: "hi".into(), bot: None, user: None }
}

fn turn(outcome: ConvOutcome) -> Result<u64, String> {
    match outcome {
        ConvOutcome::Reply { turn, .. } => Ok(turn),
        other => Err(format!("{other:?}")),
    }
}

/// Asks `host` for `request` while c's writes to b are held: no answer comes until they
/// are let through (b must hold the copy first), then the answer.
async fn answered_once_b_holds_it(
    nodes: &[Node],
    host: &ConversationHost,
    request: ConvRequest,
) -> ConvOutcome {
    let (b, c) = (&nodes[1], &nodes[2]);
    c.links.pause.lock().unwrap().push("b".into());
    let mut rx = asked(host, request);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rx.try_recv().is_err(), "answered while b lacked m3");
    assert_eq!(turn_of(&b.store, CONV).await, 2);
    c.links.resume();
    let outcome = answer(rx).await;
    assert_eq!(turn_of(&b.store, CONV).await, 3);
    outcome
}

async fn say_on(host: &ConversationHost, id: &str) -> Result<u64, String> {
    turn(answer(asked(host, say(id))).await)
}

/// a, b and c in sync; a's write m3 reached c but not b (nor was acknowledged) when
/// ownership moved to c. Returns the map.
async fn moved_with_an_unacknowledged_write(nodes: &[Node]) -> ShardMap {
    let mut map = started(nodes).await;
    let shard = shard_of(CONV, SHARDS);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    add_learner(nodes, &mut map, shard, 2).await;
    let promote = proposed(a, |c| matches!(c, ShardChange::Promote { member: 2, .. })).await;
    apply(nodes, &mut map, &promote).await;
    let mut owned = acquired(a).await;
    turns(a, &mut owned, 2).await;
    a.links.cut.lock().unwrap().push("b".into());
    let commit = owned.state.next_commit("echo", "m3".into(), "hi".into(), None, vec![], vec![]);
    let pending = submit(&a.shards, CONV, owned.epoch, owned.version, commit).await.unwrap();
    for _ in 0..500 {
        if turn_of(&c.store, CONV).await == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(turn_of(&c.store, CONV).await, 3);
    assert_eq!(turn_of(&b.store, CONV).await, 2);
    set_owner(nodes, &mut map, 2).await;
    let failed = tokio::time::timeout(Duration::from_secs(5), pending).await.unwrap();
    assert!(failed.is_err_and(|r| r.moved), "a no longer owns: m3's outcome is unknown");
    // a's messages reach b again.
    a.links.cut.lock().unwrap().clear();
    map
}

async fn set_owner(nodes: &[Node], map: &mut ShardMap, member: MemberIx) {
    let shard = shard_of(CONV, SHARDS);
    let epoch = map.shard(shard).unwrap().epoch;
    let cmd = MapCommand::Changes(vec![ShardChange::SetOwner { shard, epoch, member }]);
    apply(nodes, map, &cmd).await;
}

/// The client retries m3 at c, which finds it in its copy: the answer waits until every
/// in-sync member holds it (c installs its copy on b), so when ownership moves on to b,
/// turn 3 is still there and the next turn is 4. Answered from c's copy at once, m3 would
/// be acknowledged and then lost once the controller dropped the members b's next write
/// cannot build on, and m4 would become turn 3.
#[tokio::test]
async fn a_new_owner_answers_a_retry_from_its_copy_only_once_every_in_sync_member_holds_it() {
    let nodes = cluster(&["a", "b", "c"]);
    let mut map = moved_with_an_unacknowledged_write(&nodes).await;
    let at_c = host_on(&nodes[2]).await;
    assert_eq!(turn(answered_once_b_holds_it(&nodes, &at_c, say("m3")).await), Ok(3));
    set_owner(&nodes, &mut map, 1).await;
    let at_b = host_on(&nodes[1]).await;
    assert_eq!(say_on(&at_b, "m4").await, Ok(4), "the turn after m3");
    assert_eq!(say_on(&at_b, "m3").await, Ok(3), "m3 is still turn 3");
}

/// The same for a read at c: it shows m3 only once b holds it too.
#[tokio::test]
async fn a_new_owner_shows_its_copy_only_once_every_in_sync_member_holds_it() {
    let nodes = cluster(&["a", "b", "c"]);
    moved_with_an_unacknowledged_write(&nodes).await;
    let at_c = host_on(&nodes[2]).await;
    let history = ConvRequest::History { limit: 10, before: None };
    match answered_once_b_holds_it(&nodes, &at_c, history).await {
        ConvOutcome::History { turns, .. } => assert_eq!(turns.len(), 3),
        other => panic!("not a history: {other:?}"),
    }
}

/// A new turn at c builds on its copy: the copy goes first, so b (which lacked m3) takes
/// the turn at once instead of holding it up until the controller drops b.
#[tokio::test]
async fn a_new_owners_first_turn_reaches_a_member_that_lacked_its_copy() {
    let nodes = cluster(&["a", "b", "c"]);
    moved_with_an_unacknowledged_write(&nodes).await;
    let at_c = host_on(&nodes[2]).await;
    assert_eq!(say_on(&at_c, "m4").await, Ok(4));
    for n in &nodes {
        assert_eq!(turn_of(&n.store, CONV).await, 4, "{}", n.links.me);
    }
    assert!(promotions(&nodes[2]).is_empty(), "c proposed a change: {:?}", promotions(&nodes[2]));
}

/// d joins c's shard as a learner while c confirms its copy: the copy reaches d before the
/// shard's stream does. d still catches up (a stream read before the copy was confirmed
/// is refused and the catch-up starts over; the next one carries c's epoch, which d
/// accepts) and is proposed for promotion, holding m3.
#[tokio::test]
async fn a_learner_that_got_the_copy_before_its_stream_still_catches_up() {
    let nodes = cluster(&["a", "b", "c", "d"]);
    let mut map = moved_with_an_unacknowledged_write(&nodes).await;
    let shard = shard_of(CONV, SHARDS);
    let join = MapCommand::Join { name: "d".into(), incarnation: 1, capacity: 100 };
    apply(&nodes, &mut map, &join).await;
    let (c, d) = (&nodes[2], &nodes[3]);
    let at_c = host_on(c).await;
    // The stream waits for the next batch to d: the copy, forwarded to the learner.
    *c.links.stream_delay.lock().unwrap() = 1;
    add_learner(&nodes, &mut map, shard, 3).await;
    assert_eq!(say_on(&at_c, "m3").await, Ok(3));
    *c.links.stream_delay.lock().unwrap() = 0;
    let promote = proposed(c, |c| matches!(c, ShardChange::Promote { member: 3, .. })).await;
    apply(&nodes, &mut map, &promote).await;
    assert_eq!(turn_of(&d.store, CONV).await, 3);
}
