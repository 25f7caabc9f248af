"""The worker service: consumers per task type, handler execution, heartbeat.  [worker loop]"""
