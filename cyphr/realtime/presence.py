"""
Who is online: the sockets of each user on this node, and the users that
other nodes report. A plain object; the caller turns its answers into
events. Time comes from the injected clock.

Memory: ``local`` holds the users with a socket here (a user goes with its
last socket); ``_remote`` the users other nodes report online (a user goes
when its last node reports it offline, or falls silent); ``_node_users`` and
``_node_heard`` one entry per other node, dropped when the node falls silent
(forget_node). So all of it follows the users connected now, on any node.
"""

from __future__ import annotations

from typing import Any


_NONE: frozenset[str] = frozenset()


class Presence:
    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self.local: dict[str, set[Any]] = {}
        self._remote: dict[str, set[str]] = {}        # user -> nodes that have it
        self._node_users: dict[str, set[str]] = {}    # node -> its users
        self._node_heard: dict[str, float] = {}       # node -> when it last spoke

    # -- this node --------------------------------------------------------

    def add(self, user: str, socket: Any) -> bool:
        """Record a socket; True if it is the user's first on this node."""
        sockets = self.local.get(user)
        if sockets is None:
            self.local[user] = {socket}
            return True
        sockets.add(socket)
        return False

    def remove(self, user: str, socket: Any) -> bool:
        """Forget a socket; True if it was the user's last on this node."""
        sockets = self.local.get(user)
        if sockets is None or socket not in sockets:
            return False
        sockets.discard(socket)
        if sockets:
            return False
        del self.local[user]
        return True

    def sockets(self, user: str) -> set[Any]:
        return self.local.get(user, set())

    # -- other nodes ------------------------------------------------------

    def heard(self, node: str) -> None:
        self._node_heard[node] = self._clock.seconds()

    def remote_online(self, node: str, user: str) -> None:
        self.heard(node)
        self._remote.setdefault(user, set()).add(node)
        self._node_users.setdefault(node, set()).add(user)

    def remote_offline(self, node: str, user: str) -> None:
        self.heard(node)
        nodes = self._remote.get(user)
        if nodes is not None:
            nodes.discard(node)
            if not nodes:
                del self._remote[user]
        users = self._node_users.get(node)
        if users is not None:
            users.discard(user)

    def forget_node(self, node: str) -> list[str]:
        """Drop what ``node`` reported; answer who is now offline everywhere."""
        self._node_heard.pop(node, None)
        gone = []
        for user in self._node_users.pop(node, set()):
            nodes = self._remote.get(user)
            if nodes is not None:
                nodes.discard(node)
                if not nodes:
                    del self._remote[user]
                    if user not in self.local:
                        gone.append(user)
        return gone

    def silent_nodes(self, max_age: float) -> list[str]:
        now = self._clock.seconds()
        return [node for node, at in self._node_heard.items() if now - at > max_age]

    # -- questions --------------------------------------------------------

    def nodes_of(self, user: str) -> set[str] | frozenset[str]:
        """The other nodes that report the user online."""
        return self._remote.get(user, _NONE)

    def elsewhere(self, user: str) -> bool:
        return user in self._remote

    def is_online(self, user: str) -> bool:
        return user in self.local or user in self._remote

    def memory_tables(self) -> dict[str, int]:
        """The size of each table, for the memory metrics."""
        return {"presence_local_users": len(self.local), "presence_remote_users": len(self._remote),
                "presence_nodes": len(self._node_heard)}

    @property
    def users(self) -> int:
        """Users with a socket on this node."""
        return len(self.local)

    @property
    def connections(self) -> int:
        return sum(len(sockets) for sockets in self.local.values())
