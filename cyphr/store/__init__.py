"""
All SQL, one module per domain. Each store method runs one query (or one
named transaction) and answers frozen dataclasses or plain values, never
cursors or rows.
"""
