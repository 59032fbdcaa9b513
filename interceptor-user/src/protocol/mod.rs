//! Wire protocols: frames and sessions, not policy.
