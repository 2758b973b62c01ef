//! Examples of embedding ax; see `embed.rs` (`cargo run --example embed`).
