//! Device shadows with AWS IoT's semantics: documents, updates, deltas,
//! metadata, versions and the shadow MQTT topics. Pure logic: no IO.
//!
//! The caller owns storage, transport and the clock: it parses a request
//! topic with [`parse_request_topic`], loads the [`ShadowRecord`] for the
//! [`ShadowId`], runs [`ShadowRecord::update`], [`ShadowRecord::get`] or
//! [`ShadowRecord::delete`] with `now` in epoch seconds, stores the new
//! record and publishes the response documents. Every operation is a pure
//! function of its inputs, so on any error nothing needs to be undone.

mod error;
mod limits;
mod names;
mod record;
mod request;
mod state;
mod topics;

pub use error::{ShadowError, ShadowErrorKind, ShadowFailure, StoredRecordError};
pub use limits::Limits;
pub use names::{ShadowId, ShadowName, ThingName};
pub use record::{Section, ShadowDocument, ShadowRecord, UpdateOutcome};
pub use request::{parse_client_token, parse_update, SectionUpdate, UpdateRequest};
pub use topics::{
    delta_topic, documents_topic, parse_request_topic, request_topic, response_topic, Operation,
    Response,
};
