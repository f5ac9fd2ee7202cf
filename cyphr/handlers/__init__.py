"""
The rules: who may do what, and what happens then. Handlers know nothing of
HTTP or SQL, so that a REST route and a Socket.IO event for the same action
call the same handler method.
"""
