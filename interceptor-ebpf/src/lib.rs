//! Empty library target: `interceptor-user` build-depends on this crate so
//! cargo rebuilds the embedded object when the kernel programs change.
#![no_std]
