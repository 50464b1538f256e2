"""Running jobs: run folders and Ray start-up, MLflow tracking, fault injection, a local S3 server."""
