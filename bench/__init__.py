"""Benchmarks of shmcache (figures printed, never asserted)."""
