//! The leases this process holds in object stores and what a lease object says: the part of
//! `lock` that `object` needs to explain a refused commit, apart so that `object` (which `lock`
//! uses) does not use `lock` back.

use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A lease not renewed for this long belongs to a dead run.
pub const LEASE_TTL: Duration = Duration::from_secs(120);

/// What a lease object holds.
#[derive(Serialize, Deserialize)]
pub(crate) struct LeaseBody {
    pub(crate) holder: String,
    pub(crate) host: String,
    pub(crate) pid: u32,
}

/// The leases this process holds (bucket URL, lease key, the body it wrote), so that a refused
/// commit can tell a lease taken over from another kind of second writer.
pub(crate) static HELD: Mutex<Vec<(String, String, Vec<u8>)>> = Mutex::new(Vec::new());

/// When another run took over a lease this process holds in the bucket at `url` (it judged this
/// run dead: not renewed for `LEASE_TTL`): says so, naming the lease and its new holder. `read`
/// fetches an object's body from that bucket (None when it cannot, Some(None) when it is gone).
pub fn taken_over(url: &str, read: impl Fn(&str) -> Option<Option<Vec<u8>>>) -> Option<String> {
    let held: Vec<(String, Vec<u8>)> = HELD
        .lock()
        .ok()?
        .iter()
        .filter(|(held_url, _, _)| held_url == url)
        .map(|(_, key, body)| (key.clone(), body.clone()))
        .collect();
    held.into_iter().find_map(|(key, ours)| {
        let now = read(&key)?;
        let holder = match now {
            Some(body) if body == ours => return None,
            Some(body) => serde_json::from_slice::<LeaseBody>(&body)
                .map_or("holder unknown".to_string(), |h| h.holder),
            None => "it is gone now".to_string(),
        };
        Some(format!(
            "another run took over this run's lease {}/{key} ({holder}): it judged this run dead, \
             as the lease was not renewed for {} s (was this process stopped, suspended or cut \
             off from the store?)",
            url,
            LEASE_TTL.as_secs()
        ))
    })
}
