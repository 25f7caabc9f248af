"""Redis: task streams, delayed sets, dead letters, heartbeats and locks.  [Redis]"""
