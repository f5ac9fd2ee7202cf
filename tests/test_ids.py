"""cyphr.ids: message ids read 256 at a time from the system's random source."""

from __future__ import annotations

import os
import re
import uuid

from twisted.trial.unittest import SynchronousTestCase

from cyphr import ids

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


class NewUuidTests(SynchronousTestCase):
    def test_version_4_variant_10(self) -> None:
        """Each id is a version 4 UUID of the RFC variant, in the form
        str(uuid.uuid4()) gives, with every variant nibble turning up."""
        seen = set()
        for _ in range(2000):
            text = ids.new_uuid()
            self.assertRegex(text, UUID4)
            parsed = uuid.UUID(text)
            self.assertEqual((parsed.version, parsed.variant, str(parsed)), (4, uuid.RFC_4122, text))
            seen.add(text[19])
        self.assertEqual(seen, set("89ab"))

    def test_never_repeats_across_reads(self) -> None:
        """Ids drawn across many reads of the random source are all
        different, and all the bytes of a read are used once."""
        made = [ids.new_uuid() for _ in range(3 * 256 + 7)]
        self.assertEqual(len(set(made)), len(made))

    def test_bytes_come_from_urandom_in_order(self) -> None:
        """An id is the next 16 bytes of os.urandom's answer, with the
        version and variant bits set; a new read comes after 256 ids."""
        reads: list[int] = []
        block = bytes(range(256)) * 16

        def urandom(n: int) -> bytes:
            reads.append(n)
            return block[:n]
        self.patch(ids, "_random", b"")
        self.patch(ids, "_used", 0)
        self.patch(os, "urandom", urandom)
        first = ids.new_uuid()
        self.assertEqual(first, "00010203-0405-4607-8809-0a0b0c0d0e0f")
        for _ in range(255):
            ids.new_uuid()
        self.assertEqual(reads, [4096])
        ids.new_uuid()
        self.assertEqual(reads, [4096, 4096])

    def test_a_forked_child_reads_afresh(self) -> None:
        """A child process does not hand out the ids its parent read ahead."""
        ids.new_uuid()  # something read ahead
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read)
            os.write(write, ids.new_uuid().encode())
            os._exit(0)
        os.close(write)
        child = os.read(read, 64).decode()
        os.close(read)
        os.waitpid(pid, 0)
        self.assertNotEqual(child, ids.new_uuid())
        self.assertRegex(child, UUID4)
