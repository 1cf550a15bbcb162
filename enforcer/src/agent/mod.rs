//! The node agent (`enforcer agent`): one root daemon per node that owns
//! every job, serves the socket API ([`proto`], `docs/api.md`) to callers
//! identified by their peer credentials ([`auth`]), persists each job's
//! plan before it starts ([`store`]) and runs it through a per-job shim
//! ([`shim`]) that outlives the agent, and holds the node's steal budgets
//! ([`budget`]). What `status` reports of cost is read by [`usage`]. The
//! CLI's side of the socket is [`client`]; the Prometheus endpoint is
//! [`metrics`].

pub mod auth;
pub mod budget;
pub mod client;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod shim;
pub mod store;
pub mod usage;
