//! In-memory SPC-4 persistent reservation target (test builds only).
