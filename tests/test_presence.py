"""
cyphr.realtime.presence alone: who is online here and on the other nodes,
and who goes offline when a node falls silent, on an injected clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cyphr.realtime.presence import Presence


class SilentNodeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.presence = Presence(self.clock)

    def test_silent_after_max_age(self) -> None:
        """A node is silent once it has said nothing for longer than the
        maximum age; any event from it (a heartbeat) makes it heard again."""
        self.presence.remote_online("a", "bob")
        self.presence.heard("b")
        self.clock.advance(60)
        self.assertEqual(self.presence.silent_nodes(60), [])
        self.presence.heard("b")
        self.clock.advance(1)
        self.assertEqual(self.presence.silent_nodes(60), ["a"])

    def test_forget_node_answers_who_is_offline_everywhere(self) -> None:
        """Forgetting a silent node answers the users that were online only
        through it; a user also reported by another node, or with a socket
        on this one, stays online."""
        here = object()
        self.presence.remote_online("a", "bob")      # only on node a
        self.presence.remote_online("a", "carol")    # also on node b
        self.presence.remote_online("b", "carol")
        self.presence.remote_online("a", "dave")     # also here
        self.presence.add("dave", here)
        self.presence.remote_online("a", "erin")     # left node a properly
        self.presence.remote_offline("a", "erin")
        self.clock.advance(61)
        self.presence.heard("b")
        [silent] = self.presence.silent_nodes(60)
        self.assertEqual(sorted(self.presence.forget_node(silent)), ["bob"])
        self.assertFalse(self.presence.is_online("bob"))
        self.assertTrue(self.presence.is_online("carol"))
        self.assertTrue(self.presence.is_online("dave"))
        self.assertEqual(self.presence.silent_nodes(60), [])
        # Asked again (a late event revived it, then it fell silent again):
        # nobody is offline a second time.
        self.assertEqual(self.presence.forget_node("a"), [])
