//! SeaweedFS (`weed mini`) as a real S3-compatible server for tests.
