"""The repair stage: kept weights changed from clean data when pruning alone leaves the backdoor."""
