"""Conveyor's benchmark against the Redis task-queue peers of `shared/bench/peers`
(see bench/README.md): `python -m bench`."""
