"""SAGE edge server: gRPC front end, batching engine, Ray workers running the shared phase."""
