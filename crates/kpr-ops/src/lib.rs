//! What operators and load balancers look at: the health model behind `/healthz` and `/livez`
//! (upstream's bodies, headers and semantics, §7.1) and the server that answers them. The model
//! is pure (every call takes the time); the server only reads it. Every server here is served
//! by [`listen::serve`], which holds up under hostile clients.

pub mod health;
pub mod listen;
pub mod metrics;
pub mod server;
pub mod service_health;
pub mod time;
