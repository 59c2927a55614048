"""Plumbing shared by every phase: config, run folders, checkpoints, logging, devices."""
