"""Realtime: Socket.IO v5 over Engine.IO v4 on Twisted, and Cyphr's events."""
