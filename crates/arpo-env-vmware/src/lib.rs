//! arpo-env-vmware (work in progress: see its issue).
