"""PostgreSQL: the durable record of every task.  [PostgreSQL]"""
