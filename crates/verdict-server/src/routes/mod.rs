//! The HTTP handlers, one module per endpoint family.

pub mod classify;
pub mod info;
pub mod invocations;
pub mod pooling;
pub mod score;
pub mod tokenize;
