//! How long one planning round takes at full size (262,144 shards), and the map's snapshot
//! size: `cargo run --release -p botclaw-core --example plan_cost [nodes]`.

use std::time::Instant;

use botclaw_core::placement::Placement;
use botclaw_core::shardmap::plan::{plan, PlanConfig, UpMember};
use botclaw_core::shardmap::ShardMap;

fn main() {
    let nodes: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let cfg = botclaw_config::PlacementConfig::default();
    let mut map = ShardMap::new(cfg.shard_count);
    let up: Vec<UpMember> = (0..nodes).map(|i| UpMember::new(format!("n{i}"), 1, 100)).collect();
    let ring_of = |map: &ShardMap| Placement::build(&map.active_members(), &cfg);
    let pcfg = PlanConfig { assign_shards_max: usize::MAX, ..Default::default() };
    for cmd in plan(&map, &up, &ring_of(&map), &pcfg) {
        map.apply(&cmd);
    }
    let ring = ring_of(&map);
    let t = Instant::now();
    let cmds = plan(&map, &up, &ring, &pcfg);
    println!("assign round: {:?} ({} commands)", t.elapsed(), cmds.len());
    let bytes: usize = cmds.iter().map(|c| postcard::to_stdvec(c).unwrap().len()).sum();
    println!("assign commands: {bytes} bytes");
    for cmd in &cmds {
        map.apply(cmd);
    }
    let t = Instant::now();
    let cmds = plan(&map, &up, &ring, &pcfg);
    println!("steady round: {:?} ({} commands)", t.elapsed(), cmds.len());
    println!("map snapshot: {} bytes", postcard::to_stdvec(&map).unwrap().len());
}
