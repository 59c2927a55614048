"""Shared training / evaluation loops and the per-phase runners built on them."""
