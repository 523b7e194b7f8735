//! High availability on the backup: noticing that the primary is gone, and becoming the primary.
