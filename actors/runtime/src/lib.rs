//! botclaw's thin actor layer on ractor.
//!
//! Layout:
//! - [`router`]: the one remotable actor per node. Peers find it through `ractor::pg`
//!   groups and send it cross-node traffic; today it answers link pings, later issues route
//!   conversation turns through it.
//!
//! Actors here hold no decision logic: they call into `botclaw-core` and execute effects.

pub mod router;

pub use router::{RouterActor, RouterArgs, RouterMessage};
