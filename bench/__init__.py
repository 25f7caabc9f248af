"""Conveyor's benchmark next to the Redis task-queue peers (arq, SAQ, taskiq, Celery, Dramatiq,
RQ, streaQ) on one workload (see bench/README.md): `python -m bench`."""
