"""Tools for testing and measuring Conveyor on real servers (not used by the service)."""
