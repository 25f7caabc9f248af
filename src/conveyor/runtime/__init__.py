"""Process lifecycle: the shared shutdown signal, signal handling, the service supervisor."""
