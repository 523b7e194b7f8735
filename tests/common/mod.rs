//! Helpers for the system tests.
