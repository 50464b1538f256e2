"""Batch scoring with Ray Data, its exactly-once sink and lease, and the Ray Serve endpoint."""
