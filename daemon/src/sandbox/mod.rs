//! What reservd may do and for whom: the privileges it keeps
//! ([`privs`]), the system calls it may make ([`seccomp`]), the clients it
//! serves ([`access`]).

pub mod access;
pub mod privs;
pub mod seccomp;
