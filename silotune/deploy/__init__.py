"""Deployment: TLS material, coordinator service, silo agents, run submission."""
