//! pending_profiles
