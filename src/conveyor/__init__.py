"""Conveyor: durable tasks on PostgreSQL and Redis Streams, with an HTTP API, workers and cron."""

from conveyor.application import Conveyor
from conveyor.config import Settings
from conveyor.errors import Fail, Retry
from conveyor.registry import RetryPolicy, TaskContext

__version__ = "0.1.0"
__all__ = ["Conveyor", "Fail", "Retry", "RetryPolicy", "Settings", "TaskContext", "__version__"]
