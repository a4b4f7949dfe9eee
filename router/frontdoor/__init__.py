"""The router's front door: request bodies, admission, tenants and their buckets, tokenizing, the job
a request becomes."""
