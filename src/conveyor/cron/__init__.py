"""The cron service: user cron jobs, rebalance and relay.  [job scheduler]"""
