//! The browser phone: a phone-shaped page served by the daemon over HTTP(S) with each
//! profile's live screen (RFB over a websocket), a profile switcher and state badges.

pub mod ws;
