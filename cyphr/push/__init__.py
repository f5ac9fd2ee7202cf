"""
Push wake-ups: senders for each push service; the outbox and its drainer
are cyphr.handlers.push.
"""
