"""
The REST API: one Klein class per area of the API (openapi.json), holding
its handlers. A route authenticates, validates its input, calls a handler
and shapes the answer; nothing else. The plumbing they share is in cyphr.api.http.
"""
