"""shmcached: the daemon that owns a shmcache segment (see the project's issues; not yet built)."""
