//! What operators and load balancers look at: the health model behind `/healthz` and `/livez`
//! (upstream's bodies, headers and semantics, §7.1) and the server that answers them. The model
//! is pure (every call takes the time); the server only reads it.

pub mod health;
pub mod metrics;
pub mod server;
pub mod service_health;
pub mod time;
