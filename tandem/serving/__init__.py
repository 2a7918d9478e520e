"""Plumbing shared by the services: engine worker thread, gRPC servers, status mapping, protos."""
