//! The clock a policy's deadlines are checked at: its expiry, its offline limit and the key
//! lease. Unix time, or, when `POCKETVISOR_POLICY_CLOCK` names a file, the unix seconds
//! written in it (the tests move time with it, as a device left offline for days would).

/// The variable naming the file of a clock the tests move.
pub const CLOCK_VAR: &str = "POCKETVISOR_POLICY_CLOCK";

/// Now, in unix seconds, on the policy clock.
pub fn now() -> u64 {
    if let Some(file) = std::env::var_os(CLOCK_VAR) {
        if let Some(t) = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return t;
        }
    }
    policy::unix_now()
}
